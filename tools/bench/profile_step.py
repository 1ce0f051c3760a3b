"""Where one training step of a TNL preset spends its time: a torch-profiler breakdown by category.

The model is Megatron-Core's GPTModel from ``megatron_tnllm.models.build_model`` at this process group's TP
(sequence parallel when TP > 1), bf16 weights, Megatron's DistributedDataParallel (fp32 gradient buffers) and
DistributedOptimizer (Adam, clipping at 1.0), ``--micro-batches`` micro-batches of MBS x SEQ random tokens per
step with the loss inside the model, as ``pretrain_gpt.py`` runs them (``--loss``: megatron_tnllm's cross-entropy,
the launchers' default, which needs patches/ applied to the installed Megatron; Megatron's fused "native" one; or
Megatron's unfused one; ``--grad-accum-fusion``, the default as in pretrain_gpt.py: weight gradients added into the
fp32 buffers inside the GEMM, which without apex needs patches/ too). After the timed steps (no profiler),
one more step is profiled; every GPU kernel is given one category by its name and the operators that launched it:

    communication        NCCL kernels (TP all-gathers / reduce-scatters, gradient and norm all-reduces)
    optimizer            inside the optimizer step (Adam, gradient norm and clipping, parameter copies)
    cross_entropy        the vocab-parallel cross-entropy, forward and backward
    lightning_attention  the lightning-attention kernels and their autograd function
    gemm                 matrix multiplications (cuBLAS, CUTLASS)
    norm_elementwise     every other computing kernel: SRMSNorm, SiLU, gate, LRPE, residual adds, casts
    memory               copies and fills
    idle                 the profiled step's span with no kernel running (launch gaps, host work, waits)

    python tools/bench/profile_step.py --out DIR                     # tnl-1b, 1 GPU, MBS 8 x 2048, 8 micro-batches
    torchrun --nproc-per-node 2 tools/bench/profile_step.py --preset tnl-7b --tp 2 --mbs 1 --seq 4096 --out DIR
    python tools/bench/profile_step.py --smoke --loss megatron --no-grad-accum-fusion --out DIR  # tnl-tiny, CPU

Writes DIR/profile_<preset>_tp<TP>_rank<R>.json (categories, top kernels, step time, tokens/s, model TFLOP/s)
and, with --trace, the chrome trace beside it; rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

CATEGORIES = (
    "gemm",
    "lightning_attention",
    "norm_elementwise",
    "cross_entropy",
    "optimizer",
    "communication",
    "memory",
    "idle",
)
OPTIMIZER_RANGE = "profile_step::optimizer"
STEP_RANGE = "profile_step::step"
CROSS_ENTROPY_KERNELS = ("_row_stats_kernel", "_logits_grad_kernel")
LOSS_CONFIG = {  # --loss: the TransformerConfig fields that choose it (pretrain_gpt.py's options of the same names)
    "tnl": dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="tnl"),
    "native": dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native"),
    "megatron": dict(cross_entropy_loss_fusion=False),
}
LIGHTNING_KERNELS = ("_fwd_sweep_kernel", "_rev_sweep_kernel", "_seg_local_kernel", "_seg_scan_kernel")
GEMM_NAMES = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "splitk")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
COMM_NAMES = (
    "nccl",
    "c10d::",
    "gloo",
    "all_reduce",
    "allreduce",
    "all_gather",
    "allgather",
    "reduce_scatter",
    "reducescatter",
)


def category(name: str, stack: list[str], kind: str) -> str:
    """The category of one unit of work: ``name`` (a kernel, or a CPU operator in --smoke), the names of the
    operators and ranges around its launch (outermost first), ``kind`` "kernel", "memcpy", "memset" or "op"."""
    lower = name.lower()
    outer = " ".join(stack).lower()
    if any(c in lower for c in COMM_NAMES) or (kind == "op" and any(c in outer for c in COMM_NAMES)):
        return "communication"
    if OPTIMIZER_RANGE in stack:
        return "optimizer"
    if "crossentropy" in outer or "crossentropy" in lower or any(k in name for k in CROSS_ENTROPY_KERNELS):
        return "cross_entropy"
    if any(k in name for k in LIGHTNING_KERNELS) or "lightningattention" in outer:
        return "lightning_attention"
    if kind in ("memcpy", "memset") or lower.startswith(("aten::copy_", "aten::fill_", "aten::zero_")):
        return "memory"
    if any(g in lower for g in GEMM_NAMES) or (kind == "op" and lower.startswith(GEMM_OPS)):
        return "gemm"
    return "norm_elementwise"


def _enclosing(ranges: list[dict], points: list[dict]) -> list[list[dict]]:
    """For each point event, the ``ranges`` on its thread that enclose it (outermost first; ranges on a thread
    nest properly), by one sweep per thread."""
    by_thread: dict[tuple, tuple[list, list]] = {}
    for r in ranges:
        by_thread.setdefault((r["pid"], r["tid"]), ([], []))[0].append(r)
    for i, p in enumerate(points):
        by_thread.setdefault((p["pid"], p["tid"]), ([], []))[1].append(i)
    out: list[list[dict]] = [[] for _ in points]
    for rs, idx in by_thread.values():
        rs.sort(key=lambda r: (r["ts"], -r["dur"]))
        idx.sort(key=lambda i: points[i]["ts"])
        stack: list[dict] = []
        j = 0
        for i in idx:
            p = points[i]
            while j < len(rs) and rs[j]["ts"] <= p["ts"]:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < rs[j]["ts"]:
                    stack.pop()
                stack.append(rs[j])
                j += 1
            reach = p["ts"] + p.get("dur", 0)
            out[i] = [r for r in stack if r is not p and r["ts"] + r["dur"] >= reach]
    return out


def work_items(trace: dict, on_gpu: bool) -> tuple[list[dict], float, float]:
    """(items, span_us, busy_us) of the profiled step: each item {name, kind, us, category}.

    GPU: every kernel, memcpy and memset, with the operators around the host call that launched it (matched by
    correlation id); span from the step's first to its last kernel; busy = union of their intervals.
    CPU (--smoke): every operator's self time (its duration less its children's); span = the step range;
    busy = sum of self times."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    ranges = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    step = [e for e in ranges if e["name"] == STEP_RANGE]
    if not step:
        raise RuntimeError(f"the trace has no '{STEP_RANGE}' range; the profiled step did not run")
    lo, hi = step[0]["ts"], step[0]["ts"] + step[0]["dur"]
    items = []
    if on_gpu:
        kinds = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
        launches = {
            e["args"]["correlation"]: e
            for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
        }
        gpu = [e for e in events if e.get("cat") in kinds and launches.get(e["args"].get("correlation")) is not None]
        gpu = [e for e in gpu if lo <= launches[e["args"]["correlation"]]["ts"] <= hi]
        around = _enclosing(ranges, [launches[e["args"]["correlation"]] for e in gpu])
        for e, enclosing in zip(gpu, around, strict=True):
            kind, names = kinds[e["cat"]], [r["name"] for r in enclosing]
            items.append(
                {"name": e["name"], "kind": kind, "us": e["dur"], "category": category(e["name"], names, kind)}
            )
        intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu)
        busy, end = 0.0, None
        for a, b in intervals:
            if end is None or a > end:
                busy += b - a
                end = b
            elif b > end:
                busy += b - end
                end = b
        span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
        return items, span, busy
    ops = [e for e in ranges if e.get("cat") == "cpu_op" and lo <= e["ts"] <= hi]
    around = _enclosing(ranges, ops)
    children: dict[int, float] = {}
    for e, enclosing in zip(ops, around, strict=True):  # charge each op's time to its innermost enclosing op
        parents = [r for r in enclosing if r.get("cat") == "cpu_op"]
        if parents:
            children[id(parents[-1])] = children.get(id(parents[-1]), 0.0) + e["dur"]
    for e, enclosing in zip(ops, around, strict=True):
        self_us = max(0.0, e["dur"] - children.get(id(e), 0.0))
        names = [r["name"] for r in enclosing]
        items.append({"name": e["name"], "kind": "op", "us": self_us, "category": category(e["name"], names, "op")})
    busy = sum(i["us"] for i in items)
    return items, hi - lo, min(busy, hi - lo)


