"""The converter never loses data: it refuses targets that overlap the source, cleans up after errors and
signals, removes what killed runs left (only that), and writes with the umask's permissions."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_tnllm.convert import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_tnllm.convert import staging as staging_module
from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.convert.hf_format import SafetensorsWriter
from megatron_tnllm.convert.staging import MAGIC, MARKER, remove_stale_temporaries
from tests.hf_helpers import small_checkpoints, tree_snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 2-layer HF directory and its Megatron conversion (tests copy them before changing anything)."""
    return small_checkpoints(tmp_path_factory.mktemp("safety"), seed=5)


def _one_error_line(err: str) -> str:
    """The single ``error:`` line of the CLI's stderr (notes may precede it; no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _overlapping_targets(source: Path) -> dict[str, Path]:
    """Targets that are, contain or lie inside ``source``, directly and through links."""
    links = source.parent / "links"
    links.mkdir(exist_ok=True)
    (links / "to_source").symlink_to(source)
    (links / "to_parent").symlink_to(source.parent)
    return {
        "itself": source,
        "itself, spelled with ..": source / ".." / source.name,
        "its parent": source.parent,
        "inside it": source / "out",
        "inside it, new subdirectories": source / "a" / "b",
        "a link to it": links / "to_source",
        "inside a link to it": links / "to_source" / "out",
        "a link to its parent": links / "to_parent",
    }


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
@pytest.mark.parametrize("force", [False, True])
def test_target_overlapping_the_source_is_refused_and_source_kept(checkpoints, tmp_path, direction, force, capsys):
    name = "hf" if direction == "hf-to-megatron" else "megatron"
    source = Path(shutil.copytree(checkpoints / name, tmp_path / "work" / name))
    before = tree_snapshot(source)
    for label, target in _overlapping_targets(source).items():
        argv = [direction, str(source), str(target), "--no-progress"] + ["--force"] * force
        assert convert(argv) == 2, label
        err = capsys.readouterr().err
        assert "expected a directory outside it" in err, (label, err)
        assert tree_snapshot(source) == before, f"{label}: the source changed"
    assert not (source / "out").exists() and not (source / "a").exists()


def test_api_refuses_overlap_too(checkpoints, tmp_path):
    source = Path(shutil.copytree(checkpoints / "megatron", tmp_path / "megatron"))
    with pytest.raises(ConversionError, match="contains the source"):
        megatron_to_hf(source / "iter_0000000", source, force=True, progress=False)
    with pytest.raises(ConversionError, match="is the source"):
        hf_to_megatron(checkpoints / "hf", checkpoints / "hf", force=True, progress=False)


# The conversion stops in its first layer until it is signalled; "ready" says the temporary directory exists.
_SLOW_CONVERSION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from megatron_tnllm.convert.cli import main
    from megatron_tnllm.convert.hf_format import HFCheckpoint

    read = HFCheckpoint.read

    def slow(self, name):
        if name.startswith("model.layers.0."):
            Path(sys.argv[3]).write_text("ready")
            time.sleep(120)
        return read(self, name)

    HFCheckpoint.read = slow
    sys.exit(main(["hf-to-megatron", sys.argv[1], sys.argv[2], "--no-progress"]))
    """
)


def _start_slow_conversion(source: Path, target: Path) -> subprocess.Popen:
    ready = target.parent / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERSION, str(source), str(target), str(ready)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion did not start"
        time.sleep(0.2)
    assert _leftovers(target.parent), "no temporary directory while converting"
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_the_temporary_directory(checkpoints, tmp_path, signum):
    target = tmp_path / "out"
    process = _start_slow_conversion(checkpoints / "hf", target)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}; nothing was written" in _one_error_line(err)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_kill_9_leftovers_are_removed_by_the_next_run(checkpoints, tmp_path, capsys):
    target = tmp_path / "out"
    process = _start_slow_conversion(checkpoints / "hf", target)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = _leftovers(tmp_path)
    marker = json.loads((tmp_path / stale / MARKER).read_text())
    assert marker["pid"] == process.pid and marker["host"] == socket.gethostname()
    megatron_to_hf(checkpoints / "megatron", tmp_path / "other", progress=False)
    assert _leftovers(tmp_path) == [] and not target.exists()
    err = capsys.readouterr().err
    assert f"removed {tmp_path / stale}, left behind by a killed conversion (pid {process.pid}" in err


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _fake_temporary(parent: Path, name: str, **marker) -> Path:
    directory = parent / name
    directory.mkdir()
    (directory / "data").write_text("x")
    if marker:
        (directory / MARKER).write_text(json.dumps({"magic": MAGIC, "host": socket.gethostname(), **marker}))
    return directory


def test_only_provably_stale_temporaries_are_removed(tmp_path):
    dead = _dead_pid()
    removed = [
        _fake_temporary(tmp_path, ".out.tmp-dead", pid=dead, target=str(tmp_path / "out")),
        _fake_temporary(tmp_path, ".out.tmp-reused", pid=os.getpid(), start="1"),  # our pid, another start time
    ]
    kept = [
        _fake_temporary(tmp_path, ".out.tmp-nomarker"),
        _fake_temporary(tmp_path, ".out.tmp-alive", pid=os.getpid(), start=staging_module._start_time(os.getpid())),
        _fake_temporary(tmp_path, ".out.tmp-alive-unknown-start", pid=os.getpid()),
        _fake_temporary(tmp_path, ".out.tmp-elsewhere", pid=dead, host="another-host"),
        _fake_temporary(tmp_path, "out.tmp-notours", pid=dead),
    ]
    (kept[0] / MARKER).write_text(json.dumps({"magic": "something else", "pid": dead, "host": socket.gethostname()}))
    assert remove_stale_temporaries(tmp_path) == removed
    assert not any(r.exists() for r in removed) and all(k.exists() for k in kept)


def test_a_target_moved_aside_by_a_killed_replacement_is_restored(tmp_path):
    old = _fake_temporary(tmp_path, ".out.old-abc", pid=_dead_pid(), target=str(tmp_path / "out"))
    (old / "out").mkdir()
    (old / "out" / "weights").write_text("previous target")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "out" / "weights").read_text() == "previous target" and not old.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_directories_follow_the_umask(checkpoints, tmp_path, umask):
    previous = os.umask(umask)
    try:
        hf_to_megatron(checkpoints / "hf", tmp_path / "megatron", progress=False)
        megatron_to_hf(checkpoints / "megatron", tmp_path / "hf", progress=False)
    finally:
        os.umask(previous)
    for root in (tmp_path / "megatron", tmp_path / "hf"):
        for path in [root, *root.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert path.stat().st_mode & 0o777 == want, f"{path}: {oct(path.stat().st_mode & 0o777)}"
        assert not (root / MARKER).exists()


def test_disk_full_says_so_and_writes_nothing(checkpoints, tmp_path, monkeypatch, capsys):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / self.files[0]))

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    target = tmp_path / "out"
    assert convert(["megatron-to-hf", str(checkpoints / "megatron"), str(target), "--no-progress"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "error: no space left on the device of" in err and "nothing was written" in err
    assert not target.exists() and _leftovers(tmp_path) == []


def test_read_only_parent_is_a_one_line_error(checkpoints, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):  # root ignores directory permissions, so the refusal is simulated
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(staging_module.tempfile, "mkdtemp", read_only)
    assert convert(["hf-to-megatron", str(checkpoints / "hf"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"error: {tmp_path}: Read-only file system; nothing was written to {tmp_path / 'out'}" == err
