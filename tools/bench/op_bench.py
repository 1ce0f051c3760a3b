"""What the op and layer benchmarks share: the ``Bench`` timer (bench_layer.py, bench_fusion.py, bench_norms.py,
bench_skinny.py),
and the command line, device, launcher shapes and Markdown table of the two op benchmarks (bench_fusion.py,
bench_norms.py).

Three timings, medians of ``iters`` calls after ``warmup`` calls, CUDA events on a GPU (wall clock on the CPU):

* ``time_ms``: each call from an idle GPU (synchronised after every call), so launch latency is included even
  where the GPU is the bottleneck: the cost of one isolated call.
* ``eager_ms``: the calls issued back to back without synchronising, so the host's time (Python, autograd,
  launches) counts wherever it exceeds the GPU's: the rate of a small op in eager code.
* ``gpu_ms``: the calls queued behind a GPU sleep, so the host runs ahead and the events time the kernels alone,
  as inside a training step whose GEMMs keep the GPU busy.
* ``graph_ms``: a list of calls captured into one CUDA graph and replayed, per call: no host time at all, as in a
  recorded decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


class Bench:
    """Device, dtype and the median timers of the module docstring."""

    def __init__(self, device: str, dtype: torch.dtype, iters: int, warmup: int) -> None:
        self.device, self.dtype, self.iters, self.warmup = torch.device(device), dtype, iters, warmup
        self.cuda = self.device.type == "cuda"

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median ms of one call started on an idle GPU."""
        return self._median_ms(fn, self._synchronised_ms)

    def eager_ms(self, fn: Callable[[], object]) -> float:
        """Median ms of a call among ``iters`` issued back to back (host time included where it dominates)."""
        return self._median_ms(fn, lambda f: self._queued_ms(f, self.iters))

    def _median_ms(self, fn: Callable[[], object], gpu_times: Callable[[Callable[[], object]], list[float]]) -> float:
        """After the warm-up calls: the median of ``gpu_times(fn)`` on a GPU, of ``iters`` wall times on the CPU."""
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            return statistics.median(gpu_times(fn))
        times = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _synchronised_ms(self, fn: Callable[[], object]) -> list[float]:
        times = []
        for _ in range(self.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    def gpu_ms(self, fn: Callable[[], object], batch: int = 20) -> float:
        """Median GPU ms of ``fn`` with the host running ahead, as in a training step: a sleep kernel holds the
        stream while ``batch`` calls are enqueued, so the events time the kernels and not the launches (host time
        of the calls, measured one at a time first, sizes the sleep). On the CPU: ``time_ms``."""
        if not self.cuda:
            return self.time_ms(fn)
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(self.device)
        host_s = time.perf_counter() - t0
        times: list[float] = []
        while len(times) < self.iters:
            n = min(batch, self.iters - len(times))
            sleep_cycles = int(min(2e9, 2 * 2e9 * host_s * n + 1e6))  # cycles at ~2 GHz: twice the enqueue time
            times += self._queued_ms(fn, n, sleep_cycles)
        return statistics.median(times)

    def _queued_ms(self, fn: Callable[[], object], n: int, sleep_cycles: int = 0) -> list[float]:
        """ms of each of ``n`` calls enqueued without synchronising, behind a GPU sleep of ``sleep_cycles``."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.synchronize(self.device)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def graph_ms(self, calls: list[Callable[[], object]]) -> float:
        """Median ms per call of ``calls`` captured into one CUDA graph, over ``iters`` replays (warmed and compiled
        on a side stream first). On the CPU: one pass over the calls, timed."""
        if not self.cuda:
            t0 = time.perf_counter()
            for fn in calls:
                fn()
            return (time.perf_counter() - t0) * 1e3 / len(calls)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in calls:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        graph.replay()
        times = []
        for _ in range(self.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(calls))
        return statistics.median(times)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def randn(self, *shape: int, requires_grad: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return x.requires_grad_(requires_grad)


def op_parser(description: str, warmup: int, reps: int, smoke: str) -> argparse.ArgumentParser:
    """The op benchmarks' options: --out, --presets, --dtype, --warmup, --reps, --bandwidth, --smoke."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="tnl-1b,tnl-7b", help="comma list of launcher presets, or 'all'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--bandwidth", type=float, default=4.25, help="HBM TB/s (H200: 4.8 peak)")
    parser.add_argument("--smoke", action="store_true", help=f"CPU, Triton interpreter, {smoke}")
    return parser


def op_bench(args: argparse.Namespace) -> Bench:
    """The timer of parsed :func:`op_parser` options; --smoke: the CPU, the Triton interpreter, float32, one
    warm-up call and two timed ones. Call before megatron_tnllm's kernels are imported (they read
    TRITON_INTERPRET then)."""
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.dtype, args.warmup, args.reps = "float32", 1, 2
    return Bench("cpu" if args.smoke else "cuda", getattr(torch, args.dtype), args.reps, args.warmup)


def rows_by_case(rows: list[dict], field: str, value: str) -> dict[str, dict[str, dict]]:
    """{case: {mode: row}} of the result rows whose ``field`` is ``value``, in the order measured."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r[field] == value:
            out.setdefault(r["case"], {})[r["mode"]] = r
    return out


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of ``columns`` and the cells of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def launcher_layouts(presets: str) -> list[dict]:
    """The launchers of examples/ (planning.step.launchers) of the comma list ``presets`` ("all": every one);
    exits naming any preset without a launcher."""
    from megatron_tnllm.planning.step import launchers

    wanted = None if presets == "all" else presets.split(",")
    out = [lay for lay in launchers() if not wanted or lay["preset"] in wanted]
    missing = set(wanted or []) - {lay["preset"] for lay in out}
    if missing:
        raise SystemExit(f"no launcher in examples/ for {sorted(missing)}")
    return out


def results_header(args: argparse.Namespace, bench: Bench) -> dict:
    """The first keys of an op benchmark's JSON: dtype, bandwidth, device name, torch version."""
    return {
        "dtype": args.dtype,
        "bandwidth_tb_s": args.bandwidth,
        "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
        "torch": torch.__version__,
    }


def write_report(args: argparse.Namespace, name: str, results: dict, table_md: str) -> None:
    """``args.out``/NAME.json (the results) and NAME.md (device, torch, dtype and repetitions above the table),
    and the markdown on stdout."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    md = f"{results['device']}, torch {results['torch']}, {args.dtype}, median of {args.reps}\n\n" + table_md
    (args.out / f"{name}.md").write_text(md)
    print(md)
