"""SRMSNorm and norm + gate: the fused Triton kernels against PyTorch's norms and torch.compile, at the
per-GPU shapes of the launchers.

Shapes come from each launcher's defaults (examples/pretrain_tnl_*.{sh,sbatch}: PRESET, TP, SP, MBS, SEQ):
the layer norms see MBS*SEQ/TP rows of width D under sequence parallelism (MBS*SEQ rows otherwise); the
attention-output norm + gate sees MBS*SEQ rows of width D/TP.

Cases, bf16 in and out. Norm: ``srmsnorm`` (what the model runs: on a GPU ``rms_norm`` without a weight),
``srmsnorm[triton]`` (the Triton kernel), ``srmsnorm_torch`` (the PyTorch reference, eager) and its compiled
form, ``rms_norm`` (torch.nn.functional.rms_norm with a weight) and its compiled form, ``layer_norm`` (with
weight and bias). Gate: ``srmsnorm_gate`` (Triton, TP = 1), ``norm_gate_rstd`` (Triton, with a given rstd that
gets a gradient), ``rstd_across_tp+norm_gate_rstd`` (the TP > 1 path on one GPU, without the all-reduce:
the Triton sum of squares, the rsqrt in torch, then the Triton norm + gate), the reference eager and compiled,
``rms_norm*u`` eager. Compiled cases run after every eager one.

Each case is timed two ways, median of --reps calls with CUDA events around each call: "ms" issues the calls one
at a time, so it includes the host's time (Python, autograd, launches) wherever that exceeds the GPU's, as a
small op sees it in eager code; "GPU ms" queues the same calls behind a GPU sleep, so the host runs ahead and
the events time the kernels alone, as inside a step whose GEMMs keep the GPU busy. GB/s (from GPU ms) counts
the least traffic of the op (forward: read x [and u], write y; backward: read x, dy [and u], write dx [and du];
weights ignored), against --bandwidth. The ratio columns divide each case by the fastest PyTorch case.

    python tools/bench/bench_norms.py --out DIR                  # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_norms.py --presets all --out DIR    # every launcher
    python tools/bench/bench_norms.py --smoke --out DIR          # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_norms.json and DIR/bench_norms.md.
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
import torch.nn.functional as F


def launcher_shapes(presets: list[str] | None) -> list[dict]:
    """One entry per launcher (or those of ``presets``): {preset, tp, sp, norm: (rows, D), gate: (rows, D/TP)}."""
    from megatron_tnllm.configs import get_preset
    from megatron_tnllm.planning.step import launchers

    out = []
    for lay in launchers():
        if presets and lay["preset"] not in presets:
            continue
        tp, sp, tokens = lay["tp"], int(lay["sp"]), lay["mbs"] * lay["seq"]
        D = get_preset(lay["preset"]).hidden_size
        out.append({
            "preset": lay["preset"], "tp": tp, "sp": sp,
            "norm": (tokens // tp if sp else tokens, D), "gate": (tokens, D // tp),
        })  # fmt: skip
    missing = set(presets or []) - {s["preset"] for s in out}
    if missing:
        raise SystemExit(f"no launcher in examples/ for {sorted(missing)}")
    return sorted(out, key=lambda s: get_preset(s["preset"]).num_parameters())


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> tuple[float, float]:
    """(ms, GPU ms) of ``fn``, medians over ``reps`` calls (see the module docstring; on a CPU both are wall)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), statistics.median(times)
    out, wall_s = [], 0.0
    for ahead in (False, True):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        if ahead:  # ~2 GHz: twice the wall time the calls took one at a time, so the host enqueues them all first
            torch.cuda._sleep(int(min(2e9, 2 * 2e9 * wall_s + 1e6)))
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - start
        out.append(statistics.median(a.elapsed_time(b) for a, b in events))
    return out[0], out[1]


OURS = ("srmsnorm", "srmsnorm[triton]", "srmsnorm_gate", "norm_gate_rstd", "rstd_across_tp+norm_gate_rstd")


def cases(compile_backend: str) -> dict[str, dict[str, Callable]]:
    """{"norm": {name: fn(x, w, b)}, "gate": {name: fn(x, u, w)}}; w and b are weights of x's width."""
    from megatron_tnllm.layers.norms import rstd_across_tp
    from megatron_tnllm.ops import norm_gate_rstd, srmsnorm, srmsnorm_gate
    from megatron_tnllm.ops.srmsnorm import srmsnorm_torch

    def gate_torch(x, u, w):
        return srmsnorm_gate(x, u, 1e-6, backend="torch")

    def rms(x, w, b):
        return F.rms_norm(x, x.shape[-1:], w, 1e-6)

    def compiled(fn):
        return torch.compile(fn, backend=compile_backend, dynamic=False)

    rstds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def given_rstd(x):  # one leaf rstd [rows] per input, made once, outside the timed calls
        # keyed by id and holding x: a freed input's id can come back for the next shape's tensor
        if id(x) not in rstds or rstds[id(x)][0] is not x:
            rstds[id(x)] = (x, torch.rsqrt(x.detach().float().pow(2).mean(-1) + 1e-6).requires_grad_())
        return rstds[id(x)][1]

    return {
        "norm": {
            "srmsnorm": lambda x, w, b: srmsnorm(x, 1e-6),
            "srmsnorm[triton]": lambda x, w, b: srmsnorm(x, 1e-6, backend="triton"),
            "srmsnorm_torch": lambda x, w, b: srmsnorm_torch(x, 1e-6),
            "srmsnorm_torch+compile": compiled(lambda x, w, b: srmsnorm_torch(x, 1e-6)),
            "rms_norm": rms,
            "rms_norm+compile": compiled(rms),
            "layer_norm": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6),
        },
        "gate": {
            "srmsnorm_gate": lambda x, u, w: srmsnorm_gate(x, u, 1e-6, backend="triton"),
            "norm_gate_rstd": lambda x, u, w: norm_gate_rstd(x, u, given_rstd(x), backend="triton"),
            "rstd_across_tp+norm_gate_rstd": lambda x, u, w: norm_gate_rstd(
                x, u, rstd_across_tp(x, x.shape[-1], 1e-6, None), backend="triton"
            ),
            "srmsnorm_gate_torch": gate_torch,
            "srmsnorm_gate_torch+compile": compiled(gate_torch),
            "rms_norm*u": lambda x, u, w: rms(x, w, None) * u,
        },
    }


