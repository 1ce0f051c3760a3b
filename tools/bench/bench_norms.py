"""SRMSNorm and norm + gate: the fused Triton kernels against PyTorch's norms and torch.compile, at the
per-GPU shapes of the launchers.

Shapes come from each launcher's defaults (examples/pretrain_tnl_*.{sh,sbatch}: PRESET, TP, SP, MBS, SEQ):
the layer norms see MBS*SEQ/TP rows of width D under sequence parallelism (MBS*SEQ rows otherwise); the
attention-output norm + gate sees MBS*SEQ rows of width D/TP (under TP its rstd spans ranks; the kernel that
runs there, ``norm_gate_rstd``, moves the same bytes as ``srmsnorm_gate`` measured here).

Cases, bf16 in and out: ``srmsnorm`` (ours: Triton), ``srmsnorm_torch`` (the PyTorch reference, eager),
``srmsnorm_torch+compile``, ``rms_norm`` (torch.nn.functional.rms_norm with a weight) and its compiled form,
``layer_norm`` (with weight and bias); for the gate ``srmsnorm_gate`` (ours), the reference eager and compiled,
``rms_norm*u`` eager. The last column divides each case's forward + backward time by the fastest case that is
not ours. Forward, and forward + backward. GB/s counts the least traffic of the op (forward:
read x [and u], write y; backward: read x, dy [and u], write dx [and du]; weights ignored), against
--bandwidth.

    python tools/bench/bench_norms.py --out DIR                  # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_norms.py --presets all --out DIR    # every launcher
    python tools/bench/bench_norms.py --smoke --out DIR          # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_norms.json and DIR/bench_norms.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = re.compile(r'"\$\{(\w+):=([^}"]*)\}"')


def launcher_shapes(presets: list[str] | None) -> list[dict]:
    """One entry per launcher (or those of ``presets``): {preset, tp, norm: (rows, D), gate: (rows, D/TP)}."""
    from megatron_tnllm.configs import get_preset

    out = []
    for path in sorted([*ROOT.glob("examples/pretrain_tnl_*.sh"), *ROOT.glob("examples/pretrain_tnl_*.sbatch")]):
        env = dict(DEFAULT.findall(path.read_text()))
        if "PRESET" not in env or (presets and env["PRESET"] not in presets):
            continue
        tp, sp, tokens = int(env["TP"]), int(env["SP"]), int(env["MBS"]) * int(env["SEQ"])
        D = get_preset(env["PRESET"]).hidden_size
        out.append({
            "preset": env["PRESET"], "tp": tp, "sp": sp,
            "norm": (tokens // tp if sp else tokens, D), "gate": (tokens, D // tp),
        })  # fmt: skip
    missing = set(presets or []) - {s["preset"] for s in out}
    if missing:
        raise SystemExit(f"no launcher in examples/ for {sorted(missing)}")
    return sorted(out, key=lambda s: get_preset(s["preset"]).num_parameters())


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def cases(compile_backend: str) -> dict[str, dict[str, Callable]]:
    """{"norm": {name: fn(x, w, b)}, "gate": {name: fn(x, u, w)}}; w and b are weights of x's width."""
    from megatron_tnllm.ops import srmsnorm, srmsnorm_gate
    from megatron_tnllm.ops.srmsnorm import srmsnorm_torch

    def gate_torch(x, u, w):
        return srmsnorm_gate(x, u, 1e-6, backend="torch")

    def rms(x, w, b):
        return F.rms_norm(x, x.shape[-1:], w, 1e-6)

    def compiled(fn):
        return torch.compile(fn, backend=compile_backend, dynamic=False)

    return {
        "norm": {
            "srmsnorm": lambda x, w, b: srmsnorm(x, 1e-6, backend="triton"),
            "srmsnorm_torch": lambda x, w, b: srmsnorm_torch(x, 1e-6),
            "srmsnorm_torch+compile": compiled(lambda x, w, b: srmsnorm_torch(x, 1e-6)),
            "rms_norm": rms,
            "rms_norm+compile": compiled(rms),
            "layer_norm": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6),
        },
        "gate": {
            "srmsnorm_gate": lambda x, u, w: srmsnorm_gate(x, u, 1e-6, backend="triton"),
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
        ms = timed(run, device, args.warmup, args.reps)
        gbs = tensors * element / (ms / 1e3) / 1e9
        out.append({
            "kind": kind, "case": name, "mode": mode, "rows": rows, "width": D, "ms": ms, "gb_s": gbs,
            "of_bandwidth": gbs / (args.bandwidth * 1e3),
        })  # fmt: skip
    return out


def table(results: dict) -> str:
    lines = [
        "| preset (TP) | op | rows x width | case | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s "
        "| fwd+bwd / best PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["shapes"]:
        for kind in ("norm", "gate"):
            rows = [r for r in entry["rows"] if r["kind"] == kind]
            both = {}
            for r in rows:
                both.setdefault(r["case"], {})[r["mode"]] = r
            ours = "srmsnorm" if kind == "norm" else "srmsnorm_gate"
            torch_best = min(v["fwd+bwd"]["ms"] for k, v in both.items() if k != ours)
            for case, m in both.items():
                f, fb = m["fwd"], m["fwd+bwd"]
                lines.append(
                    f"| {entry['preset']} ({entry['tp']}) | {kind} | {f['rows']} x {f['width']} | {case} | "
                    f"{f['ms']:.4f} | {f['gb_s']:,.0f} | {fb['ms']:.4f} | {fb['gb_s']:,.0f} | "
                    f"{fb['ms'] / torch_best:.2f} |"
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
        "shapes": [],
    }
    for entry in shapes:
        entry = {**entry, "rows": []}
        for kind in ("norm", "gate"):
            for name, fn in table_cases[kind].items():
                entry["rows"].extend(measure(kind, name, fn, entry[kind], args, device))
                print(json.dumps(entry["rows"][-1]), flush=True)
        results["shapes"].append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_norms.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bench_norms.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
