"""Predict the step time, tokens/s/GPU and MFU of a TNL pretraining layout (Megatron-Core, bf16, H200s).

    python tools/plan_step.py --preset tnl-175b --tp 8 --sp --pp 12 --vpp 2 --dp 2 --mbs 1 --gbs 1536 --seq 2048
    python tools/plan_step.py --launchers            # every examples/ launcher: the table of docs/scaling.md
    python tools/plan_step.py --launchers --layer-times layers.json   # with tools/bench/bench_layer.py's figures

Per micro-batch and layer, one GPU (tokens = MBS x SEQ / CP, widths per GPU at tensor parallelism TP):

* matrix products: 6 tokens (5 D^2 + 3 D G) / TP FLOPs at GEMM_EFFICIENCY x 989 TFLOP/s (x 4/3 with full
  recompute), or tools/bench/bench_layer.py's measured time of the same per-GPU products (``--layer-times``);
* lightning attention: ATTENTION_CALL_S + ATTENTION_S_PER_ELEMENT per token x D / TP (fitted to the fwd+bwd times
  of docs/benchmarks.md, from the launchers' per-GPU shapes, 0.14 ms at 3.1 M elements, to 7.4 ms at 537 M: the
  kernels are latency-bound at small shapes), x LRPE_ATTENTION on an LRPE layer; measured with ``--layer-times``;
* a hybrid's softmax-attention layers (:mod:`megatron_tnllm.hybrid`; always modeled, ``--layer-times`` measures
  TNL layers only): products 6 tokens (4 D^2 + 3 D G) / TP FLOPs as above, and the causal score and value
  products through SDPA's flash kernel, 3 x 2 SEQ D FLOPs per token (megatron_tnllm.flops) x tokens / TP at
  SOFTMAX_ATTENTION_FLOPS; elementwise work of D / (TP if SP else 1) + (D + 3 G) / TP per token (no SiLU, gate
  or norm in the mixer; the attention output's copy);
* the rest (norms, SiLU, gating, residuals, casts): ELEMENTWISE_S per token x (D / (TP if SP else 1)
  + (4 D + 3 G) / TP) elements, measured on tnl-1b; or the measured layer minus its products and attention;
* the weight gradients' addition into the fp32 main gradients: MAIN_GRAD_BYTES per parameter of the layer's shard
  at HBM bandwidth, unfused (a bf16 gradient, then DDP's add) or with gradient-accumulation fusion (the GEMM adds
  into the fp32 buffer); the same for the output layer on the last stage;
* the host: Megatron's local (non-Transformer-Engine) layer launches its kernels from Python; a layer's
  forward + backward never takes less than HOST_S (HOST_TP_S with tensor parallelism), calibrated on tnl-385m;
* tensor-parallel traffic (not overlapped without Transformer Engine): 8 collectives (4 forward, 4 backward:
  all-gather / reduce-scatter with SP, all-reduce = both without) of tokens x D bf16, each moving
  (TP - 1) / TP of it per GPU over NVLink (TP within a node) or InfiniBand.

Per step: the pipeline runs m = GBS / (MBS DP) micro-batches through PP stages of L / PP layers (the first holds
the LRPE layer, the last the logits: 6 tokens D V / TP FLOPs plus LOGIT_BYTES per logit for the cross entropy,
Megatron's or megatron_tnllm's; each stage is timed with its own layers, so a hybrid's stages differ by their
softmax layers), so it takes m x the slowest stage + (PP - 1) / VPP x the mean stage (1F1B's bubble, shrunk by the
interleaved schedule), plus the point-to-point activation transfers of 1F1B (tokens x D / (TP if SP) bf16 forward
and backward per micro-batch; hidden by the interleaved schedule's overlap). The data-parallel gradient
reduce-scatter (fp32) and parameter all-gather (bf16) of the distributed optimizer, (DP - 1) / DP of the stage's
parameters each, overlap the last micro-batch's backward and the first forward (--overlap-grad-reduce /
--overlap-param-gather); only what exceeds those is added (without the distributed optimizer: an fp32 all-reduce
after the step). Adam costs OPTIMIZER_BYTES per parameter shard at HBM bandwidth, and each step STEP_S of host
work (optimizer, gradient clipping, logging).

Links (stated, not measured here): NVLink 4 of an H200 is 450 GB/s per direction, NCCL reaches about
NVLINK_BW of it; across nodes each GPU has one 400 Gb/s InfiniBand NIC (8 per node), about IB_BW effective.
Rank order is Megatron's tp-cp-dp-pp: a group crosses nodes when its stride times its size exceeds the node.
Context parallelism divides the tokens; its exchange of attention states between ranks is not counted.

MFU is model FLOPs (megatron_tnllm.flops, as logged with the FLOP patch) per GPU-second over 989 TFLOP/s
(H200 dense bf16) and over the 790 TFLOP/s the H200 reached on large bf16 matrix products.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_tnllm.configs import TNLConfig, get_preset
from megatron_tnllm.flops import tnl_forward_flops_per_token
from megatron_tnllm.planning.memory import (
    GiB,
    Layout,
    OneLineParser,
    add_layout_arguments,
    layer_parameters,
    layout_from_args,
    plan,
    softmax_summary,
    stage_layers,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the launchers of the repository (editable install)

PEAK_FLOPS = 989e12  # H200 dense bf16
MATMUL_CEILING = 790e12  # large bf16 matrix products measured on the H200
HBM_BW = 4.0e12  # bytes/s reached by streaming kernels (the H200's 4.8 TB/s nominal)
NVLINK_BW = 360e9  # bytes/s per GPU per direction for NCCL within a node (450 GB/s NVLink 4, ~80 %)
IB_BW = 40e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU, ~80 %)
COLLECTIVE_LATENCY = 20e-6  # s per collective (NCCL launch and synchronisation)
GPUS_PER_NODE = 8

GEMM_EFFICIENCY = 0.75  # of PEAK_FLOPS on the layer's products (large shapes; bench_layer.py measures them)
# lightning attention fwd+bwd of one layer and micro-batch: a latency floor plus a cost per token x (D / TP) element,
# least squares in relative error over the 11 shapes of docs/benchmarks.md (3.1-537 M elements, v3 table and v4.2
# launcher shapes, one H200): every shape within 21 % (the per-element cost alone was 2.8x low at tnl-175b TP=8)
ATTENTION_CALL_S = 0.109e-3
ATTENTION_S_PER_ELEMENT = 15.1e-12
LRPE_ATTENTION = 2.58  # Dk = 2 dh against dh, fwd+bwd (docs/benchmarks.md)
# Model FLOP/s of causal softmax attention fwd+bwd through torch SDPA's flash kernel (3 x 2 s D per token;
# calibrated: the same-shape GPT of docs/training.md §4, one H200, whose step time per token grows by 291 TFLOP/s
# of attention FLOPs from 2k to 32k and by 277 from 2k to 8k)
SOFTMAX_ATTENTION_FLOPS = 290e12
# s per element per layer fwd+bwd (measured: the tnl-1b profile of docs/profile.md §1 with the fused elementwise ops
# and megatron_tnllm's cross-entropy, 184.6 ms of norm_elementwise kernels in 8 micro-batches x 16 layers of
# 444.6 M elements each, less its 33.3 ms fp32 main-gradient add, which MAIN_GRAD_BYTES counts; 3.2e-12 with it,
# 4e-12 when fitted to a step time with the per-element attention cost, 6e-12 before the fused ops)
ELEMENTWISE_S = 2.6e-12
# HBM bytes per parameter of a weight shard and micro-batch for adding its gradient into the fp32 main gradient,
# beyond the weight-gradient GEMM itself, by --gradient-accumulation-fusion (tools/bench/bench_wgrad.py, one H200,
# bf16, at HBM_BW: the tnl-1b, tnl-7b and tnl-175b launcher shapes give 14.5 / 14.5 / 14.2 B unfused and
# 2.9 / 3.5 / 4.8 B fused)
MAIN_GRAD_BYTES = {False: 14.4, True: 3.7}
HOST_S = 3.2e-3  # host floor of a layer's fwd+bwd, TP = 1 (calibrated: tnl-385m, one H200)
HOST_TP_S = 4.8e-3  # the same with tensor parallelism (calibrated: tnl-385m, TP = 2)
# HBM bytes per logit of the cross entropy fwd+bwd at HBM_BW, measured (tools/bench/bench_cross_entropy.py, tnl-1b's
# 16384 x 64000 bf16 logits, one H200): Megatron's fp32 passes 17.40 ms; megatron_tnllm's (the bf16 logits read
# once forward, once backward, their gradient written: 6 B at the floor) 1.649 ms
LOGIT_BYTES = {"megatron": 66.4, "tnl": 6.3}
OPTIMIZER_BYTES = 100  # HBM bytes per parameter shard for torch AdamW (foreach) and Megatron's copies
STEP_S = 30e-3  # host work per step: optimizer, gradient clipping, logging (calibrated: tnl-385m)
STEP_LAYER_S = 2.5e-3  # and per layer of the stage (the per-tensor loops of Megatron's no-apex fallbacks)


@dataclass(frozen=True)
class Cluster:
    """Where the layout runs: GPUs per node and whether TP / DP traffic overlaps compute."""

    gpus_per_node: int = GPUS_PER_NODE
    overlap_tp: bool = False  # Megatron overlaps TP traffic only with Transformer Engine's userbuffers
    overlap_dp: bool = True  # --overlap-grad-reduce --overlap-param-gather (the launchers' setting)


def _link(stride: int, size: int, cluster: Cluster) -> float:
    """Per-GPU bandwidth of a group of ``size`` ranks ``stride`` apart."""
    return NVLINK_BW if stride * size <= cluster.gpus_per_node else IB_BW


def _measured(layer_times: dict | None, cfg: TNLConfig, lay: Layout) -> dict | None:
    """The per-GPU shapes of tools/bench/bench_layer.py's JSON that match this preset, TP and tokens, if any."""
    if not layer_times:
        return None
    tokens = lay.mbs * lay.seq // lay.cp
    for shape in layer_times.get("launcher_shapes", {}).values():
        if shape["preset"] == cfg.name and shape["tp"] == lay.tp and shape["tokens"] == tokens:
            width = layer_times.get("widths", {}).get(cfg.name)
            return {"shape": shape, "width": width if width and width["tokens"] == tokens else None}
    return None


