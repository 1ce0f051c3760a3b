"""Time TNL layers and their matrix products on one GPU; or train a real-width model cut to what fits.

    python tools/bench/bench_layer.py layers --json layers.json            # real widths + the launchers' per-GPU shapes
    python tools/bench/bench_layer.py model --preset tnl-175b --json model.json    # as many 175B-width layers as fit
    python tools/bench/bench_layer.py layers --device cpu --presets tnl-tiny --launchers tnl-385m --tokens 64   # smoke

``layers``: for every preset of ``--presets`` (default tnl-385m, tnl-1b, tnl-7b, tnl-65b, tnl-175b), one
Megatron-Core TNL ``TransformerLayer`` (this package's spec, TP=1, bf16, random input of the preset's launcher
micro-batch: MBS x SEQ tokens) forward + backward, plain and with LRPE; beside it the layer's four projections
as bare matrix products (forward x W^T, backward dY W and dY^T X) and the lightning-attention kernel forward +
backward, so that ``overhead`` = layer - products - attention is the non-GEMM work (norms, SiLU, gating,
LRPE, residuals, casts). Then, for every launcher of ``--launchers`` (examples/), the per-GPU shapes at its
TP: the same products with 4D/TP, G/TP outputs (D/TP, G/TP inputs of the row-parallel ones) on the full
MBS x SEQ tokens (sequence parallelism gathers them before each product) and the kernel on H/TP heads. A TNL
layer needs heads x head_dim = hidden, so those are not built as a layer. ``activation_bytes_per_token`` is
what one layer's forward leaves allocated for backward, per token (tools/plan_memory.py assumes 24 D + 6 G,
+14 D + 22 D / MBS with LRPE, counting the layer's input, 2 D, which this allocates before the forward).

``model``: ``megatron_tnllm.models.build_model`` at the preset's real width with ``--layers`` layers (default:
the most that tools/plan_memory.py fits into 90 % of the GPU), Megatron DDP (fp32 gradient buffer) and the
distributed optimizer (torch AdamW, fp32 master weights), ``--steps`` steps of MBS x SEQ random tokens; prints
the peak allocated memory against the plan (without its fixed 4 GiB allowance for context and NCCL) and the
step times. Everything is printed as one JSON object (and written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from op_bench import Bench

from megatron_tnllm.configs import TNLConfig, get_preset
from megatron_tnllm.planning.memory import (
    OVERHEAD,
    GiB,
    Layout,
    OneLineParser,
    activation_bytes_per_token_layer,
    plan,
)
from megatron_tnllm.planning.step import launchers

REAL_WIDTHS = ("tnl-385m", "tnl-1b", "tnl-7b", "tnl-65b", "tnl-175b")


def projections(cfg: TNLConfig, tp: int) -> dict[str, tuple[int, int]]:
    """(input, output) width of each per-GPU projection at tensor parallelism ``tp``."""
    D, G = cfg.hidden_size, cfg.glu_size
    return {"qkvu": (D, 4 * D // tp), "out": (D // tp, D), "fc1": (D, 2 * G // tp), "fc2": (G // tp, D)}


def time_products(bench: Bench, tokens: int, shapes: dict[str, tuple[int, int]]) -> dict:
    """Forward and both backward products of each projection on ``tokens`` rows: ms, FLOPs, TFLOP/s."""
    out, total_ms, total_flops = {}, 0.0, 0
    for name, (k, n) in shapes.items():
        x, w, dy = bench.randn(tokens, k), bench.randn(n, k), bench.randn(tokens, n)

        def fwd_bwd(x=x, w=w, dy=dy):
            x @ w.t()
            dy @ w
            dy.t() @ x

        ms = bench.time_ms(fwd_bwd)
        flops = 6 * tokens * k * n
        out[name] = {"in": k, "out": n, "ms": ms, "tflops": flops / ms / 1e9}
        total_ms += ms
        total_flops += flops
        del x, w, dy
    out["total"] = {"ms": total_ms, "flops": total_flops, "tflops": total_flops / total_ms / 1e9}
    return out


def time_attention(bench: Bench, batch: int, seq: int, heads: int, head_dim: int, key_dim: int) -> float:
    """Lightning attention forward + backward, [batch, seq, heads, dim] inputs."""
    from megatron_tnllm.ops import lightning_attention

    q = bench.randn(batch, seq, heads, key_dim, requires_grad=True)
    k = bench.randn(batch, seq, heads, key_dim, requires_grad=True)
    v = bench.randn(batch, seq, heads, head_dim, requires_grad=True)
    slope = torch.linspace(0.01, 0.5, heads, device=bench.device)
    do = bench.randn(batch, seq, heads, head_dim)

    def fwd_bwd():
        o, _ = lightning_attention(q, k, v, slope)
        o.backward(do)

    return bench.time_ms(fwd_bwd)


def init_single_process(device: str) -> None:
    """torch.distributed and Megatron's parallel state at world size 1 (nccl on a GPU, gloo with shims on CPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device == "cpu":  # Megatron allocates on torch.cuda.current_device(); the test shims point it at the CPU
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.cpu_shims import apply_ddp_cpu_shims

        apply_ddp_cpu_shims()
    else:
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    if device != "cpu":  # Megatron draws initial weights under its CUDA RNG tracker's model-parallel state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)


