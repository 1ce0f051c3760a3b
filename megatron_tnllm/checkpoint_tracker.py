"""Megatron-LM's checkpoint tracker, ``latest_checkpointed_iteration.txt``: repair the one state a kill leaves it in.

Megatron-LM (core_v0.19.0, ``megatron/training/checkpointing.py``, ``save_checkpoint``) writes a checkpoint, waits
for every rank, then rewrites the tracker *in place* with the iteration number; a start loads the iteration the
tracker names. A kill between the tracker's truncation and its write leaves it empty, and every later start of the
same command stops at once ("ERROR: Invalid metadata file"). The checkpoint whose number was being written is
complete at that moment (the tracker is written after it), and it is the newest complete one in the directory:
an interrupted save leaves its directory without ``metadata.json``, which dist_checkpointing writes last, after
every rank's data. So an empty or unreadable tracker is rewritten to name that iteration (a new file renamed over
the old one, so this write cannot leave it empty in turn). Only torch_dist checkpoints (the launchers' format)
carry that marker; with none complete the repair refuses.

    python -m megatron_tnllm.checkpoint_tracker CKPT_DIR    # the launchers run it before every start

Torch-free: it runs before the launcher imports anything heavy.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["TRACKER", "complete_iterations", "repair_tracker"]

TRACKER = "latest_checkpointed_iteration.txt"
_ITERATION_DIR = re.compile(r"iter_(\d{7,})")
_COMPLETE_MARKER = "metadata.json"  # dist_checkpointing's config file, written in the save's finalize step


def complete_iterations(ckpt_dir: Path) -> list[int]:
    """Iterations of ``ckpt_dir`` whose torch_dist checkpoint finished (``iter_NNNNNNN/metadata.json``), ascending."""
    found = []
    for entry in Path(ckpt_dir).iterdir():
        match = _ITERATION_DIR.fullmatch(entry.name)
        if match and (entry / _COMPLETE_MARKER).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def repair_tracker(ckpt_dir: Path) -> tuple[str, int] | None:
    """If ``ckpt_dir``'s tracker exists but names no iteration, point it at the newest complete checkpoint.

    Returns (what the tracker held, the iteration it names now), or None when there was nothing to repair (no
    tracker: a fresh run; or a tracker Megatron can read: a number or "release"). Raises ValueError when the
    tracker is unreadable and no complete checkpoint exists.
    """
    tracker = Path(ckpt_dir) / TRACKER
    if not tracker.is_file():
        return None
    held = tracker.read_text(errors="replace").strip()
    if held == "release" or held.isdigit():
        return None
    complete = complete_iterations(Path(ckpt_dir))
    if not complete:
        raise ValueError(
            f"{tracker} holds {held!r}, not an iteration, and {ckpt_dir} has no complete torch_dist checkpoint "
            f"(iter_NNNNNNN/{_COMPLETE_MARKER}) to name instead"
        )
    newest = complete[-1]
    partial = tracker.with_name(f"{TRACKER}.tmp")
    partial.write_text(str(newest))
    os.replace(partial, tracker)
    return held, newest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", type=Path, help="the --save/--load directory of a run")
    args = parser.parse_args(argv)
    if not args.ckpt_dir.is_dir():
        return  # a fresh run: Megatron creates it
    try:
        repaired = repair_tracker(args.ckpt_dir)
    except (ValueError, OSError) as e:
        sys.exit(f"checkpoint_tracker: {e}")
    if repaired is not None:
        held, iteration = repaired
        print(
            f"checkpoint_tracker: {args.ckpt_dir / TRACKER} held {held!r} (a run killed while Megatron rewrote it); "
            f"it now names iteration {iteration}, the newest complete checkpoint"
        )


if __name__ == "__main__":
    main()
