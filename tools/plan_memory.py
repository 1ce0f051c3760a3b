"""Predict the peak GPU memory of a TNL pretraining layout (Megatron-Core, bf16, Adam).

    python tools/plan_memory.py --preset tnl-7b --tp 2 --sp --dp 4 --mbs 1 --seq 4096

The model is the worst pipeline stage (the first: embedding plus the most micro-batches in flight
under 1F1B) of one GPU:

* weights bf16 (2 B/param) and Megatron's fp32 gradient buffer (4 B/param);
* Adam state: fp32 master weights, m and v (12 B/param), divided by DP x CP with the distributed optimizer
  (Megatron shards it over the data-parallel group with the context-parallel ranks);
* activations saved for backward, bytes per token per layer (bf16, TNL layer as implemented here):
  token mixer ~26 D (input norm, fused qkvu output kept by SiLU, SiLU outputs, attention output,
  fp32 norm statistics, gate product, out-proj input; +8 D on an LRPE layer, whose q, k double),
  SGLU ~4 D + 6 G (norm, fc1 input, [l1; l2] output, product); divided by TP under sequence
  parallelism and by CP (each context-parallel rank holds seq / CP tokens; inside the attention it holds
  all tokens of heads / CP heads, the same bytes); with full recompute only each layer's input (2 D) is
  kept, plus one layer's full set;
* the last stage's logits and their fp32 cross-entropy gradient (~10 B per logit);
* a fixed 4 GiB for the CUDA context, NCCL buffers and allocator slack.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tnllm.configs import TNLConfig, get_preset  # noqa: E402

GiB = 1024**3
OVERHEAD = 4 * GiB


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    sp: bool = False
    mbs: int = 1
    seq: int = 2048
    num_microbatches: int = 1
    recompute: str = "none"  # "none" or "full"
    distributed_optimizer: bool = True


def activation_bytes_per_token_layer(cfg: TNLConfig, lrpe: bool = False) -> int:
    D, G = cfg.hidden_size, cfg.glu_size
    return 26 * D + (8 * D if lrpe else 0) + 4 * D + 6 * G


def plan(cfg: TNLConfig, lay: Layout) -> dict[str, float]:
    """Bytes per GPU on the first pipeline stage (and the last stage's logits if PP = 1)."""
    if cfg.num_layers % lay.pp:
        raise ValueError(f"{cfg.name}: {cfg.num_layers} layers do not split into {lay.pp} pipeline stages")
    if cfg.num_heads % (lay.tp * lay.cp):
        raise ValueError(f"{cfg.name}: {cfg.num_heads} heads do not split over TP={lay.tp} x CP={lay.cp}")
    if lay.seq % (2 * lay.cp):
        raise ValueError(f"sequence {lay.seq} does not split into 2 x CP={lay.cp} chunks (Megatron's zig-zag)")
    layers = cfg.num_layers // lay.pp
    D = cfg.hidden_size
    layer_params = 5 * D * D + 3 * D * cfg.glu_size
    params = (layers * layer_params + D * len(cfg.lrpe_layers) + cfg.vocab_size * D) / lay.tp
    optimizer_bytes = 12 / (lay.dp * lay.cp if lay.distributed_optimizer else 1)
    tokens = lay.mbs * lay.seq // lay.cp
    in_flight = min(lay.pp, lay.num_microbatches)
    act_split = lay.tp if lay.sp else 1
    full_layer = activation_bytes_per_token_layer(cfg, lrpe=True) * tokens / act_split
    if lay.recompute == "full":
        activations = in_flight * layers * 2 * D * tokens / act_split + full_layer
    elif lay.recompute == "none":
        activations = in_flight * (layers - 1) * activation_bytes_per_token_layer(cfg) * tokens / act_split
        activations += in_flight * full_layer
    else:
        raise ValueError(f"recompute must be 'none' or 'full', got {lay.recompute!r}")
    logits = 10 * tokens * cfg.vocab_size / lay.tp if lay.pp == 1 else 0.0
    parts = {
        "weights (bf16)": 2 * params,
        "gradients (fp32)": 4 * params,
        "optimizer": optimizer_bytes * params,
        "activations": activations,
        "logits": logits,
        "overhead": OVERHEAD,
    }
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (padded size)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context parallelism")
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    p.add_argument("--gbs", type=int, help="global batch size (sets the micro-batches per step)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--recompute", choices=("none", "full"), default="none")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    if args.vocab_size:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    gbs = args.gbs or args.mbs * args.dp
    if gbs % (args.mbs * args.dp):
        p.error(f"--gbs {gbs} is not a multiple of mbs x dp = {args.mbs * args.dp}")
    lay = Layout(
        args.tp, args.pp, args.dp, args.cp, args.sp, args.mbs, args.seq, gbs // (args.mbs * args.dp),
        args.recompute, not args.no_distributed_optimizer,
    )  # fmt: skip
    parts = plan(cfg, lay)
    print(
        f"{cfg.name}: TP={lay.tp} PP={lay.pp} DP={lay.dp} CP={lay.cp}{' SP' if lay.sp else ''} mbs={lay.mbs} "
        f"seq={lay.seq} recompute={lay.recompute} distributed-optimizer={lay.distributed_optimizer}"
    )
    for name, value in parts.items():
        print(f"  {name:<18} {value / GiB:8.1f} GiB")
    for gpu, mem in (("H100 80GB", 80e9), ("H200 141GB", 141e9)):
        print(f"  fits {gpu}: {'yes' if parts['total'] <= 0.95 * mem else 'no'}")


if __name__ == "__main__":
    main()
