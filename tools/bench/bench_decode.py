"""Decode speed of TNL (the Hugging Face class) against a same-shape Llama with SDPA and a KV cache.

For each batch size and context: prefill a random prompt of that length at batch 1 (TNL through the chunk
kernel; logits of the last token only), repeat its cache to the batch size (decode cost does not depend on
the values in the state or the KV cache), then run decode steps, each feeding the argmax of the previous
step's logits, timed one by one with CUDA events: best and median ms per step, tokens/s = batch / median.

Series: ``tnl`` (decode_mode "graph": one CUDA graph per step), ``tnl-cublas`` (the same graph with the step's
products through ``nn.Linear``, i.e. cuBLAS and separate residual adds and gate, instead of the skinny kernels; at
the first context only), ``tnl-eager`` (plain PyTorch, the reference point), ``llama`` (transformers
LlamaForCausalLM, SDPA, DynamicCache; skipped where its KV cache would exceed --llama-max-kv-gib). Floor: the
weights and the cache (TNL's fp32 states, Llama's KV) read once, at --bandwidth. Random weights, one model on
the GPU at a time.

    python tools/bench/bench_decode.py --out DIR            # tnl-1b shape, bf16, batch 1 and 64, contexts 1k/16k/128k
    python tools/bench/bench_decode.py --smoke --out DIR    # tnl-tiny shape on CPU ("static" decode), seconds

Writes DIR/bench_decode.json, DIR/bench_decode.md (table) and, with matplotlib, DIR/bench_decode.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_tnllm.configs import TNLConfig, get_preset
from megatron_tnllm.convert.layout import hf_config_from_tnl
from megatron_tnllm.hf import TransnormerForCausalLM, modeling_transnormer
from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD

SKINNY_ROWS = modeling_transnormer.SKINNY_ROWS

GIB = 2**30


def build(name: str, shape: TNLConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``tnl`` or ``llama`` of TNL preset ``shape`` (Llama: same width, depth, heads, FFN, vocabulary, tied
    embeddings; full multi-head attention, SDPA), randomly initialised on ``device``."""
    if name == "tnl":
        config, cls = hf_config_from_tnl(shape), TransnormerForCausalLM
    else:
        config = LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.glu_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_heads,
            max_position_embeddings=1 << 20,
            tie_word_embeddings=True,
        )
        config._attn_implementation = "sdpa"
        cls = LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prefill(model: torch.nn.Module, name: str, batch: int, context: int, device: torch.device) -> tuple:
    """Batch-1 prefill of ``context`` random tokens, cache repeated to ``batch`` -> (cache, tokens [batch, 1],
    prefill seconds)."""
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync(device)
    seconds = time.perf_counter() - start
    cache = getattr(out, CACHE_FIELD)
    if batch > 1:
        if name == "tnl":
            cache.states = [s.expand(batch, *s.shape[1:]).contiguous() for s in cache.states]
            cache.positions = cache.positions.expand(batch).contiguous()
        else:
            cache.batch_repeat_interleave(batch)
    tokens = out.logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1).contiguous()
    return cache, tokens, seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(step: Callable, tokens: torch.Tensor, steps: int, warmup: int, device: torch.device) -> list[float]:
    """ms of each of ``steps`` consecutive decode steps after ``warmup`` untimed ones (events on CUDA: each
    interval includes any time the GPU waited for the host)."""
    for _ in range(warmup):
        tokens = step(tokens)
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            tokens = step(tokens)
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        tokens = step(tokens)
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]


def measure(model, series: str, batch: int, context: int, args, device: torch.device) -> dict:
    """One (series, batch, context) point: prefill, then timed decode steps; peak memory over both."""
    name = "llama" if series == "llama" else "tnl"
    if name == "tnl":
        model.decode_mode = "eager" if series == "tnl-eager" else args.tnl_mode
        modeling_transnormer.SKINNY_ROWS = 0 if series == "tnl-cublas" else SKINNY_ROWS
        model.decode_graphs.clear()  # recorded again with this series' products
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        cache, tokens, prefill_s = prefill(model, name, batch, context, device)
        cache_bytes = (
            sum(s.numel() * s.element_size() for s in cache.states)
            if name == "tnl"
            else 2 * batch * context * model.config.num_hidden_layers * model.config.hidden_size * 2
        )

        def step(tok: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=tok, use_cache=True, **{CACHE_FIELD: cache})
            return out.logits[:, -1].argmax(-1, keepdim=True)

        times = step_times(step, tokens, args.steps, args.warmup, device)
    median = statistics.median(times)
    row = {
        "series": series,
        "batch": batch,
        "context": context,
        "best_ms": min(times),
        "median_ms": median,
        "tokens_per_s": batch / median * 1e3,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": context / prefill_s,
        "cache_gib": cache_bytes / GIB,
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
    }
    return row


