"""Predict the peak GPU memory of a TNL pretraining layout (Megatron-Core, bf16, Adam).

    python tools/plan_memory.py --preset tnl-7b --tp 2 --sp --dp 4 --mbs 1 --seq 4096
    python tools/plan_memory.py --preset tnl-175b --tp 8 --sp --pp 12 --vpp 2 --dp 2 --gbs 1536

Each pipeline stage is planned on one GPU and the worst is reported: the stage with the largest total (the first
stage on ties). For a pure TNL model that is the first stage (embedding, LRPE, the most micro-batches in flight)
unless the last stage's logits outweigh them (a large vocabulary at small PP); a hybrid's stages differ in their
softmax-attention layers (:mod:`megatron_tnllm.hybrid`). Chunk v of stage r holds layers (v PP + r) L / (PP VPP)
onwards (Megatron's even split). Per stage:

* weights bf16 (2 B/param) and Megatron's fp32 gradient buffer (4 B/param); a TNL layer has 5 D^2 + 3 D G
  parameters (qkvu, out, SGLU) and D more with LRPE, a softmax-attention layer 4 D^2 + 3 D G (qkv, out, SGLU);
  the embedding V D is on the first stage and, tied, again as the output layer on the last;
* Adam state: fp32 master weights, m and v (12 B/param), divided by DP x CP with the distributed optimizer
  (Megatron shards it over the data-parallel group with the context-parallel ranks);
* activations saved for backward, bytes per token per layer (bf16, TNL layer as implemented here, measured
  by ``tools/bench/bench_layer.py``): token mixer 20 D (the layer input kept by the input norm, the normed
  input kept by the qkvu product, the qkvu output kept by the fused split + SiLU (8 D), SiLU(q), SiLU(k) kept
  by the attention (4 D), the attention output kept by norm + gate, the gated output kept by the output
  projection; fp32 norm statistics are negligible), SGLU 4 D + 6 G (the mid-layer residual kept by its norm,
  the normed input, [l1; l2] kept by the fused product, the product); an LRPE layer adds 5.5 D (the doubled
  q', k' of the fused split), or at CP > 1, where the PyTorch LRPE runs, 14 D + 22 D / MBS (it keeps fp32
  copies and forms its fp32 angle tables per sequence position, shared by the micro-batch);
  a softmax-attention layer through SDPA's flash kernel ~14 D + 4 H in its mixer (the layer input kept by
  the input norm, the normed input, q, k, v, the output saved by SDPA and its copy saved by the output
  projection, fp32 log-sum-exp per head; nothing grows with the sequence) and the same SGLU; divided by TP
  under sequence parallelism and by CP (each context-parallel rank holds seq / CP tokens; inside the
  attention it holds all tokens of heads / CP heads, the same bytes); with full recompute only each layer's
  input (2 D) is kept, plus the stage's largest layer's full set;
* micro-batches in flight on stage r when its first backward starts (Megatron core_v0.19
  ``get_pp_rank_microbatches``): 1F1B holds PP - r of them through its L / PP layers; the interleaved schedule
  (VPP model chunks of L / (PP VPP) layers per stage) runs 2 (PP - r - 1) + (VPP - 1) PP warm-up chunk
  forwards, PP micro-batches of each chunk in turn, so the first stage holds 2 (PP - 1) + (VPP - 1) PP + 1
  chunks: (1 + (PP - 1) / (PP VPP)) x L / PP layers' worth at large PP, more than 1F1B's; both are capped by
  the chunks a step has (micro-batches x VPP);
* the last stage's logits and their cross-entropy, one micro-batch's: ~10 B per logit with Megatron's (fp32 copies
  of the logits and their gradient), 4 B with megatron_tnllm's (``--cross-entropy-fusion-impl tnl``: the bf16
  logits and their bf16 gradient);
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
# bytes held per logit on the last stage, by cross-entropy (module docstring)
LOGIT_BYTES_HELD = {"megatron": 10, "tnl": 4}


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
    cross_entropy: str = "megatron"  # "megatron" (pretrain_gpt.py's default) or "tnl" (--cross-entropy-fusion-impl tnl)
    # weight gradients added into the fp32 main gradients inside the GEMM (--gradient-accumulation-fusion; without
    # apex through patches/core_v0.19.0-wgrad-accum-fusion.patch): the step-time model's cost, not memory
    grad_accum_fusion: bool = False

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "dp", "cp", "mbs", "seq", "num_microbatches", "vpp"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.recompute not in ("none", "full"):
            raise ValueError(f"recompute must be 'none' or 'full', got {self.recompute!r}")
        if self.cross_entropy not in LOGIT_BYTES_HELD:
            raise ValueError(f"cross_entropy must be one of {tuple(LOGIT_BYTES_HELD)}, got {self.cross_entropy!r}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp {self.vpp} needs pipeline parallelism (pp >= 2), got pp 1")
        if self.vpp > 1 and self.num_microbatches % self.pp:
            # core_v0.19's interleaved schedule runs micro-batches in groups of PP
            raise ValueError(
                f"vpp {self.vpp}: {self.num_microbatches} micro-batches a step are not a multiple of pp {self.pp}"
            )

    def held(self, stage: int) -> tuple[int, ...]:
        """Micro-batches of each model chunk whose activations pipeline stage ``stage`` holds when its first
        backward starts: its warm-up forwards plus one (Megatron core_v0.19's schedules, module docstring)."""
        if self.vpp == 1:
            return (min(self.pp - stage, self.num_microbatches),)
        forwards = min(2 * (self.pp - stage - 1) + (self.vpp - 1) * self.pp + 1, self.num_microbatches * self.vpp)
        counts = [0] * self.vpp
        for k in range(forwards):  # forward k runs chunk (k mod PP VPP) // PP (groups of PP micro-batches)
            counts[k % (self.pp * self.vpp) // self.pp] += 1
        return tuple(counts)


def stage_layers(num_layers: int, pp: int, vpp: int, stage: int) -> tuple[range, ...]:
    """The 0-based global layers of each model chunk of pipeline stage ``stage``: chunk v holds
    L / (PP VPP) layers from (v PP + stage) L / (PP VPP) (Megatron's even split, its layer offset)."""
    n = num_layers // (pp * vpp)
    return tuple(range((v * pp + stage) * n, (v * pp + stage + 1) * n) for v in range(vpp))


def activation_bytes_per_token_layer(
    cfg: TNLConfig, lrpe: bool = False, softmax: bool = False, mbs: int = 1, cp: int = 1
) -> float:
    """Bytes saved for backward per token by one layer (module docstring): a TNL layer, with ``lrpe`` one with
    LRPE, with ``softmax`` a softmax-attention layer; ``mbs`` sequences per micro-batch share the PyTorch LRPE's
    angle tables, which context parallelism (``cp`` > 1) runs instead of the fused one."""
    D, G = cfg.hidden_size, cfg.glu_size
    sglu = 4 * D + 6 * G
    if softmax:
        return 14 * D + 4 * cfg.num_heads + sglu
    if not lrpe:
        lrpe_extra = 0.0
    elif cp == 1:
        # The fused split (ops/qkvu) applies LRPE itself and keeps only the doubled q', k' for the attention
        # (4 D more than SiLU's q, k) and theta's small partial sums: measured 6.0 D (tnl-1b, MBS 8) and 5.0 D
        # (tnl-7b, MBS 1) more than a plain layer (bench_layer.py, one H200, 2026-12-01); 5.5 D is within
        # 1.5 % of both layers.
        lrpe_extra = 5.5 * D
    else:
        # The PyTorch LRPE (ops/lrpe.py apply_lrpe, once for q and once for k) keeps per token x.float() (4 D)
        # and its bf16 output of twice the head width (4 D, saved by the attention instead of SiLU's 2 D), i.e.
        # 12 D more for q and k; and per sequence position the fp32 angle, cos and sin [seq, heads, head_dim] of
        # each call, 24 D, shared by the micro-batch. That derivation, 12 D + 24 D / MBS, is 12 % below the
        # measurement at tnl-1b (MBS 8: 17.0 D measured); the fit to both measurements (tnl-1b MBS 8: 17.0 D,
        # tnl-7b MBS 1: 36.5 D; bench_layer.py, one H200, 2026-12-01, when every layout ran this path) is
        # used instead, within 1.5 % of each.
        lrpe_extra = 14 * D + 22 * D / mbs
    return 20 * D + lrpe_extra + sglu


def layer_parameters(cfg: TNLConfig, softmax: bool = False) -> int:
    """Matrix parameters of one layer: qkvu (4 D^2) or, on a softmax-attention layer, qkv (3 D^2); out; SGLU."""
    D = cfg.hidden_size
    return (3 if softmax else 4) * D * D + D * D + 3 * D * cfg.glu_size


def _check(cfg: TNLConfig, lay: Layout) -> None:
    """ValueError when the model does not split into the layout."""
    if cfg.num_layers % (lay.pp * lay.vpp):
        what = f"{lay.pp} pipeline stages" + (f" x {lay.vpp} virtual stages" if lay.vpp > 1 else "")
        raise ValueError(f"{cfg.name}: {cfg.num_layers} layers do not split into {what}")
    if cfg.num_heads % (lay.tp * lay.cp):
        raise ValueError(f"{cfg.name}: {cfg.num_heads} heads do not split over TP={lay.tp} x CP={lay.cp}")
    if lay.seq % (2 * lay.cp):
        raise ValueError(f"sequence {lay.seq} does not split into 2 x CP={lay.cp} chunks (Megatron's zig-zag)")


def stage_parameters(cfg: TNLConfig, lay: Layout, stage: int) -> float:
    """Parameters one GPU of pipeline stage ``stage`` holds (all its model chunks), at tensor parallelism TP."""
    layers = [i for chunk in stage_layers(cfg.num_layers, lay.pp, lay.vpp, stage) for i in chunk]
    softmax = sum(1 for i in layers if i in cfg.softmax_layers)
    lrpe = sum(1 for i in layers if i in cfg.lrpe_layers)
    embeddings = (stage == 0) + (lay.pp > 1 and stage == lay.pp - 1)  # the tied output layer's copy
    D = cfg.hidden_size
    matrices = (len(layers) - softmax) * layer_parameters(cfg) + softmax * layer_parameters(cfg, softmax=True)
    return (matrices + D * lrpe + embeddings * cfg.vocab_size * D) / lay.tp


def plan_stage(cfg: TNLConfig, lay: Layout, stage: int) -> dict[str, float]:
    """Bytes per GPU of pipeline stage ``stage``, by part (module docstring)."""
    _check(cfg, lay)
    if not 0 <= stage < lay.pp:
        raise ValueError(f"stage {stage} outside 0..{lay.pp - 1}")
    D = cfg.hidden_size
    params = stage_parameters(cfg, lay, stage)
    optimizer_bytes = 12 / (lay.dp * lay.cp if lay.distributed_optimizer else 1)
    tokens = lay.mbs * lay.seq // lay.cp
    chunks = stage_layers(cfg.num_layers, lay.pp, lay.vpp, stage)
    held = lay.held(stage)
    # layer-micro-batches held by kind; the LRPE and softmax layers are disjoint (TNLConfig checks it)
    held_lrpe = sum(n * sum(1 for i in chunk if i in cfg.lrpe_layers) for n, chunk in zip(held, chunks, strict=True))
    held_softmax = sum(
        n * sum(1 for i in chunk if i in cfg.softmax_layers) for n, chunk in zip(held, chunks, strict=True)
    )
    held_layers = sum(n * len(chunk) for n, chunk in zip(held, chunks, strict=True))
    act_split = lay.tp if lay.sp else 1
    layer = activation_bytes_per_token_layer(cfg) * tokens / act_split
    lrpe_layer = activation_bytes_per_token_layer(cfg, lrpe=True, mbs=lay.mbs, cp=lay.cp) * tokens / act_split
    softmax_layer = activation_bytes_per_token_layer(cfg, softmax=True) * tokens / act_split
    if lay.recompute == "full":
        kinds = {
            activation_bytes_per_token_layer(
                cfg, lrpe=i in cfg.lrpe_layers, softmax=i in cfg.softmax_layers, mbs=lay.mbs, cp=lay.cp
            )
            for chunk in chunks
            for i in chunk
        }
        activations = held_layers * 2 * D * tokens / act_split + max(kinds) * tokens / act_split
    else:
        activations = (
            (held_layers - held_lrpe - held_softmax) * layer + held_lrpe * lrpe_layer + held_softmax * softmax_layer
        )
    logits = LOGIT_BYTES_HELD[lay.cross_entropy] * tokens * cfg.vocab_size / lay.tp if stage == lay.pp - 1 else 0.0
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


def worst_stage(cfg: TNLConfig, lay: Layout) -> tuple[int, dict[str, float]]:
    """(stage, its :func:`plan_stage`) of the pipeline stage with the largest total; the first on ties."""
    stages = [plan_stage(cfg, lay, r) for r in range(lay.pp)]
    stage = max(range(lay.pp), key=lambda r: (stages[r]["total"], -r))
    return stage, stages[stage]


def plan(cfg: TNLConfig, lay: Layout) -> dict[str, float]:
    """Bytes per GPU of the worst pipeline stage (:func:`worst_stage`), by part."""
    return worst_stage(cfg, lay)[1]


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
    p.add_argument(
        "--preset", required=preset_required, help="TNL or hybrid preset, e.g. tnl-1b, tnl-1b-hybrid (or tnl_1b_hybrid)"
    )
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
    p.add_argument(
        "--cross-entropy", choices=tuple(LOGIT_BYTES_HELD), default="megatron",
        help="the loss: Megatron's (pretrain_gpt.py's default) or megatron_tnllm's (--cross-entropy-fusion-impl tnl)",
    )  # fmt: skip
    p.add_argument(
        "--grad-accum-fusion", action="store_true",
        help="weight gradients added into the fp32 main gradients inside the GEMM (the launchers' default)",
    )  # fmt: skip


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
            args.recompute, not args.no_distributed_optimizer, args.vpp, args.cross_entropy, args.grad_accum_fusion,
        )  # fmt: skip
        _check(cfg, lay)
    except ValueError as e:
        p.error(str(e))
    return cfg, lay


def softmax_summary(cfg: TNLConfig) -> str:
    """ "softmax layers: N of L (indices)" for a hybrid."""
    return f"softmax layers: {len(cfg.softmax_layers)} of {cfg.num_layers} ({', '.join(map(str, cfg.softmax_layers))})"


def describe_layers(cfg: TNLConfig, lay: Layout, stage: int) -> str:
    """One line: the softmax-attention layers of the model and the pipeline stage reported (with its own)."""
    words = [softmax_summary(cfg)] if cfg.softmax_layers else []
    if lay.pp > 1:
        mine = [i for chunk in stage_layers(cfg.num_layers, lay.pp, lay.vpp, stage) for i in chunk]
        held = sum(1 for i in mine if i in cfg.softmax_layers)
        words.append(
            f"worst stage {stage} of PP={lay.pp} (0-based, the largest total)"
            + (f", {held} softmax layers" if cfg.softmax_layers else "")
        )
    return "; ".join(words)


def main(argv: list[str] | None = None, prog: str = "plan_memory.py") -> None:
    """The command line of ``tools/plan_memory.py``: prints the plan by part and whether it fits an H100 / H200."""
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_arguments(p)
    cfg, lay = layout_from_args(p, p.parse_args(argv))
    stage, parts = worst_stage(cfg, lay)
    print(
        f"{cfg.name}: TP={lay.tp} PP={lay.pp}{f' VPP={lay.vpp}' if lay.vpp > 1 else ''} DP={lay.dp} CP={lay.cp}"
        f"{' SP' if lay.sp else ''} mbs={lay.mbs} "
        f"seq={lay.seq} recompute={lay.recompute} distributed-optimizer={lay.distributed_optimizer}"
    )
    if cfg.softmax_layers or stage:
        print(f"  {describe_layers(cfg, lay, stage)}")
    for name, value in parts.items():
        print(f"  {name:<18} {value / GiB:8.1f} GiB")
    for gpu, mem in (("H100 80GB", 80e9), ("H200 141GB", 141e9)):
        print(f"  fits {gpu}: {'yes' if parts['total'] <= 0.95 * mem else 'no'}")