def model_options(bench: Bench) -> dict:
    return dict(
        params_dtype=bench.dtype,
        bf16=bench.dtype == torch.bfloat16,
        use_cpu_initialization=not bench.cuda,
    )


def time_layer(bench: Bench, cfg: TNLConfig, batch: int, seq: int) -> dict:
    """A plain and an LRPE TNL layer of ``cfg``'s width, forward + backward on [seq, batch, D]."""
    from megatron_tnllm.models import build_model

    model = build_model(cfg, num_layers=2, lrpe_layers=(0,), vocab_size=128, **model_options(bench))
    result = {}
    for name, layer in (("lrpe", model.decoder.layers[0]), ("plain", model.decoder.layers[1])):
        x = bench.randn(seq, batch, cfg.hidden_size, requires_grad=True)
        dy = bench.randn(seq, batch, cfg.hidden_size)

        def fwd_bwd(layer=layer, x=x, dy=dy):
            out, _ = layer(x, attention_mask=None)
            out.backward(dy)

        ms = bench.time_ms(fwd_bwd)
        layer.zero_grad(set_to_none=False)
        x.grad = None
        before = bench.allocated()
        out, _ = layer(x, attention_mask=None)
        kept = bench.allocated() - before - out.numel() * out.element_size()
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        out.backward(dy)
        peak = torch.cuda.max_memory_allocated(bench.device) - before if bench.cuda else 0
        del out
        result[name] = {
            "ms": ms,
            "activation_bytes_per_token": kept / (seq * batch) if bench.cuda else None,
            # the plan also counts the layer's input (2 D), which the reading above excludes (allocated before it)
            "planned_bytes_per_token": activation_bytes_per_token_layer(cfg, lrpe=name == "lrpe", mbs=batch),
            "backward_peak_mib": peak / 2**20,
        }
    del model
    return result


