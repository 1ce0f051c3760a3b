"""megatron_tnllm.checkpoint_tracker: an empty or unreadable tracker (a kill while Megatron rewrote it) is pointed at
the newest complete torch_dist checkpoint; a readable one, or none, is left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tnllm.checkpoint_tracker import TRACKER, complete_iterations, repair_tracker


def checkpoints(root: Path, complete: tuple[int, ...], partial: tuple[int, ...] = ()) -> Path:
    """iter_NNNNNNN directories as Megatron leaves them: complete ones with dist_checkpointing's metadata.json
    (written last), partial ones with rank data only."""
    for it in (*complete, *partial):
        d = root / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"\0" * 16)
        if it in complete:
            (d / ".metadata").write_bytes(b"m")
            (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return root


@pytest.mark.parametrize("held", ["", "\n", "4\x00", "garbage"])
def test_unreadable_tracker_names_the_newest_complete_checkpoint(tmp_path, held):
    root = checkpoints(tmp_path, complete=(20, 40), partial=(60,))
    (root / TRACKER).write_text(held)
    assert complete_iterations(root) == [20, 40]
    assert repair_tracker(root) == (held.strip(), 40)
    assert (root / TRACKER).read_text() == "40"
    assert sorted(p.name for p in root.iterdir()) == sorted([TRACKER, "iter_0000020", "iter_0000040", "iter_0000060"])


@pytest.mark.parametrize("held", ["20", "release", "20\n"])
def test_readable_tracker_is_left_alone(tmp_path, held):
    root = checkpoints(tmp_path, complete=(20, 40))
    (root / TRACKER).write_text(held)
    assert repair_tracker(root) is None
    assert (root / TRACKER).read_text() == held


def test_no_tracker_is_a_fresh_run(tmp_path):
    assert repair_tracker(checkpoints(tmp_path, complete=(20,))) is None
    assert not (tmp_path / TRACKER).exists()


def test_unreadable_tracker_without_a_complete_checkpoint_is_refused(tmp_path):
    root = checkpoints(tmp_path, complete=(), partial=(20,))
    (root / TRACKER).write_text("")
    with pytest.raises(ValueError, match=r"holds '', not an iteration, and .* has no complete torch_dist checkpoint"):
        repair_tracker(root)
    assert (root / TRACKER).read_text() == ""  # nothing written


def test_command_line(tmp_path):
    root = checkpoints(tmp_path / "ckpt", complete=(20,))
    (root / TRACKER).write_text("")
    cmd = [sys.executable, "-m", "megatron_tnllm.checkpoint_tracker"]
    done = subprocess.run([*cmd, str(root)], capture_output=True, text=True, check=True)
    assert (
        f"{root / TRACKER} held '' (a run killed while Megatron rewrote it); it now names iteration 20" in done.stdout
    )
    again = subprocess.run([*cmd, str(root)], capture_output=True, text=True, check=True)
    assert again.stdout == ""  # repaired once, then left alone
    assert subprocess.run([*cmd, str(tmp_path / "fresh")], capture_output=True, text=True, check=True).stdout == ""
    (root / "iter_0000020" / "metadata.json").unlink()
    (root / TRACKER).write_text("")
    refused = subprocess.run([*cmd, str(root)], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("checkpoint_tracker: ")