def measure(kind: str, name: str, fn: Callable, shape: tuple[int, int], args, device: torch.device) -> list[dict]:
    """Forward and forward + backward of one case at one shape -> two rows."""
    rows, D = shape
    dtype = getattr(torch, args.dtype)
    x = torch.randn(rows, D, device=device, dtype=dtype, requires_grad=True)
    other = torch.randn(rows, D, device=device, dtype=dtype, requires_grad=True) if kind == "gate" else None
    w = torch.ones(D, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    second = other if kind == "gate" else w
    third = w if kind == "gate" else b
    dy = torch.randn(rows, D, device=device, dtype=dtype)
    inputs = [x] if kind == "norm" else [x, other]
    element = x.element_size() * rows * D
    out = []

    def forward():
        with torch.no_grad():
            return fn(x, second, third)

    def forward_backward():
        return torch.autograd.grad(fn(x, second, third), inputs, dy)

    for mode, run, tensors in (
        ("fwd", forward, 2 if kind == "norm" else 3),
        ("fwd+bwd", forward_backward, 5 if kind == "norm" else 8),
    ):
        ms, gpu_ms = timed(run, device, args.warmup, args.reps)
        gbs = tensors * element / (gpu_ms / 1e3) / 1e9
        out.append({
            "kind": kind, "case": name, "mode": mode, "rows": rows, "width": D, "ms": ms, "gpu_ms": gpu_ms,
            "gb_s": gbs, "of_bandwidth": gbs / (args.bandwidth * 1e3),
        })  # fmt: skip
    return out


def table(results: dict) -> str:
    lines = [
        "| preset (TP) | op | rows x width | case | fwd ms | fwd GPU ms | fwd+bwd ms | fwd+bwd GPU ms "
        "| fwd+bwd GB/s | / best PyTorch: fwd, fwd+bwd | GPU: fwd, fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["shapes"]:
        for kind in ("norm", "gate"):
            both: dict[str, dict] = {}
            for r in entry["rows"]:
                if r["kind"] == kind:
                    both.setdefault(r["case"], {})[r["mode"]] = r
            best = {
                (mode, key): min(v[mode][key] for k, v in both.items() if k not in OURS)
                for mode in ("fwd", "fwd+bwd")
                for key in ("ms", "gpu_ms")
            }
            for case, m in both.items():
                f, fb = m["fwd"], m["fwd+bwd"]
                lines.append(
                    f"| {entry['preset']} ({entry['tp']}) | {kind} | {f['rows']} x {f['width']} | {case} | "
                    f"{f['ms']:.4f} | {f['gpu_ms']:.4f} | {fb['ms']:.4f} | {fb['gpu_ms']:.4f} | {fb['gb_s']:,.0f} | "
                    f"{f['ms'] / best['fwd', 'ms']:.2f}, {fb['ms'] / best['fwd+bwd', 'ms']:.2f} | "
                    f"{f['gpu_ms'] / best['fwd', 'gpu_ms']:.2f}, {fb['gpu_ms'] / best['fwd+bwd', 'gpu_ms']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="tnl-1b,tnl-7b", help="comma list of launcher presets, or 'all'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--bandwidth", type=float, default=4.25, help="HBM TB/s (H200: 4.8 peak)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, 2 tiny shapes")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when megatron_tnllm's kernels are first imported, below
        args.dtype, args.warmup, args.reps, args.compile_backend = "float32", 1, 2, "aot_eager"
    device = torch.device("cpu" if args.smoke else "cuda")
    presets = None if args.presets == "all" else args.presets.split(",")
    shapes = launcher_shapes(presets)
    if args.smoke:
        shapes = [{"preset": "smoke", "tp": 1, "sp": 0, "norm": (16, 256), "gate": (8, 128)}]
    table_cases = cases(args.compile_backend)
    results = {
        "dtype": args.dtype,
        "bandwidth_tb_s": args.bandwidth,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results["shapes"] = [{**entry, "rows": []} for entry in shapes]
    for compiled in (False, True):  # compiled cases last: nothing eager is timed after Inductor has run
        for entry in results["shapes"]:
            for kind in ("norm", "gate"):
                for name, fn in table_cases[kind].items():
                    if name.endswith("+compile") == compiled:
                        entry["rows"].extend(measure(kind, name, fn, entry[kind], args, device))
                        print(json.dumps(entry["rows"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_norms.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bench_norms.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