def softmax_layer_flops(cfg: TNLConfig, seq: int) -> tuple[int, int]:
    """Forward FLOPs per token of one softmax-attention layer (megatron_tnllm.flops): (its matrix products, the
    causal score and value products over ``seq`` tokens)."""
    D, H, G = cfg.hidden_size, cfg.num_heads, cfg.glu_size
    products = tnl_forward_flops_per_token(1, D, H, G, 0, 0, num_softmax_layers=1, seq_length=0)
    return products, tnl_forward_flops_per_token(1, D, H, G, 0, 0, num_softmax_layers=1, seq_length=seq) - products


def layer_seconds(
    cfg: TNLConfig,
    lay: Layout,
    lrpe: bool,
    layer_times: dict | None = None,
    cluster: Cluster = Cluster(),
    softmax: bool = False,
) -> dict[str, float]:
    """Seconds of one layer's forward + backward for one micro-batch on one GPU, by part: a TNL layer (with
    ``lrpe`` one with LRPE) or, with ``softmax``, a softmax-attention layer."""
    D, G, tp = cfg.hidden_size, cfg.glu_size, lay.tp
    tokens = lay.mbs * lay.seq // lay.cp
    recompute = 4 / 3 if lay.recompute == "full" else 1.0
    elements = tokens * (D / (tp if lay.sp else 1) + ((D if softmax else 4 * D) + 3 * G) / tp)
    measured = None if softmax else _measured(layer_times, cfg, lay)
    if softmax:
        products, attention_flops = softmax_layer_flops(cfg, lay.seq)
        gemm = 3 * products * tokens / tp / (GEMM_EFFICIENCY * PEAK_FLOPS) * recompute
        attention = 3 * attention_flops * tokens / tp / SOFTMAX_ATTENTION_FLOPS * recompute
        rest = ELEMENTWISE_S * elements * recompute
    elif measured:
        shape = measured["shape"]
        gemm = shape["products"]["total"]["ms"] * 1e-3 * recompute
        attention = shape["attention_lrpe_ms" if lrpe else "attention_ms"] * 1e-3 * recompute
        width = measured["width"]  # the whole layer at TP = 1: its non-GEMM time, scaled to these widths
        if width:
            full = width["tokens"] * (5 * D + 3 * G)  # `elements` at TP = 1
            rest = width["overhead_lrpe_ms" if lrpe else "overhead_ms"] * 1e-3 * elements / full * recompute
        else:
            rest = ELEMENTWISE_S * elements * recompute
    else:
        gemm = 6 * tokens * (5 * D * D + 3 * D * G) / tp / (GEMM_EFFICIENCY * PEAK_FLOPS) * recompute
        attention = (ATTENTION_CALL_S + ATTENTION_S_PER_ELEMENT * tokens * D / tp) * (LRPE_ATTENTION if lrpe else 1)
        attention *= recompute
        rest = ELEMENTWISE_S * elements * recompute
    main_grad = MAIN_GRAD_BYTES[lay.grad_accum_fusion] * layer_parameters(cfg, softmax=softmax) / tp / HBM_BW
    compute = gemm + attention + rest + main_grad
    host = (HOST_TP_S if tp > 1 else HOST_S) * recompute
    collectives = (12 if lay.recompute == "full" else 8) if tp > 1 else 0
    tp_comm = collectives * ((tp - 1) / tp * tokens * D * 2 / _link(1, tp, cluster) + COLLECTIVE_LATENCY)
    total = max(compute, host, tp_comm) if cluster.overlap_tp else max(compute, host) + tp_comm
    return {
        "gemm": gemm, "attention": attention, "other": rest, "main_grad": main_grad, "host": host, "tp_comm": tp_comm,
        "total": total,
    }  # fmt: skip