def kv_gib(shape: TNLConfig, batch: int, context: int) -> float:
    """Llama's bf16 KV cache: K and V, every layer, every position."""
    return 2 * batch * context * shape.num_layers * shape.hidden_size * 2 / GIB


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = get_preset(args.preset)
    if args.vocab_size:
        shape = shape.replace(vocab_size=args.vocab_size)
    results = {"preset": args.preset, "dtype": args.dtype, "bandwidth_tb_s": args.bandwidth, "rows": []}
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
    results["torch"] = torch.__version__
    for name in ("tnl", "llama"):
        torch.manual_seed(0)
        model = build(name, shape, dtype, device)
        wbytes = weight_bytes(model)
        results[f"{name}_weight_gib"] = wbytes / GIB
        for series in ("tnl", "tnl-cublas", "tnl-eager") if name == "tnl" else ("llama",):
            for batch in args.batches:
                for context in args.contexts:
                    kv = kv_gib(shape, batch, context)
                    if series == "llama" and kv > args.llama_max_kv_gib:
                        print(f"skip llama batch {batch} context {context}: KV cache {kv:.1f} GiB")
                        continue
                    if series in ("tnl-cublas", "tnl-eager") and context != args.contexts[0]:
                        continue  # constant time: one context is enough for the reference points
                    row = measure(model, series, batch, context, args, device)
                    row["floor_ms"] = (wbytes + row["cache_gib"] * GIB) / (args.bandwidth * 1e12) * 1e3
                    row["x_floor"] = row["median_ms"] / row["floor_ms"]
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
        modeling_transnormer.SKINNY_ROWS = SKINNY_ROWS
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: dict) -> str:
    """The markdown table of every measured point."""
    lines = [
        "| series | batch | context | best ms | median ms | tokens/s | x floor | peak GiB | cache GiB "
        "| prefill tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['series']} | {r['batch']} | {r['context']} | {r['best_ms']:.3f} | {r['median_ms']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['x_floor']:.1f} | {peak} | {r['cache_gib']:.3f} | "
            f"{r['prefill_tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Median ms per decode step against context, one line per (series, batch); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list] = {}
    for r in results["rows"]:
        groups.setdefault((r["series"], r["batch"]), []).append(r)
    for (series, batch), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["context"])
        ax.plot(
            [r["context"] for r in rows],
            [r["median_ms"] for r in rows],
            marker="o",
            linestyle="-" if batch == 1 else "--",
            label=f"{series}, batch {batch}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"{results['preset']} shape, {results['dtype']}, {results.get('device', 'cpu')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON, table and plot")
    parser.add_argument("--smoke", action="store_true", help="tnl-tiny shape on CPU, two short contexts")
    parser.add_argument("--preset", default="tnl-1b")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 16384, 131072])
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (graph capture happens here)")
    parser.add_argument("--tnl-mode", default="graph", help="TNL decode_mode for the 'tnl' series")
    parser.add_argument("--llama-max-kv-gib", type=float, default=40.0)
    parser.add_argument("--bandwidth", type=float, default=4.25, help="HBM TB/s for the floors (H200: 4.8 peak)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.vocab_size, args.dtype, args.device, args.tnl_mode = (
            "tnl-tiny",
            1000,
            "float32",
            "cpu",
            "static",
        )
        args.batches, args.contexts, args.steps, args.warmup = [1, 4], [32, 128], 3, 1
    if math.prod(args.batches) <= 0 or min(args.contexts) <= 0:
        raise SystemExit(f"batches and contexts must be positive; got {args.batches}, {args.contexts}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.out / "bench_decode.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bench_decode.md").write_text(table(results))
    print(table(results))
    print("plot:", args.out / "bench_decode.png" if plot(results, args.out / "bench_decode.png") else "no matplotlib")


if __name__ == "__main__":
    main()