def breakdown(items: list[dict], span_us: float, busy_us: float, top: int = 20) -> dict:
    """Per category ms and % of the span (idle = span - busy), and the ``top`` kernels by time."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[tuple, float] = {}
    for it in items:
        ms[it["category"]] += it["us"] / 1e3
        key = (it["category"], it["name"][:120])
        per_name[key] = per_name.get(key, 0.0) + it["us"] / 1e3
    # overlapping kernels (communication beside compute) are counted in full; idle is what nothing covers
    ms["idle"] = max(0.0, span_us - busy_us) / 1e3
    span_ms = span_us / 1e3
    rows = {c: {"ms": round(ms[c], 3), "percent": round(100 * ms[c] / span_ms, 2) if span_ms else 0.0} for c in ms}
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "span_ms": round(span_ms, 3),
        "categories": rows,
        "top": [{"category": c, "name": n, "ms": round(t, 3)} for (c, n), t in ranked],
    }


def table(result: dict) -> str:
    lines = [f"{'category':<22}{'ms':>10}{'%':>8}"]
    for c, row in result["categories"].items():
        lines.append(f"{c:<22}{row['ms']:>10.2f}{row['percent']:>8.1f}")
    lines.append(f"{'profiled span':<22}{result['span_ms']:>10.2f}")
    lines.append("")
    lines.append(f"top kernels ({'operators' if result['device'] == 'cpu' else 'GPU'}):")
    for t in result["top"]:
        lines.append(f"  {t['ms']:>9.2f} ms  {t['category']:<20} {t['name'][:90]}")
    return "\n".join(lines)


def init(args) -> torch.device:
    """Process group (torchrun's, or a single process), Megatron's parallel state and RNG; returns the device."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = not args.smoke
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.cpu_shims, as the CPU demo does
        from tests.cpu_shims import apply_ddp_cpu_shims

        apply_ddp_cpu_shims()
        device = torch.device("cpu")
    backend = "nccl" if on_gpu else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the world size {dist.get_world_size()}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    torch.manual_seed(1234)
    if on_gpu:
        model_parallel_cuda_manual_seed(1234)
    return device


def check_patches(args) -> None:
    """--loss tnl and --grad-accum-fusion need their patches (or apex) in the Megatron this process imports."""
    from megatron_tnllm.megatron_patches import describe, missing

    needs = (["cross-entropy"] if args.loss == "tnl" else []) + (
        ["wgrad-accum-fusion"] if args.grad_accum_fusion else []
    )
    lacking = missing(needs)
    if lacking:
        raise SystemExit(
            f"the installed Megatron lacks:\n{describe(lacking)}\napply patches/ to it "
            "(tools/gpu_checks/offline_gpu_setup.sh does), or pass --loss native / --no-grad-accum-fusion"
        )


def build(args, device: torch.device):
    """(DDP model, Megatron optimizer, TNLConfig) as pretrain_gpt.py builds them with --bf16 and the
    distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tnllm.models import build_model, resolve_config

    overrides = dict(
        params_dtype=torch.bfloat16,
        bf16=True,
        sequence_parallel=args.tp > 1,
        gradient_accumulation_fusion=args.grad_accum_fusion,
        **LOSS_CONFIG[args.loss],
    )
    if args.smoke:
        overrides["use_cpu_initialization"] = True
    tnl, _ = resolve_config(args.preset)
    module = build_model(args.preset, **overrides)
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False, bucket_size=None
    )
    model = DistributedDataParallel(module.config, ddp, module)
    config = OptimizerConfig(
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.1,
        clip_grad=1.0,
        bf16=True,
        params_dtype=torch.bfloat16,
        use_distributed_optimizer=True,
    )
    return model, get_megatron_optimizer(config, [model]), tnl


def batches(args, vocab: int, device: torch.device) -> list[tuple]:
    """``--micro-batches`` (ids, position_ids, labels) of [MBS, SEQ], the same on every rank."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, vocab, (args.mbs, args.seq + 1), generator=g)
        positions = torch.arange(args.seq).expand(args.mbs, -1)
        out.append(tuple(t.contiguous().to(device) for t in (tokens[:, :-1], positions, tokens[:, 1:])))
    return out


def train_step(model, optimizer, data: list[tuple]) -> None:
    """One optimizer step over the micro-batches (loss = mean token cross-entropy, averaged over them)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    for ids, positions, labels in data:
        loss = model(ids, positions, None, labels=labels).float().mean() / len(data)
        loss.backward()
    model.finish_grad_sync()
    with torch.profiler.record_function(OPTIMIZER_RANGE):
        ok, _, _ = optimizer.step()
    if not ok:
        raise RuntimeError("the optimizer skipped the step (non-finite gradients)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tnl-1b")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (sequence parallel when > 1)")
    parser.add_argument("--mbs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batches", type=int, default=8, help="per step (the 1b launcher: 512 / 8 GPUs / 8)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps before the profiled one (first is warm-up)")
    parser.add_argument("--loss", choices=tuple(LOSS_CONFIG), default="tnl", help="cross-entropy (default: tnl)")
    parser.add_argument(
        "--grad-accum-fusion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weight gradients added into the fp32 main gradients inside the GEMM (default: on)",
    )
    parser.add_argument("--trace", action="store_true", help="also keep the chrome trace")
    parser.add_argument("--smoke", action="store_true", help="tnl-tiny on CPU, 2 x 64 tokens, 2 micro-batches")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.mbs, args.seq, args.micro_batches, args.steps = "tnl-tiny", 2, 64, 2, 2
    for name in ("tp", "mbs", "seq", "micro_batches", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")

    from megatron_tnllm.flops import tnl_forward_flops_per_token

    check_patches(args)
    device = init(args)
    rank = dist.get_rank()
    model, optimizer, tnl = build(args, device)
    data = batches(args, tnl.vocab_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, data)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            train_step(model, optimizer, data)
            sync()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{args.preset}_tp{args.tp}_rank{rank}"
    trace_path = args.out / f"trace_{stem}.json"
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    if not args.trace:
        trace_path.unlink()
    items, span, busy = work_items(trace, device.type == "cuda")
    result = breakdown(items, span, busy)
    step_ms = statistics.median(times[1:] or times)
    tokens = args.mbs * args.seq * args.micro_batches * dist.get_world_size() // args.tp
    per_token = tnl_forward_flops_per_token(
        tnl.num_layers, tnl.hidden_size, tnl.num_heads, tnl.glu_size, tnl.vocab_size, len(tnl.lrpe_layers)
    )
    result.update(
        preset=args.preset,
        tp=args.tp,
        world_size=dist.get_world_size(),
        rank=rank,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        mbs=args.mbs,
        seq=args.seq,
        micro_batches=args.micro_batches,
        loss=args.loss,
        grad_accum_fusion=args.grad_accum_fusion,
        optimizer=type(optimizer).__name__,
        step_ms_unprofiled=round(step_ms, 3),
        step_ms_all=[round(t, 3) for t in times],
        tokens_per_s=round(tokens / step_ms * 1e3, 1),
        model_tflops_per_gpu=round(3 * per_token * tokens / (step_ms / 1e3) / dist.get_world_size() / 1e12, 1),
        peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    )
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    if rank == 0:
        print(
            f"{args.preset} TP={args.tp} (world {dist.get_world_size()}), MBS {args.mbs} x {args.seq} x "
            f"{args.micro_batches} micro-batches, {args.loss} loss, gradient-accumulation fusion "
            f"{'on' if args.grad_accum_fusion else 'off'}: {step_ms:.1f} ms/step unprofiled, "
            f"{result['tokens_per_s']:,.0f} tokens/s, {result['model_tflops_per_gpu']} model TFLOP/s per GPU, "
            f"peak {result['peak_gib']} GiB"
        )
        print(table(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