def predict(
    cfg: TNLConfig, lay: Layout, cluster: Cluster = Cluster(), layer_times: dict | None = None
) -> dict[str, float]:
    """Step time (s), tokens/s/GPU, model TFLOP/s per GPU, MFU and the parts of the step."""
    plan(cfg, lay)  # the layout checks
    D, V, tp, pp, dp, cp = cfg.hidden_size, cfg.vocab_size, lay.tp, lay.pp, lay.dp, lay.cp
    m = lay.num_microbatches
    tokens = lay.mbs * lay.seq // cp
    layers = cfg.num_layers // pp
    plain = layer_seconds(cfg, lay, False, layer_times, cluster)
    lrpe = layer_seconds(cfg, lay, True, layer_times, cluster)
    softmax = layer_seconds(cfg, lay, False, layer_times, cluster, softmax=True)
    counts = []  # (LRPE, softmax) layers of each stage, all its model chunks
    for r in range(pp):
        mine = [i for chunk in stage_layers(cfg.num_layers, pp, lay.vpp, r) for i in chunk]
        counts.append((sum(i in cfg.lrpe_layers for i in mine), sum(i in cfg.softmax_layers for i in mine)))
    layer_s = [
        (layers - n_lrpe - n_softmax) * plain["total"] + n_lrpe * lrpe["total"] + n_softmax * softmax["total"]
        for n_lrpe, n_softmax in counts
    ]
    logits = (
        6 * tokens * D * V / tp / (GEMM_EFFICIENCY * PEAK_FLOPS)
        + LOGIT_BYTES[lay.cross_entropy] * tokens * V / tp / HBM_BW
        + MAIN_GRAD_BYTES[lay.grad_accum_fusion] * V * D / tp / HBM_BW
    )
    # first, last, then the middle stages (the order of the sums below)
    stages = [layer_s[0], layer_s[-1] + logits, *layer_s[1:-1]] if pp > 1 else [layer_s[0] + logits]
    slowest, mean = max(stages), sum(stages) / len(stages)
    bubble = (pp - 1) / lay.vpp * mean
    p2p = 0.0
    if pp > 1 and lay.vpp == 1:  # blocking send/recv of 1F1B; the interleaved schedule overlaps them
        act = tokens * D * 2 / (tp if lay.sp else 1)
        p2p = m * 2 * act / _link(tp * cp * dp, pp, cluster)
    pipeline = m * slowest + bubble + p2p
    # parameters of the busiest stage (embedding and the fewest softmax layers), per GPU
    n_softmax = min(n for _, n in counts)
    params = (
        (layers - n_softmax) * layer_parameters(cfg) + n_softmax * layer_parameters(cfg, softmax=True) + V * D
    ) / tp
    shard = params / (dp * cp) if lay.distributed_optimizer else params
    link = _link(tp * cp, dp, cluster)
    ring = (dp - 1) / dp
    if dp == 1:
        dp_exposed = 0.0
    elif lay.distributed_optimizer:
        reduce_scatter = 4 * params * ring / link
        all_gather = 2 * params * ring / link
        if cluster.overlap_dp:  # behind the last backward and the first forward of a micro-batch
            dp_exposed = max(0.0, reduce_scatter - 2 / 3 * slowest) + max(0.0, all_gather - 1 / 3 * slowest)
        else:
            dp_exposed = reduce_scatter + all_gather
    else:
        all_reduce = 2 * 4 * params * ring / link
        dp_exposed = max(0.0, all_reduce - 2 / 3 * slowest) if cluster.overlap_dp else all_reduce
    optimizer = OPTIMIZER_BYTES * shard / HBM_BW
    host = STEP_S + STEP_LAYER_S * layers
    step = pipeline + dp_exposed + optimizer + host
    gpus = tp * pp * dp * cp
    global_tokens = lay.mbs * lay.seq * m * dp
    per_token = tnl_forward_flops_per_token(
        cfg.num_layers,
        D,
        cfg.num_heads,
        cfg.glu_size,
        V,
        len(cfg.lrpe_layers),
        num_softmax_layers=len(cfg.softmax_layers),
        seq_length=lay.seq,
    )
    flops = 3 * per_token * global_tokens
    per_gpu = flops / step / gpus
    return {
        "gpus": gpus,
        "step_s": step,
        "tokens_per_s_per_gpu": global_tokens / step / gpus,
        "tflops_per_gpu": per_gpu / 1e12,
        "mfu": per_gpu / PEAK_FLOPS,
        "mfu_of_matmul_ceiling": per_gpu / MATMUL_CEILING,
        "days_per_trillion_tokens": 1e12 / (global_tokens / step) / 86400,
        "pipeline_s": pipeline,
        "bubble_s": bubble,
        "p2p_s": p2p,
        "dp_exposed_s": dp_exposed,
        "optimizer_s": optimizer,
        "step_host_s": host,
        "layer_s": plain["total"],
        "layer_gemm_s": plain["gemm"],
        "layer_tp_comm_s": plain["tp_comm"],
        "softmax_layer_s": softmax["total"],
        "softmax_attn_s": softmax["attention"],
        "logits_s": logits,
    }


