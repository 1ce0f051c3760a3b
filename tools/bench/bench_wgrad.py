"""Weight gradients with and without gradient-accumulation fusion, at the per-GPU shapes of the launchers.

Each linear weight of a TNL layer (qkvu, out, SGLU fc1, fc2) and the output layer gets, per micro-batch,
``main_grad += grad_output^T @ input`` with ``input`` ``[tokens, k]`` (the full sequence: sequence parallelism
gathers it before the weight gradient) and ``main_grad`` fp32 ``[n, k]`` (the weight's shard at the launcher's TP).
Cases, bf16 operands:

* ``unfused``: what Megatron does without ``--gradient-accumulation-fusion``: the bf16 gradient from a GEMM, then
  DDP's ``main_grad.add_(grad)`` (two kernels, the gradient written and read back);
* ``fused``: ``megatron_tnllm.ops.wgrad_accum.wgrad_gemm_accum_fp32`` (what the patched Megatron calls with the
  flag): one cuBLAS GEMM adding into the fp32 buffer;
* ``gemm``: the bf16 GEMM alone (no accumulation), the compute floor of both.

GPU time of each (``op_bench.Bench.gpu_ms``: calls queued behind a GPU sleep, as inside a training step), the
GEMM's TFLOP/s, and the per-step saving of fused over unfused for all weights of the model (layers x micro-batches
of the launcher's step on one GPU: a pipeline stage's layers, GBS / (MBS x DP) micro-batches, the output layer
on the last stage). Errors: relative to the fp64 product, for both.

    python tools/bench/bench_wgrad.py --out DIR                      # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_wgrad.py --presets all --out DIR        # every launcher

Writes DIR/bench_wgrad.json and DIR/bench_wgrad.md.
"""

from __future__ import annotations

import torch
from op_bench import launcher_layouts, markdown_table, op_bench, op_parser, results_header, write_report

from megatron_tnllm.configs import get_preset
from megatron_tnllm.ops.wgrad_accum import wgrad_gemm_accum_fp32


def weight_shapes(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    """{weight: (n, k)} of one TNL layer's linear weights and the output layer at tensor-parallel size ``tp``."""
    p = get_preset(preset)
    D, F, V = p.hidden_size, p.glu_size, p.vocab_size
    return {
        "qkvu": (4 * D // tp, D),
        "out": (D, D // tp),
        "fc1": (2 * F // tp, D),
        "fc2": (D, F // tp),
        "lm_head": (V // tp, D),
    }


def time_weight(bench, tokens: int, n: int, k: int) -> tuple[dict, dict]:
    """GPU ms of the three cases for one weight ``[n, k]`` and ``tokens`` rows, and the relative errors of the
    fused and unfused gradients against fp64."""
    x, dy = bench.randn(tokens, k), bench.randn(tokens, n)
    main_grad = torch.randn(n, k, device=bench.device)
    ms = {
        "unfused": bench.gpu_ms(lambda: main_grad.add_(dy.t() @ x)),
        "fused": bench.gpu_ms(lambda: wgrad_gemm_accum_fp32(x, dy, main_grad)),
        "gemm": bench.gpu_ms(lambda: dy.t() @ x),
    }
    want = dy.double().t() @ x.double()
    fused = torch.zeros_like(main_grad)
    wgrad_gemm_accum_fp32(x, dy, fused)
    err = {
        "fused": ((fused.double() - want).norm() / want.norm()).item(),
        "unfused": (((dy.t() @ x).double() - want).norm() / want.norm()).item(),
    }
    return ms, err


def main() -> None:
    parser = op_parser(__doc__.split("\n\n")[0], warmup=5, reps=30, smoke="tiny shapes")
    args = parser.parse_args()
    bench = op_bench(args)
    if args.smoke:
        layouts = [{"preset": "tnl-tiny", "nodes": 1, "gpus_per_node": 1, "tp": 1, "pp": 1, "cp": 1, "mbs": 1,
                    "seq": 64, "gbs": 2}]  # fmt: skip
    else:
        layouts = launcher_layouts(args.presets)
    rows, table = [], []
    for lay in layouts:
        tokens = lay["mbs"] * lay["seq"]
        layers = get_preset(lay["preset"]).num_layers // lay["pp"]  # a pipeline stage's layers
        dp = lay["nodes"] * lay["gpus_per_node"] // (lay["tp"] * lay["pp"] * lay["cp"])
        micro = lay["gbs"] // (lay["mbs"] * dp)
        saved_ms = 0.0
        for name, (n, k) in weight_shapes(lay["preset"], lay["tp"]).items():
            ms, err = time_weight(bench, tokens, n, k)
            tflops = 2 * tokens * n * k / ms["gemm"] / 1e9
            count = micro * (1 if name == "lm_head" else layers)
            saved_ms += count * (ms["unfused"] - ms["fused"])
            rows.append({**lay, "weight": name, "n": n, "k": k, "tokens": tokens, "ms": ms, "err": err,
                         "gemm_tflops": tflops, "calls_per_step": count})  # fmt: skip
            table.append([
                f"{lay['preset']} (TP={lay['tp']})", name, f"{tokens} x {n} x {k}",
                f"{ms['unfused']:.4f}", f"{ms['fused']:.4f}", f"{ms['gemm']:.4f}", f"{tflops:.0f}",
                f"{ms['unfused'] / ms['fused']:.2f}", f"{err['unfused']:.1e} / {err['fused']:.1e}",
            ])  # fmt: skip
        table.append([f"{lay['preset']} (TP={lay['tp']})", "step", f"{micro} micro-batches", "", "", "", "",
                      f"saves {saved_ms:.1f} ms", ""])  # fmt: skip
    results = {**results_header(args, bench), "rows": rows}
    columns = ["preset", "weight", "tokens x n x k", "unfused ms", "fused ms", "GEMM alone ms", "GEMM TFLOP/s",
               "unfused / fused", "error unfused / fused"]  # fmt: skip
    write_report(args, "bench_wgrad", results, markdown_table(columns, table))


if __name__ == "__main__":
    main()