def bench_layers(bench: Bench, args: argparse.Namespace) -> dict:
    by_preset = {lay["preset"]: lay for lay in launchers()}
    widths = {}
    for name in args.presets:
        cfg = get_preset(name)
        lay = by_preset.get(name)
        batch, seq = (lay["mbs"], lay["seq"]) if lay else (1, cfg.seq_length)
        if args.tokens:
            batch, seq = 1, args.tokens
        layer = time_layer(bench, cfg, batch, seq)
        products = time_products(bench, batch * seq, projections(cfg, 1))
        attention = time_attention(bench, batch, seq, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        attention_lrpe = time_attention(bench, batch, seq, cfg.num_heads, cfg.head_dim, 2 * cfg.head_dim)
        gemm = products["total"]["ms"]
        widths[name] = {
            "tokens": batch * seq,
            "batch": batch,
            "seq": seq,
            "layer": layer,
            "products": products,
            "attention_ms": attention,
            "attention_lrpe_ms": attention_lrpe,
            "overhead_ms": layer["plain"]["ms"] - gemm - attention,
            "overhead_lrpe_ms": layer["lrpe"]["ms"] - gemm - attention_lrpe,
            "layer_tflops": products["total"]["flops"] / layer["plain"]["ms"] / 1e9,
        }
        print(f"{name}: layer {layer['plain']['ms']:.3f} ms, products {gemm:.3f} ms, attention {attention:.3f} ms",
              file=sys.stderr)  # fmt: skip
    local = {}
    for lay in launchers():
        if args.launchers is not None and lay["preset"] not in args.launchers:
            continue
        cfg = get_preset(lay["preset"])
        tp = lay["tp"]
        batch, seq = (1, args.tokens) if args.tokens else (lay["mbs"], lay["seq"])
        products = time_products(bench, batch * seq, projections(cfg, tp))
        heads = cfg.num_heads // tp
        local[lay["name"]] = {
            "preset": cfg.name,
            "tp": tp,
            "tokens": batch * seq,
            "products": products,
            "attention_ms": time_attention(bench, batch, seq, heads, cfg.head_dim, cfg.head_dim),
            "attention_lrpe_ms": time_attention(bench, batch, seq, heads, cfg.head_dim, 2 * cfg.head_dim),
        }
        print(f"{lay['name']} (TP={tp}): products {products['total']['ms']:.3f} ms", file=sys.stderr)
    return {"widths": widths, "launcher_shapes": local}


def layers_that_fit(cfg: TNLConfig, lay: Layout, memory: float) -> int:
    """The most layers of ``cfg`` whose plan fits ``memory`` bytes (at least 1)."""
    best = 1
    for n in range(1, cfg.num_layers + 1):
        cut = cfg.replace(num_layers=n, lrpe_layers=tuple(i for i in cfg.lrpe_layers if i < n))
        if plan(cut, lay)["total"] <= memory:
            best = n
    return best


def bench_model(bench: Bench, args: argparse.Namespace) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tnllm.models import build_model

    cfg = get_preset(args.preset)
    if args.vocab_size:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    lay = Layout(mbs=args.mbs, seq=args.seq, num_microbatches=1)
    if args.layers is None:
        total = torch.cuda.get_device_properties(bench.device).total_memory if bench.cuda else 8 * GiB
        layers = layers_that_fit(cfg, lay, 0.9 * total)
    else:
        layers = args.layers
    cut = cfg.replace(num_layers=layers, lrpe_layers=tuple(i for i in cfg.lrpe_layers if i < layers))
    planned = plan(cut, lay)
    module = build_model(cut, **model_options(bench))
    if bench.cuda:
        module.cuda()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(module.config, ddp_config, module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.1, clip_grad=1.0, bf16=bench.dtype == torch.bfloat16,
        params_dtype=bench.dtype, use_distributed_optimizer=True,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_config, [model])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cut.vocab_size, (args.mbs, args.seq + 1), generator=generator).to(bench.device)
    positions = torch.arange(args.seq, device=bench.device).expand(args.mbs, -1)
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    step_ms, losses, before_step = [], [], 0
    for step in range(args.steps):
        if bench.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(ids[:, :-1], positions, None, labels=ids[:, 1:]).float().mean()
        loss.backward()
        model.finish_grad_sync()
        if step == 0 and bench.cuda:  # the first step's forward + backward, before Adam's state exists
            before_step = torch.cuda.max_memory_allocated(bench.device)
        ok, _, _ = optimizer.step()
        if bench.cuda:
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())
        if not ok:
            raise RuntimeError("the optimizer step failed (non-finite gradients)")
    peak = torch.cuda.max_memory_allocated(bench.device) if bench.cuda else 0
    want = planned["total"] - OVERHEAD
    return {
        "preset": cfg.name,
        "layers": layers,
        "parameters": cut.num_parameters(),
        "mbs": args.mbs,
        "seq": args.seq,
        "step_ms": step_ms,
        "losses": losses,
        "peak_allocated_gib": peak / GiB,
        "peak_before_optimizer_step_gib": before_step / GiB,
        "planned_gib_without_overhead": want / GiB,
        "planned_parts_gib": {k: v / GiB for k, v in planned.items()},
        "peak_over_plan": peak / want if bench.cuda else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=("layers", "model"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--presets", nargs="+", default=list(REAL_WIDTHS), help="layers: the real widths to time")
    p.add_argument("--launchers", nargs="*", help="layers: presets whose launcher shapes to time (default all)")
    p.add_argument("--tokens", type=int, help="layers: tokens per micro-batch instead of the launchers' MBS x SEQ")
    p.add_argument("--preset", default="tnl-175b", help="model: the width")
    p.add_argument("--layers", type=int, help="model: layers (default: the most that fit)")
    p.add_argument("--vocab-size", type=int, help="model: vocabulary (default the preset's)")
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    for name in ("iters", "tokens", "layers", "vocab_size", "mbs", "seq", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu for a (slow) check of the script")
    try:
        for name in [*args.presets, args.preset, *(args.launchers or [])]:
            get_preset(name)
    except KeyError as e:
        p.error(e.args[0])
    bench = Bench(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.iters, args.warmup)
    torch.manual_seed(0)
    init_single_process(args.device)
    result = {
        "mode": args.mode,
        "device": torch.cuda.get_device_name(0) if bench.cuda else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
    }
    result.update(bench_layers(bench, args) if args.mode == "layers" else bench_model(bench, args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
