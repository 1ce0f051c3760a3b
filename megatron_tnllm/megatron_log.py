"""Read Megatron-LM training logs: per-iteration loss, time and TFLOP/s, and peak memory.

    python tools/megatron_log.py LOG [LOG ...]                 # one JSON summary per log
    python tools/megatron_log.py --compare REF LOG [...] --iters 1-20 [--tol 2e-2]

``--compare`` prints the loss of each iteration in the range for every log beside the reference
and the largest relative difference; it exits 1 if a difference exceeds ``--tol`` or an iteration
is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
LOSS = re.compile(r"lm loss: ([\d.E+-]+)")
TFLOPS = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)")
BATCH = re.compile(r"global batch size:\s+(\d+)")
MEMORY = re.compile(r"max allocated: ([\d.]+)")


def _undo_first_interval_average(first: dict, second: dict, n: int) -> None:
    """Megatron-LM (core_v0.19.0 training_log) logs a process's first iteration without resetting its
    accumulators, so the next log line averages that iteration with the ``n`` iterations of its own interval.
    Recover the interval's own mean loss and time (and the TFLOP/s that goes with that time)."""
    if "loss" in first and "loss" in second:
        second["loss"] = ((n + 1) * second["loss"] - first["loss"]) / n
    ms = ((n + 1) * second["ms"] - first["ms"]) / n
    if "tflops" in second and ms > 0:
        second["tflops"] *= second["ms"] / ms
    second["ms"] = ms


def parse(path: Path) -> dict:
    """{"iterations": {i: {"loss", "ms", "tflops", "batch"}}, "max_allocated_mb": float | None}.

    Values are per log interval, with the second line after each (re)start corrected for Megatron's carried
    first-iteration accumulators (see ``_undo_first_interval_average``); a restart is a line whose iteration
    does not exceed the previous one, or the first line of the file."""
    iterations, peak = {}, None
    start = previous = None
    for line in path.read_text(errors="replace").splitlines():
        if m := ITERATION.search(line):
            i, entry = int(m.group(1)), {"ms": float(m.group(2))}
            for key, pattern, cast in (("loss", LOSS, float), ("tflops", TFLOPS, float), ("batch", BATCH, int)):
                if found := pattern.search(line):
                    entry[key] = cast(found.group(1))
            if previous is None or i <= previous:
                start = i
            elif previous == start:
                _undo_first_interval_average(iterations[start], entry, i - start)
            iterations[i] = entry
            previous = i
        elif m := MEMORY.search(line):
            peak = max(peak or 0.0, float(m.group(1)))
    return {"iterations": iterations, "max_allocated_mb": peak}


def summary(path: Path, skip: int = 3) -> dict:
    """Median time and TFLOP/s over the logged iterations after the first ``skip`` ones of the log (warm-up;
    a resumed log's first lines too), and peak memory."""
    log = parse(path)
    ordered = [v for _, v in sorted(log["iterations"].items())]
    its = ordered[skip:] or ordered
    out = {"log": str(path), "iterations": len(log["iterations"]), "max_allocated_mb": log["max_allocated_mb"]}
    if its:
        out["median_ms"] = statistics.median(v["ms"] for v in its)
        if all("tflops" in v for v in its):
            out["median_tflops"] = statistics.median(v["tflops"] for v in its)
        losses = [v["loss"] for _, v in sorted(log["iterations"].items()) if "loss" in v]
        if losses:
            out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    return out


def compare(reference: Path, others: list[Path], first: int, last: int, tol: float) -> bool:
    ref = parse(reference)["iterations"]
    runs = {p: parse(p)["iterations"] for p in others}
    print("iter  " + "  ".join(f"{p.stem[:14]:>14}" for p in [reference, *others]))
    worst = {p: 0.0 for p in others}
    ok = True
    for i in range(first, last + 1):
        row = [ref.get(i, {}).get("loss")]
        for p in others:
            loss = runs[p].get(i, {}).get("loss")
            row.append(loss)
            if loss is None or row[0] is None:
                ok = False
            else:
                worst[p] = max(worst[p], abs(loss - row[0]) / abs(row[0]))
        print(f"{i:4d}  " + "  ".join(f"{x:14.6f}" if x is not None else f"{'missing':>14}" for x in row))
    for p, w in worst.items():
        print(f"{p.name}: max relative loss difference {w:.2e} over iterations {first}-{last} (tolerance {tol:g})")
        ok &= w <= tol
    return ok


def main() -> None:
    """The command line of ``tools/megatron_log.py`` (exits 1 when ``--compare`` finds a difference)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--compare", action="store_true", help="the first log is the reference")
    p.add_argument("--iters", default="1-20", help="FIRST-LAST iterations to compare")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative loss difference allowed")
    args = p.parse_args()
    if args.compare:
        first, last = (int(x) for x in args.iters.split("-"))
        sys.exit(0 if compare(args.logs[0], args.logs[1:], first, last, args.tol) else 1)
    for log in args.logs:
        print(json.dumps(summary(log)))