_DEFAULT = re.compile(r"\$\{(\w+):=([^}]*)\}")


def launchers(directory: Path = EXAMPLES) -> list[dict]:
    """The layouts of examples/pretrain_tnl_*.sh / .sbatch: their ``${VAR:=default}`` values over those of
    common.sh, and SBATCH nodes."""
    common = directory / "common.sh"
    defaults = dict(_DEFAULT.findall(common.read_text())) if common.exists() else {}
    out = []
    for path in sorted(directory.glob("pretrain_tnl_*")):
        text = path.read_text()
        values = {**defaults, **dict(_DEFAULT.findall(text))}
        nodes = re.search(r"^#SBATCH --nodes=(\d+)", text, re.M)
        out.append({
            "name": path.name,
            "preset": values["PRESET"],
            "nodes": int(nodes.group(1)) if nodes else 1,
            "gpus_per_node": int(values.get("GPUS_PER_NODE", GPUS_PER_NODE)),
            "tp": int(values["TP"]), "pp": int(values["PP"]), "vpp": int(values.get("VPP", 1)),
            "cp": int(values.get("CP", 1)), "sp": values["SP"] == "1",
            "mbs": int(values["MBS"]), "gbs": int(values["GBS"]), "seq": int(values["SEQ"]),
            "recompute": values["RECOMPUTE"], "distopt": values["DISTOPT"] == "1",
            "cross_entropy": values.get("CROSS_ENTROPY", "megatron"),
            "grad_accum_fusion": values.get("GRAD_ACCUM_FUSION", "0") == "1",
        })  # fmt: skip
    order = {name: i for i, name in enumerate(("tnl-385m", "tnl-1b", "tnl-3b", "tnl-7b", "tnl-13b", "tnl-65b"))}
    return sorted(out, key=lambda lay: order.get(lay["preset"], len(order)))


