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

Each case is timed two ways, median of --reps calls with CUDA events around each call (op_bench.py's
``Bench``): "ms" (``Bench.eager_ms``) issues the calls one at a time, so it includes the host's time (Python,
autograd, launches) wherever that exceeds the GPU's, as a small op sees it in eager code; "GPU ms"
(``Bench.gpu_ms``) queues the same calls behind a GPU sleep, so the host runs ahead and the events time the
kernels alone, as inside a step whose GEMMs keep the GPU busy. GB/s (from GPU ms) counts
the least traffic of the op (forward: read x [and u], write y; backward: read x, dy [and u], write dx [and du];
weights ignored), against --bandwidth. The ratio columns divide each case by the fastest PyTorch case.

    python tools/bench/bench_norms.py --out DIR                  # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_norms.py --presets all --out DIR    # every launcher
    python tools/bench/bench_norms.py --smoke --out DIR          # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_norms.json and DIR/bench_norms.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from op_bench import Bench, launcher_layouts, markdown_table, op_bench, op_parser, results_header, rows_by_case


def launcher_shapes(presets: str) -> list[dict]:
    """One entry per launcher of the comma list ``presets`` ("all": every one): {preset, tp, sp, norm: (rows, D),
    gate: (rows, D/TP)}."""
    from megatron_tnllm.configs import get_preset

    out = []
    for lay in launcher_layouts(presets):
        tp, sp, tokens = lay["tp"], int(lay["sp"]), lay["mbs"] * lay["seq"]
        D = get_preset(lay["preset"]).hidden_size
        out.append({
            "preset": lay["preset"], "tp": tp, "sp": sp,
            "norm": (tokens // tp if sp else tokens, D), "gate": (tokens, D // tp),
        })  # fmt: skip
    return sorted(out, key=lambda s: get_preset(s["preset"]).num_parameters())


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


def measure(kind: str, name: str, fn: Callable, shape: tuple[int, int], args, bench: Bench) -> list[dict]:
    """Forward and forward + backward of one case at one shape -> two rows."""
    rows, D = shape
    device, dtype = bench.device, bench.dtype
    x = bench.randn(rows, D, requires_grad=True)
    other = bench.randn(rows, D, requires_grad=True) if kind == "gate" else None
    w = torch.ones(D, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    second = other if kind == "gate" else w
    third = w if kind == "gate" else b
    dy = bench.randn(rows, D)
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
        ms, gpu_ms = bench.eager_ms(run), bench.gpu_ms(run)
        gbs = tensors * element / (gpu_ms / 1e3) / 1e9
        out.append({
            "kind": kind, "case": name, "mode": mode, "rows": rows, "width": D, "ms": ms, "gpu_ms": gpu_ms,
            "gb_s": gbs, "of_bandwidth": gbs / (args.bandwidth * 1e3),
        })  # fmt: skip
    return out


def table(results: dict) -> str:
    columns = [
        "preset (TP)", "op", "rows x width", "case", "fwd ms", "fwd GPU ms", "fwd+bwd ms", "fwd+bwd GPU ms",
        "fwd+bwd GB/s", "/ best PyTorch: fwd, fwd+bwd", "GPU: fwd, fwd+bwd",
    ]  # fmt: skip
    rows = []
    for entry in results["shapes"]:
        for kind in ("norm", "gate"):
            both = rows_by_case(entry["rows"], "kind", kind)
            best = {
                (mode, key): min(v[mode][key] for k, v in both.items() if k not in OURS)
                for mode in ("fwd", "fwd+bwd")
                for key in ("ms", "gpu_ms")
            }
            for case, m in both.items():
                f, fb = m["fwd"], m["fwd+bwd"]
                rows.append([
                    f"{entry['preset']} ({entry['tp']})", kind, f"{f['rows']} x {f['width']}", case,
                    f"{f['ms']:.4f}", f"{f['gpu_ms']:.4f}", f"{fb['ms']:.4f}", f"{fb['gpu_ms']:.4f}",
                    f"{fb['gb_s']:,.0f}",
                    f"{f['ms'] / best['fwd', 'ms']:.2f}, {fb['ms'] / best['fwd+bwd', 'ms']:.2f}",
                    f"{f['gpu_ms'] / best['fwd', 'gpu_ms']:.2f}, {fb['gpu_ms'] / best['fwd+bwd', 'gpu_ms']:.2f}",
                ])  # fmt: skip
    return markdown_table(columns, rows)


def main() -> None:
    parser = op_parser(__doc__.split("\n\n")[0], warmup=10, reps=50, smoke="2 tiny shapes")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    bench = op_bench(args)
    if args.smoke:
        args.compile_backend = "aot_eager"
    shapes = launcher_shapes(args.presets)
    if args.smoke:
        shapes = [{"preset": "smoke", "tp": 1, "sp": 0, "norm": (16, 256), "gate": (8, 128)}]
    table_cases = cases(args.compile_backend)
    results = results_header(args, bench)
    results["shapes"] = [{**entry, "rows": []} for entry in shapes]
    for compiled in (False, True):  # compiled cases last: nothing eager is timed after Inductor has run
        for entry in results["shapes"]:
            for kind in ("norm", "gate"):
                for name, fn in table_cases[kind].items():
                    if name.endswith("+compile") == compiled:
                        entry["rows"].extend(measure(kind, name, fn, entry[kind], args, bench))
                        print(json.dumps(entry["rows"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_norms.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bench_norms.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
