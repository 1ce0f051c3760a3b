"""Predict the peak GPU memory of a TNL pretraining layout (Megatron-Core, bf16, Adam).

    python tools/plan_memory.py --preset tnl-7b --tp 2 --sp --dp 4 --mbs 1 --seq 4096
    python tools/plan_memory.py --preset tnl-175b --tp 8 --sp --pp 12 --vpp 2 --dp 2 --gbs 1536

The model is the worst pipeline stage (the first: embedding plus the most micro-batches in flight)
of one GPU:

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
* micro-batches in flight on the first stage (Megatron core_v0.19 ``get_pp_rank_microbatches``): 1F1B holds
  PP of them through its L / PP layers; the interleaved schedule (VPP model chunks of L / (PP VPP) layers
  per stage) runs 2 (PP - 1) + (VPP - 1) PP warm-up chunk forwards before its first backward, so it holds
  2 (PP - 1) + (VPP - 1) PP + 1 chunks: (1 + (PP - 1) / (PP VPP)) x L / PP layers' worth at large PP,
  more than 1F1B's; both are capped by the chunks a step has (micro-batches x VPP);
* the last stage's logits and their fp32 cross-entropy gradient (~10 B per logit);
* Adam's step: torch's foreach AdamW (Megatron's optimizer without apex or Transformer Engine) allocates
  sqrt(v) for its whole parameter group, 4 B per parameter of the shard, after backward has freed the
  activations; counted where it exceeds activations + logits (models cut to a few layers on one GPU);
* a fixed 4 GiB for the CUDA context, NCCL buffers and allocator slack.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import NoReturn

from megatron_tnllm.configs import TNLConfig, get_preset

GiB = 1024**3
OVERHEAD = 4 * GiB


@dataclass(frozen=True)
class Layout:
    """A parallel layout and schedule; ``vpp`` is the virtual pipeline size (model chunks per stage)."""

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
    vpp: int = 1

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "dp", "cp", "mbs", "seq", "num_microbatches", "vpp"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.recompute not in ("none", "full"):
            raise ValueError(f"recompute must be 'none' or 'full', got {self.recompute!r}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp {self.vpp} needs pipeline parallelism (pp >= 2), got pp 1")
        if self.vpp > 1 and self.num_microbatches % self.pp:
            # core_v0.19's interleaved schedule runs micro-batches in groups of PP
            raise ValueError(
                f"vpp {self.vpp}: {self.num_microbatches} micro-batches a step are not a multiple of pp {self.pp}"
            )

    def in_flight(self, layers_per_stage: int) -> tuple[float, int]:
        """(layers' worth of activations the first stage holds, micro-batches of its first layer held)."""
        if self.vpp == 1:
            held = min(self.pp, self.num_microbatches)
            return held * layers_per_stage, held
        chunks = min(2 * (self.pp - 1) + (self.vpp - 1) * self.pp + 1, self.num_microbatches * self.vpp)
        # chunk 0 runs PP micro-batches per group; the warm-up's tail is PP - 1 more of them
        first_chunk = min(2 * self.pp - 1, self.num_microbatches)
        return chunks * layers_per_stage / self.vpp, first_chunk


def activation_bytes_per_token_layer(cfg: TNLConfig, lrpe: bool = False) -> int:
    D, G = cfg.hidden_size, cfg.glu_size
    return 26 * D + (8 * D if lrpe else 0) + 4 * D + 6 * G


def plan(cfg: TNLConfig, lay: Layout) -> dict[str, float]:
    """Bytes per GPU on the first pipeline stage (and the last stage's logits if PP = 1)."""
    if cfg.num_layers % (lay.pp * lay.vpp):
        what = f"{lay.pp} pipeline stages" + (f" x {lay.vpp} virtual stages" if lay.vpp > 1 else "")
        raise ValueError(f"{cfg.name}: {cfg.num_layers} layers do not split into {what}")
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
    held_layers, held_first = lay.in_flight(layers)
    act_split = lay.tp if lay.sp else 1
    layer = activation_bytes_per_token_layer(cfg) * tokens / act_split
    full_layer = activation_bytes_per_token_layer(cfg, lrpe=0 in cfg.lrpe_layers) * tokens / act_split
    if lay.recompute == "full":
        activations = held_layers * 2 * D * tokens / act_split + full_layer
    else:  # the first stage's first layer may be an LRPE layer (every preset's is)
        activations = (held_layers - held_first) * layer + held_first * full_layer
    logits = 10 * tokens * cfg.vocab_size / lay.tp if lay.pp == 1 else 0.0
    adam_step = 4 * params / (lay.dp * lay.cp if lay.distributed_optimizer else 1)
    parts = {
        "weights (bf16)": 2 * params,
        "gradients (fp32)": 4 * params,
        "optimizer": optimizer_bytes * params,
        "activations": activations,
        "logits": logits,
        "adam step": max(0.0, adam_step - activations - logits),
        "overhead": OVERHEAD,
    }
    parts["total"] = sum(parts.values())
    return parts


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line (no usage block) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_layout_arguments(p: argparse.ArgumentParser, preset_required: bool = True) -> None:
    """The model and layout options shared by the memory and step-time planners."""
    p.add_argument("--preset", required=preset_required)
    p.add_argument("--vocab-size", type=positive_int, help="override the preset's vocabulary (padded size)")
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--pp", type=positive_int, default=1)
    p.add_argument("--vpp", type=positive_int, default=1, help="virtual pipeline stages (model chunks) per stage")
    p.add_argument("--dp", type=positive_int, default=1)
    p.add_argument("--cp", type=positive_int, default=1, help="context parallelism")
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--mbs", type=positive_int, default=1, help="micro-batch size")
    p.add_argument("--gbs", type=positive_int, help="global batch size (sets the micro-batches per step)")
    p.add_argument("--seq", type=positive_int, default=2048)
    p.add_argument("--recompute", choices=("none", "full"), default="none")
    p.add_argument("--no-distributed-optimizer", action="store_true")


def layout_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[TNLConfig, Layout]:
    """The preset and layout of parsed :func:`add_layout_arguments` options; ``p.error`` on a bad combination."""
    try:
        cfg = get_preset(args.preset)
    except KeyError as e:
        p.error(e.args[0])
    if args.vocab_size:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    gbs = args.gbs or args.mbs * args.dp
    if gbs % (args.mbs * args.dp):
        p.error(f"--gbs {gbs} is not a multiple of mbs x dp = {args.mbs * args.dp}")
    try:
        lay = Layout(
            args.tp, args.pp, args.dp, args.cp, args.sp, args.mbs, args.seq, gbs // (args.mbs * args.dp),
            args.recompute, not args.no_distributed_optimizer, args.vpp,
        )  # fmt: skip
        plan(cfg, lay)  # the shape checks
    except ValueError as e:
        p.error(str(e))
    return cfg, lay


def main(argv: list[str] | None = None, prog: str = "plan_memory.py") -> None:
    """The command line of ``tools/plan_memory.py``: prints the plan by part and whether it fits an H100 / H200."""
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_arguments(p)
    cfg, lay = layout_from_args(p, p.parse_args(argv))
    parts = plan(cfg, lay)
    print(
        f"{cfg.name}: TP={lay.tp} PP={lay.pp}{f' VPP={lay.vpp}' if lay.vpp > 1 else ''} DP={lay.dp} CP={lay.cp}"
        f"{' SP' if lay.sp else ''} mbs={lay.mbs} "
        f"seq={lay.seq} recompute={lay.recompute} distributed-optimizer={lay.distributed_optimizer}"
    )
    for name, value in parts.items():
        print(f"  {name:<18} {value / GiB:8.1f} GiB")
    for gpu, mem in (("H100 80GB", 80e9), ("H200 141GB", 141e9)):
        print(f"  fits {gpu}: {'yes' if parts['total'] <= 0.95 * mem else 'no'}")