def launcher_layout(lay: dict) -> Layout:
    gpus = lay["nodes"] * lay["gpus_per_node"]
    dp = gpus // (lay["tp"] * lay["pp"] * lay["cp"])
    return Layout(
        tp=lay["tp"], pp=lay["pp"], dp=dp, cp=lay["cp"], sp=lay["sp"], mbs=lay["mbs"], seq=lay["seq"],
        num_microbatches=lay["gbs"] // (lay["mbs"] * dp), recompute=lay["recompute"],
        distributed_optimizer=lay["distopt"], vpp=lay["vpp"], cross_entropy=lay["cross_entropy"],
        grad_accum_fusion=lay["grad_accum_fusion"],
    )  # fmt: skip


def launcher_table(layer_times: dict | None = None, vocab_size: int = 64000) -> str:
    """The Markdown table of docs/scaling.md: every launcher's GPUs, memory and predicted speed."""
    rows = [
        "| launcher | GPUs | TP / PP / VPP / DP, SP | micro-batches | GiB per GPU | step s | tokens/s/GPU "
        "| TFLOP/s/GPU | MFU (989) | of 790 | bubble | days per 10^12 tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lay in launchers():
        cfg = get_preset(lay["preset"]).replace(vocab_size=vocab_size)
        layout = launcher_layout(lay)
        r = predict(cfg, layout, Cluster(lay["gpus_per_node"]), layer_times)
        memory = plan(cfg, layout)["total"] / GiB
        rows.append(
            f"| `{lay['name']}` | {r['gpus']} | {layout.tp} / {layout.pp} / {layout.vpp} / {layout.dp}"
            f"{', SP' if layout.sp else ''} | {layout.num_microbatches} | {memory:.0f} | {r['step_s']:.2f} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.0f} | {r['mfu']:.1%} "
            f"| {r['mfu_of_matmul_ceiling']:.1%} | {r['bubble_s'] / r['step_s']:.1%} "
            f"| {r['days_per_trillion_tokens']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None, prog: str = "plan_step.py") -> int:
    """The command line of ``tools/plan_step.py``: one layout's prediction, or the table of every launcher."""
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launchers", action="store_true", help="print the prediction for every launcher of examples/")
    p.add_argument("--layer-times", type=Path, help="tools/bench/bench_layer.py layers JSON (measured per-layer times)")
    p.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    p.add_argument("--overlap-tp", action="store_true", help="TP traffic hidden behind compute (Transformer Engine)")
    p.add_argument("--no-overlap-dp", action="store_true", help="DP reduce-scatter / all-gather not overlapped")
    p.add_argument("--vocab-size-table", type=int, default=64000, help="with --launchers: the vocabulary")
    add_layout_arguments(p, preset_required=False)
    args = p.parse_args(argv)
    if args.launchers == (args.preset is not None):
        p.error("expected either --preset (and a layout) or --launchers")
    layer_times = None
    if args.layer_times:
        try:
            layer_times = json.loads(args.layer_times.read_text())
        except (OSError, ValueError) as e:
            p.error(f"cannot read --layer-times {args.layer_times}: {e}")
    if args.gpus_per_node < 1:
        p.error(f"--gpus-per-node {args.gpus_per_node}: expected a positive integer")
    if args.launchers:
        print(launcher_table(layer_times, args.vocab_size_table))
        return 0
    cfg, lay = layout_from_args(p, args)
    r = predict(cfg, lay, Cluster(args.gpus_per_node, args.overlap_tp, not args.no_overlap_dp), layer_times)
    print(
        f"{cfg.name}: {r['gpus']} GPUs, step {r['step_s']:.3f} s, {r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
        f"{r['tflops_per_gpu']:.0f} TFLOP/s/GPU, MFU {r['mfu']:.1%} of 989 ({r['mfu_of_matmul_ceiling']:.1%} of 790), "
        f"{r['days_per_trillion_tokens']:.1f} days per 10^12 tokens"
    )
    keys = ["pipeline_s", "bubble_s", "p2p_s", "dp_exposed_s", "optimizer_s", "layer_s", "layer_gemm_s",
            "layer_tp_comm_s", "logits_s"]  # fmt: skip
    if cfg.softmax_layers:
        print(f"  {softmax_summary(cfg)}")
        keys[-1:-1] = ["softmax_layer_s", "softmax_attn_s"]
    for key in keys:
        print(f"  {key:<16} {r[key] * 1e3:10.2f} ms")
    return 0
