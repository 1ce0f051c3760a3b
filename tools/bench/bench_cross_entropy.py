"""The language-model loss at the launchers' per-GPU shapes: Megatron's vocab-parallel cross-entropy (the default
path of ``pretrain_gpt.py``), its "native" fused variant (``--cross-entropy-loss-fusion``) and
``megatron_tnllm.ops.cross_entropy`` (``--cross-entropy-fusion-impl tnl`` with the patch of ``patches/``), forward
and forward + backward.

Shapes come from each launcher's defaults (examples/pretrain_tnl_*.sh: PRESET, TP, MBS, SEQ): logits
[SEQ, MBS, V / TP] in bf16, V the preset's vocabulary padded as Megatron pads it (``padded_vocab_size``, divisible
by 128 x TP), targets uniform over the vocabulary. One process plays the tensor-parallel rank 0 (a one-rank group:
the all-reduces of [tokens]-sized vectors are not timed). "ms" is GPU time with the host enqueuing ahead
(``Bench.gpu_ms`` of op_bench.py); the floor is the least traffic of the op at --bandwidth: the logits read once
forward; read once and the gradient written once backward. Peak is the most memory allocated during one
fwd+bwd call beyond the logits and their gradient.

    python tools/bench/bench_cross_entropy.py --out DIR                 # tnl-1b and tnl-7b launcher shapes
    python tools/bench/bench_cross_entropy.py --smoke --out DIR         # CPU, Triton interpreter, one tiny shape

Writes DIR/bench_cross_entropy.json and DIR/bench_cross_entropy.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from op_bench import Bench, launcher_layouts, markdown_table, op_bench, op_parser, results_header, write_report

from megatron_tnllm.configs import get_preset, padded_vocab_size


def cases(group: dist.ProcessGroup) -> dict[str, Callable]:
    """{name: fn(logits [s, b, V], target [s, b]) -> loss [s, b]}."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_cross_entropy

    from megatron_tnllm.ops.cross_entropy import vocab_parallel_cross_entropy

    def own(x: torch.Tensor) -> torch.Tensor:
        # Megatron's functions subtract the max and exponentiate in place on their fp32 copy of the logits, which
        # for fp32 logits (--smoke) is the input itself
        return x.clone() if x.dtype == torch.float32 else x

    return {
        "megatron": lambda x, t: megatron_cross_entropy(own(x), t, tp_group=group),
        "megatron_native_fused": lambda x, t: fused_vocab_parallel_cross_entropy(own(x), t, group),
        "tnl": lambda x, t: vocab_parallel_cross_entropy(x, t, group, backend="triton"),
    }


def measure(fns: dict[str, Callable], seq: int, mbs: int, vocab: int, bench: Bench, bandwidth: float) -> list[dict]:
    logits = bench.randn(seq, mbs, vocab) * 2
    logits.requires_grad_()
    target = torch.randint(0, vocab, (seq, mbs), device=bench.device)
    dloss = torch.rand(seq, mbs, device=bench.device) / (seq * mbs)
    nbytes = logits.numel() * logits.element_size()
    with torch.no_grad():
        reference = fns["megatron"](logits, target)
    rows = []
    for name, fn in fns.items():

        def forward(fn=fn):
            with torch.no_grad():
                return fn(logits, target)

        def forward_backward(fn=fn):
            return torch.autograd.grad(fn(logits, target), logits, dloss)

        loss_err = ((forward() - reference).abs().max() / reference.abs().max()).item()
        before = bench.allocated()
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        forward_backward()
        peak = (torch.cuda.max_memory_allocated(bench.device) if bench.cuda else 0) - before - nbytes
        for mode, run, floor_bytes in (("fwd", forward, nbytes), ("fwd+bwd", forward_backward, 3 * nbytes)):
            gpu_ms = bench.gpu_ms(run)
            floor_ms = floor_bytes / (bandwidth * 1e12) * 1e3
            rows.append({
                "case": name, "mode": mode, "tokens": seq * mbs, "vocab": vocab, "gpu_ms": gpu_ms,
                "floor_ms": floor_ms, "of_floor": gpu_ms / floor_ms, "peak_extra_gib": peak / 2**30,
                "loss_max_rel_diff_to_megatron": loss_err,
            })  # fmt: skip
    return rows


def table(results: dict) -> str:
    columns = [
        "preset (TP)", "tokens x V/TP", "case", "fwd ms", "fwd+bwd ms", "fwd+bwd / floor", "Megatron / this (fwd+bwd)",
        "extra peak GiB", "loss vs Megatron",
    ]  # fmt: skip
    rows = []
    for entry in results["shapes"]:
        by = {(r["case"], r["mode"]): r for r in entry["rows"]}
        base = by[("megatron", "fwd+bwd")]["gpu_ms"]
        for case in dict.fromkeys(r["case"] for r in entry["rows"]):
            f, fb = by[(case, "fwd")], by[(case, "fwd+bwd")]
            rows.append([
                f"{entry['preset']} ({entry['tp']})", f"{f['tokens']} x {f['vocab']}", case, f"{f['gpu_ms']:.3f}",
                f"{fb['gpu_ms']:.3f}", f"{fb['of_floor']:.2f}x", f"{base / fb['gpu_ms']:.2f}x",
                f"{fb['peak_extra_gib']:.2f}", f"{f['loss_max_rel_diff_to_megatron']:.1e}",
            ])  # fmt: skip
    return markdown_table(columns, rows)


def main() -> None:
    parser = op_parser(__doc__.split("\n\n")[0], warmup=5, reps=30, smoke="one tiny shape")
    args = parser.parse_args()
    bench = op_bench(args)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if bench.cuda else "gloo", rank=0, world_size=1)
    group = dist.new_group([0])
    shapes = []
    for lay in launcher_layouts(args.presets):
        cfg, tp = get_preset(lay["preset"]), lay["tp"]
        vocab = padded_vocab_size(cfg.vocab_size, 128, tp) // tp
        shapes.append({"preset": lay["preset"], "tp": tp, "seq": lay["seq"], "mbs": lay["mbs"], "vocab": vocab})
    if args.smoke:
        shapes = [{"preset": "smoke", "tp": 1, "seq": 8, "mbs": 2, "vocab": 300}]
    results = {**results_header(args, bench), "reps": args.reps, "shapes": []}
    fns = cases(group)
    for s in shapes:
        rows = measure(fns, s["seq"], s["mbs"], s["vocab"], bench, args.bandwidth)
        results["shapes"].append({**s, "rows": rows})
        torch.cuda.empty_cache() if bench.cuda else None
    dist.destroy_process_group()
    write_report(args, "bench_cross_entropy", results, table(results))


if __name__ == "__main__":
    main()
