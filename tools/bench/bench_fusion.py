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
--reps calls timed by CUDA events (op_bench.py's ``Bench``): "ms" is GPU time with the host enqueuing ahead,
as in a training step (``Bench.gpu_ms``); "ms per call" times each call from an idle GPU, launches included
(``Bench.time_ms``). GB/s counts the least traffic of the op (glu: forward 3 M F elements, backward 5 M F;
qkvu: forward 4 M L, backward 10 M L, L = D/TP; lrpe: forward 6 M L, backward 12 M L: q', k' are 2L wide) in
the GPU time, against --bandwidth.

    python tools/bench/bench_fusion.py --out DIR                 # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_fusion.py --smoke --out DIR         # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_fusion.json and DIR/bench_fusion.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from op_bench import (
    Bench,
    launcher_layouts,
    markdown_table,
    op_bench,
    op_parser,
    results_header,
    rows_by_case,
    write_report,
)

from megatron_tnllm.configs import get_preset

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
    columns = [
        "preset (TP)", "op", "tokens x width", "case", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s", "of HBM",
        "old / fused (fwd+bwd)", "fwd+bwd ms per call",
    ]  # fmt: skip
    rows = []
    for entry in results["shapes"]:
        for op in TRAFFIC:
            both = rows_by_case(entry["rows"], "op", op)
            fused_ms = both["fused"]["fwd+bwd"]["gpu_ms"]
            for case, m in both.items():
                f, fb = m["fwd"], m["fwd+bwd"]
                rows.append([
                    f"{entry['preset']} ({entry['tp']})", op, f"{f['tokens']} x {f['width']}", case,
                    f"{f['gpu_ms']:.4f}", f"{f['gb_s']:,.0f}", f"{fb['gpu_ms']:.4f}", f"{fb['gb_s']:,.0f}",
                    f"{fb['of_bandwidth']:.0%}", f"{fb['gpu_ms'] / fused_ms:.2f}", f"{fb['call_ms']:.4f}",
                ])  # fmt: skip
    return markdown_table(columns, rows)


def main() -> None:
    parser = op_parser(__doc__.split("\n\n")[0], warmup=20, reps=200, smoke="one tiny shape")
    args = parser.parse_args()
    bench = op_bench(args)
    shapes = []
    for lay in launcher_layouts(args.presets):
        cfg, tp = get_preset(lay["preset"]), lay["tp"]
        shapes.append({
            "preset": lay["preset"], "tp": tp, "tokens": lay["mbs"] * lay["seq"], "seq": lay["seq"],
            "mbs": lay["mbs"], "heads": cfg.num_heads // tp,
            "head_dim": cfg.hidden_size // cfg.num_heads, "ffn": cfg.glu_size // tp,
        })  # fmt: skip
    if args.smoke:
        shapes = [{"preset": "smoke", "tp": 1, "tokens": 16, "seq": 8, "mbs": 2, "heads": 2, "head_dim": 16, "ffn": 40}]
    results = {**results_header(args, bench), "reps": args.reps, "shapes": []}
    for s in shapes:
        M, H, d = s["tokens"], s["heads"], s["head_dim"]
        rows = measure("glu", glu_cases(), (M,), s["ffn"], H, bench, args)
        rows += measure("qkvu", qkvu_cases(H, d), (M,), H * d, H, bench, args)
        lrpe, theta = lrpe_cases(H, d, s["seq"], bench)
        rows += measure("lrpe", lrpe, (s["seq"], s["mbs"]), H * d, H, bench, args, leaves=(theta,))
        results["shapes"].append({**s, "rows": rows})
    write_report(args, "bench_fusion", results, table(results))


if __name__ == "__main__":
    main()
