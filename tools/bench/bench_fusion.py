"""The fused elementwise ops around the GEMMs against the PyTorch code they replace, forward and forward + backward,
at the per-GPU shapes of the launchers.

* ``glu``: SGLU's gated product. Old: Megatron's non-fused gated MLP path (``torch.chunk``, ``x_linear + 0.0``,
  product; backward two products and the cat of chunk's backward). New: ``ops.glu.glu_product`` (Triton).
  Input [tokens, 2 F/TP].
* ``qkvu``: the token mixer's input side. Old: views of qkvu, ``F.silu`` on q and k, u sliced (backward: SiLU
  backward twice, zero-filled per-slice gradients of qkvu and their sum). New: ``ops.qkvu.qkvu_silu`` (Triton).
  Input [tokens, 4 D/TP]; the backward gets a gradient for each of q, k, v, u, as in the layer.
* ``lrpe``: the token mixer's input side on an LRPE layer. Old: ``qkvu_silu`` (Triton) then ``ops.lrpe.apply_lrpe``
  on q and k (fp32 angle tables, cos, sin, products, cat, cast; backward through autograd, theta's gradient
  included). New: ``qkvu_silu(..., theta=, positions=)`` (Triton, LRPE fused). Input [SEQ, MBS, 4 D/TP],
  positions 0..SEQ-1, theta [H/TP, 1, d] a leaf in the bench dtype (as Megatron's bf16 params); fwd+bwd takes the
  gradients of qkvu and theta.

Shapes come from each launcher's defaults (examples/pretrain_tnl_*.sh: PRESET, TP, MBS, SEQ): tokens = MBS x SEQ
(sequence parallelism gathers them before the column-parallel products), D/TP and F/TP wide. bf16, medians of
--reps calls timed by CUDA events (bench_layer.py's ``Bench``): "ms" is GPU time with the host enqueuing ahead,
as in a training step (``Bench.gpu_ms``); "ms per call" times each call from an idle GPU, launches included
(``Bench.time_ms``). GB/s counts the least traffic of the op (glu: forward 3 M F elements, backward 5 M F;
qkvu: forward 4 M L, backward 10 M L, L = D/TP; lrpe: forward 6 M L, backward 12 M L: q', k' are 2L wide) in
the GPU time, against --bandwidth.

    python tools/bench/bench_fusion.py --out DIR                 # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_fusion.py --smoke --out DIR         # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_fusion.json and DIR/bench_fusion.md.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_layer import Bench

from megatron_tnllm.configs import get_preset
from megatron_tnllm.planning.step import launchers

# elements moved per token and per unit of width (F for glu, L = D/TP for qkvu): (forward, backward)
TRAFFIC = {"glu": (3, 5), "qkvu": (4, 10), "lrpe": (6, 12)}


def glu_cases() -> dict[str, Callable]:
    """{name: fn(x [M, 2F]) -> y [M, F]}."""
    from megatron_tnllm.ops.glu import glu_product

    def old(x):
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        return x_glu * (x_linear + 0.0)

    return {"old": old, "fused": lambda x: glu_product(x, backend="triton")}


def qkvu_cases(heads: int, head_dim: int) -> dict[str, Callable]:
    """{name: fn(qkvu [M, 4L]) -> (SiLU(q), SiLU(k), v, u)}."""
    from megatron_tnllm.ops.qkvu import qkvu_silu

    L = heads * head_dim

    def old(x):
        q, k, v = x[..., : 3 * L].view(x.shape[0], 3, heads, head_dim).unbind(1)
        return F.silu(q), F.silu(k), v, x[..., 3 * L :]

    return {"old": old, "fused": lambda x: qkvu_silu(x, heads, head_dim, backend="triton")}


def lrpe_cases(heads: int, head_dim: int, seq: int, bench: Bench) -> tuple[dict[str, Callable], torch.Tensor]:
    """({name: fn(qkvu [seq, b, 4L]) -> (q', k' [seq, b, H, 2d], v, u)}, theta): LRPE at positions 0..seq-1 by
    theta [H, 1, d] (a leaf requiring its gradient)."""
    from megatron_tnllm.ops.lrpe import apply_lrpe, lrpe_theta_init
    from megatron_tnllm.ops.qkvu import qkvu_silu

    theta = lrpe_theta_init(heads, head_dim).to(bench.device, bench.dtype).requires_grad_()
    positions = torch.arange(seq, device=bench.device)

    def old(x):
        q, k, v, u = qkvu_silu(x, heads, head_dim, backend="triton")
        return apply_lrpe(q, theta, positions[:, None]), apply_lrpe(k, theta, positions[:, None]), v, u

    def fused(x):
        return qkvu_silu(x, heads, head_dim, theta=theta, positions=positions, backend="triton")

    return {"old": old, "fused": fused}, theta


def measure(
    op: str, fns: dict[str, Callable], lead: tuple[int, ...], width: int, heads: int, bench: Bench, args,
    leaves: tuple[torch.Tensor, ...] = (),
) -> list[dict]:  # fmt: skip
    """Forward and forward + backward of each case: x [*lead, 2 width] (glu) or [*lead, 4 width] (qkvu, lrpe);
    the backward takes the gradients of x and of ``leaves`` (lrpe: theta)."""
    x = bench.randn(*lead, (2 if op == "glu" else 4) * width, requires_grad=True)
    M = x.numel() // x.shape[-1]
    with torch.no_grad():
        outs = fns["old"](x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    dys = [torch.randn_like(o) for o in outs]
    fwd_el, bwd_el = TRAFFIC[op]
    rows = []
    for name, fn in fns.items():

        def forward(fn=fn):
            with torch.no_grad():
                return fn(x)

        def forward_backward(fn=fn):
            y = fn(x)
            return torch.autograd.grad(list(y) if isinstance(y, tuple) else [y], [x, *leaves], dys)

        for mode, run, elements in (("fwd", forward, fwd_el), ("fwd+bwd", forward_backward, fwd_el + bwd_el)):
            gpu_ms, call_ms = bench.gpu_ms(run), bench.time_ms(run)
            gbs = elements * M * width * x.element_size() / (gpu_ms / 1e3) / 1e9
            rows.append({
                "op": op, "case": name, "mode": mode, "tokens": M, "width": width, "heads": heads,
                "gpu_ms": gpu_ms, "call_ms": call_ms, "gb_s": gbs, "of_bandwidth": gbs / (args.bandwidth * 1e3),
            })  # fmt: skip
    return rows


def table(results: dict) -> str:
    lines = [
        "| preset (TP) | op | tokens x width | case | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | of HBM "
        "| old / fused (fwd+bwd) | fwd+bwd ms per call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["shapes"]:
        for op in TRAFFIC:
            both: dict = {}
            for r in entry["rows"]:
                if r["op"] == op:
                    both.setdefault(r["case"], {})[r["mode"]] = r
            fused_ms = both["fused"]["fwd+bwd"]["gpu_ms"]
            for case, m in both.items():
                f, fb = m["fwd"], m["fwd+bwd"]
                lines.append(
                    f"| {entry['preset']} ({entry['tp']}) | {op} | {f['tokens']} x {f['width']} | {case} | "
                    f"{f['gpu_ms']:.4f} | {f['gb_s']:,.0f} | {fb['gpu_ms']:.4f} | {fb['gb_s']:,.0f} | "
                    f"{fb['of_bandwidth']:.0%} | {fb['gpu_ms'] / fused_ms:.2f} | {fb['call_ms']:.4f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="tnl-1b,tnl-7b", help="comma list of launcher presets, or 'all'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--bandwidth", type=float, default=4.25, help="HBM TB/s (H200: 4.8 peak)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, one tiny shape")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when megatron_tnllm's kernels are first imported, below
        args.dtype, args.warmup, args.reps = "float32", 1, 2
    device = torch.device("cpu" if args.smoke else "cuda")
    bench = Bench(str(device), getattr(torch, args.dtype), args.reps, args.warmup)
    presets = None if args.presets == "all" else args.presets.split(",")
    shapes = []
    for lay in launchers():
        if presets and lay["preset"] not in presets:
            continue
        cfg, tp = get_preset(lay["preset"]), lay["tp"]
        shapes.append({
            "preset": lay["preset"], "tp": tp, "tokens": lay["mbs"] * lay["seq"], "seq": lay["seq"],
            "mbs": lay["mbs"], "heads": cfg.num_heads // tp,
            "head_dim": cfg.hidden_size // cfg.num_heads, "ffn": cfg.glu_size // tp,
        })  # fmt: skip
    missing = set(presets or []) - {s["preset"] for s in shapes}
    if missing:
        raise SystemExit(f"no launcher in examples/ for {sorted(missing)}")
    if args.smoke:
        shapes = [{"preset": "smoke", "tp": 1, "tokens": 16, "seq": 8, "mbs": 2, "heads": 2, "head_dim": 16, "ffn": 40}]
    results = {
        "dtype": args.dtype,
        "bandwidth_tb_s": args.bandwidth,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "reps": args.reps,
        "shapes": [],
    }
    for s in shapes:
        M, H, d = s["tokens"], s["heads"], s["head_dim"]
        rows = measure("glu", glu_cases(), (M,), s["ffn"], H, bench, args)
        rows += measure("qkvu", qkvu_cases(H, d), (M,), H * d, H, bench, args)
        lrpe, theta = lrpe_cases(H, d, s["seq"], bench)
        rows += measure("lrpe", lrpe, (s["seq"], s["mbs"]), H * d, H, bench, args, leaves=(theta,))
        results["shapes"].append({**s, "rows": rows})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fusion.json").write_text(json.dumps(results, indent=1) + "\n")
    md = f"{results['device']}, torch {results['torch']}, {args.dtype}, median of {args.reps}\n\n" + table(results)
    (args.out / "bench_fusion.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
