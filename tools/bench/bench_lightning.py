#!/usr/bin/env python3
"""Lightning-attention benchmark for one H200: ours beside fla, lightning_attn2 and SDPA flash, in one run.

    python tools/bench/bench_lightning.py --all --json OUT.json          # sweep, decode, norm, table
    python tools/bench/bench_lightning.py --table --shapes B4_T8192_H32_D128
    python tools/bench/bench_lightning.py --tp-shapes --ab v3=old/chunk.py  # per-GPU launcher shapes, A/B
    python tools/bench/bench_lightning.py --tp-grid --no-fla              # launch-config grid at those shapes

What it does (each part also alone: --sweep, --decode, --norm, --table):
* sweep: a few launch configs of our kernels on three shapes (large, medium, small batch x heads); the
  best geometric mean of fwd and fwd+bwd becomes the config of the rest of the run;
* decode: one token per sequence, H32 D128, fp32 state, B = 1 / 64 / 256: ours (in/out of place), fla
  fused_recurrent_simple_gla, a plain torch step; against the state read+write floor;
* norm: SRMSNorm and SRMSNorm x gate (fused vs unfused) on [16384, 4096] bf16;
* tp-shapes: the per-GPU shapes of the launchers (examples/: heads / TP, micro-batch, sequence) plus head
  dims 64 and 256/128: ours (and its config variants, and any --ab kernel file) beside fla; eager fwd and
  fwd+bwd, the same replayed from a captured CUDA graph (GPU time without host launch cost), host time
  per eager fwd+bwd call, the HBM floor, and both kernels' errors against fp64 on the same inputs;
* table: the shapes of ``SHAPES`` (those of the comparison table in docs/kernels.md, two also with the
  LRPE layer's Dk 256, Dv 128): fwd and fwd+bwd median ms
  (triton.testing.do_bench), peak fwd+bwd memory, the HBM byte floor (bf16, 4.25 TB/s; fwd q,k,v,o,
  fwd+bwd adds q,k,v,do read and dq,dk,dv written), and each kernel's rel. error against fp64 on the
  same H and D at B1 T2048 (fla's gradients too: Triton 3.4-3.7 miscompiles a construct of its backward).

Inputs: fresh randn * 0.1 bf16 (never zeros), ALiBi slopes, scale 1. lightning_attn2 and SDPA take
head-first [B, H, T, D] tensors made before timing (their layout change is not timed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

from megatron_tnllm.ops import lightning_attention, lightning_attention_step, srmsnorm
from megatron_tnllm.ops.lightning_attn import chunk as chunk_mod
from megatron_tnllm.ops.lightning_attn import decode as decode_mod
from megatron_tnllm.ops.lightning_attn.naive import lightning_attention_chunked
from megatron_tnllm.ops.srmsnorm import srmsnorm_gate, srmsnorm_torch

HBM = 4.25e12
DEV = "cuda"  # a dry run on the CPU (interpreter) swaps this
SHAPES = [  # the LRPE pairs first: a run stopped partway (--json is rewritten after each shape) still has them
    (4, 8192, 32, 128, 128),
    (4, 8192, 32, 256, 128),
    (1, 65536, 8, 128, 128),
    (1, 65536, 8, 256, 128),
    (4, 2048, 32, 128, 128),
    (1, 8192, 96, 128, 128),
    (2, 16384, 16, 128, 128),
    (4, 32768, 32, 128, 128),
    (1, 131072, 16, 128, 128),
]
SWEEP_SHAPES = [(4, 8192, 32, 128, 128), (2, 16384, 16, 128, 128), (1, 65536, 8, 128, 128)]
SWEEP = {
    "t64": dict(fwd_tile=64, rev_tile=64),
    "t128": dict(fwd_tile=128, rev_tile=128),
    "t64_few_seg": dict(fwd_tile=64, rev_tile=64, target_ctas=132),
    "t64_s3": dict(fwd_tile=64, rev_tile=64, num_stages=3),
}
# (launcher, per-GPU shape): heads / TP, micro-batch and sequence of examples/*.sh, *.sbatch; then head dims
TP_SHAPES = [
    ("tnl-7b TP2 MBS1", (1, 4096, 16, 128, 128)),
    ("tnl-65b TP8 MBS1", (1, 4096, 8, 128, 128)),
    ("tnl-175b TP8 MBS1", (1, 2048, 12, 128, 128)),
    ("tnl-13b TP8 MBS2", (2, 4096, 5, 128, 128)),
    ("tnl-1b TP1 MBS8", (8, 2048, 16, 128, 128)),
    ("tnl-385m TP1 MBS8", (8, 2048, 8, 128, 128)),
    ("head dim 64, 7b layout", (1, 4096, 16, 64, 64)),
    ("LRPE, 7b layout", (1, 4096, 16, 256, 128)),
    ("LRPE, 1b layout", (8, 2048, 16, 256, 128)),
]
# config variants of our kernels timed beside the default in --tp-shapes
TP_VARIANTS = {
    "two_launch": dict(fused_segments=False),
    "min_seg256": dict(min_seg=256),
    "min_seg128": dict(min_seg=128),
    "chunk32_min_seg128": dict(chunk=32, min_seg=128),
    "fwd_min_seg128": dict(fwd_min_seg=128),
    "fwd_min_seg256": dict(fwd_min_seg=256),
}
# --tp-grid: launch configs timed (graph fwd, graph fwd+bwd; no fla) at the D = 128 launcher shapes
TP_GRID = {"default": {}} | {
    f"c{c}_t{t}_m{m}_g{g}": dict(chunk=c, fwd_tile=t, rev_tile=t, min_seg=m, target_ctas=g)
    for c in (32, 64)
    for t in (32, 64, 128)
    for m in (128, 512)
    for g in (0, 528)
} | {"warps8": dict(num_warps=8), "warps4": dict(num_warps=4), "stages1": dict(num_stages=1),
     "stages3": dict(num_stages=3), "two_launch": dict(fused_segments=False),
     "fwd_min_seg128": dict(fwd_min_seg=128), "fwd_min_seg256": dict(fwd_min_seg=256)}  # fmt: skip
RESULTS: dict = {"meta": {}, "sweep": {}, "decode": {}, "norm": {}, "table": {}, "tp": {}, "tp_grid": {}}
JSON_PATH = None


def save() -> None:
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(RESULTS, f, indent=1)


def name(shape) -> str:
    B, T, H, Dk, Dv = shape
    return f"B{B}_T{T}_H{H}_D{Dk}" + ("" if Dk == Dv else f"x{Dv}")


def alibi(H: int) -> torch.Tensor:
    """ALiBi slopes of the model (a head count that is not a power of two P interleaves the 2P list)."""

    def pow2(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if H & (H - 1) == 0:
        s = pow2(H)
    else:
        p = 2 ** int(math.floor(math.log2(H)))
        s = pow2(p) + pow2(2 * p)[0::2][: H - p]
    return torch.tensor(s, dtype=torch.float32, device=DEV)


def bench(fn, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def inputs(B, T, H, Dk, Dv, seed, grad=False):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def r(*s):
        return (torch.randn(*s, generator=g, device=DEV) * 0.1).to(torch.bfloat16).requires_grad_(grad)

    return r(B, T, H, Dk), r(B, T, H, Dk), r(B, T, H, Dv)


# ------------------------------------------------------------------------------------------------ impls


def impl_ours(q, k, v, slope):
    return lightning_attention(q, k, v, slope, backend="triton")[0]


def load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        return chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001
        print("fla unavailable:", repr(e))
        return None, None


def load_la2():
    try:
        from lightning_attn.ops import lightning_attn2

        return lightning_attn2
    except Exception as e:  # noqa: BLE001
        print("lightning_attn unavailable:", repr(e))
        return None


def floors(B, T, H, Dk, Dv):
    n = B * T * H
    fwd = 2 * n * (2 * Dk + 2 * Dv)
    fb = fwd + 2 * n * (2 * Dk + 2 * Dv) + 2 * n * (2 * Dk + Dv)  # + q,k,v,do read, dq,dk,dv written
    return fwd / HBM * 1e3, fb / HBM * 1e3


def check_errors(fn, H, Dk, Dv, slope, seed, head_first=False):
    """Rel. error of o, dq, dk, dv against fp64 at B1 T2048 with this H and D."""
    q, k, v = inputs(1, 2048, H, Dk, Dv, seed, grad=True)
    do = (torch.randn(1, 2048, H, Dv, device=DEV) * 0.1).to(torch.bfloat16)
    o = fn(q, k, v, slope)
    o.backward(do)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, _ = lightning_attention_chunked(*refs, slope.double(), chunk_size=256)
    ro.backward(do.double())
    return {"o": rel(o, ro), "dq": rel(q.grad, refs[0].grad), "dk": rel(k.grad, refs[1].grad),
            "dv": rel(v.grad, refs[2].grad)}  # fmt: skip


def run_impl(label, fn, shape, slope, seed, check=None, head_first=False):
    B, T, H, Dk, Dv = shape
    out = {}
    try:
        q, k, v = inputs(B, T, H, Dk, Dv, seed)
        if head_first:
            q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        with torch.no_grad():
            fn(q, k, v, slope)
            out["fwd"] = bench(lambda: fn(q, k, v, slope))
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(fn(q, k, v, slope)) * 0.1

        def fb():
            fn(qg, kg, vg, slope).backward(do)

        fb()
        out["fb"] = bench(fb, grad_to_none=[qg, kg, vg])
        for x in (qg, kg, vg):
            x.grad = None
        out["peak_gb"] = peak_gb(fb)
        # after the timing, so that autotuners (fla) tune on the real shape, not on the check's
        if check is not None:
            out["err"] = check_errors(check, H, Dk, Dv, slope, seed + 1)
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)[:300]
        traceback.print_exc()
    torch.cuda.empty_cache()
    print(f"  {label:8s} {json.dumps(out)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ parts


def part_sweep():
    results = {}
    for cname, kw in SWEEP.items():
        chunk_mod.CONFIG = chunk_mod.KernelConfig(**kw)
        t0 = time.time()
        res = {}
        for shape in SWEEP_SHAPES:
            slope = alibi(shape[2])
            res[name(shape)] = run_impl("ours", impl_ours, shape, slope, seed=1)
        geo = math.exp(
            sum(math.log(r["fwd"]) + math.log(r["fb"]) for r in res.values() if "fb" in r) / (2 * len(res))
        ) if all("fb" in r for r in res.values()) else float("inf")  # fmt: skip
        results[cname] = {"config": kw, "shapes": res, "geomean_ms": geo, "wall_s": time.time() - t0}
        print(f"sweep {cname}: geomean {geo:.3f} ms ({time.time() - t0:.0f} s)", flush=True)
    best = min(results, key=lambda c: results[c]["geomean_ms"])
    chunk_mod.CONFIG = chunk_mod.KernelConfig(**SWEEP[best])
    RESULTS["sweep"] = {"best": best, "configs": results}
    print(f"sweep best: {best} {SWEEP[best]}", flush=True)
    save()


def _step_inputs(B, H, D):
    q, k, v = (torch.randn(B, H, D, device=DEV).to(torch.bfloat16) for _ in range(3))
    return q, k, v, torch.randn(B, H, D, D, device=DEV) * 0.1


def _decode_row(B, H, D, slope, fused_recurrent):
    q, k, v, st = _step_inputs(B, H, D)
    row = {"floor": 8 * D * D * B * H / HBM * 1e3}
    o_ref, s_ref = lightning_attention_step(q, k, v, slope, st.double(), backend="torch")
    o1, s1 = lightning_attention_step(q, k, v, slope, st.clone(), inplace=True)
    row["err_o"], row["err_state"] = rel(o1, o_ref), rel(s1, s_ref)
    fla_step = None
    if fused_recurrent is not None:
        try:

            def fla_step():
                return fused_recurrent(q[:, None], k[:, None], v[:, None], g_gamma=-slope, scale=1.0,
                                       initial_state=st, output_final_state=True)  # fmt: skip

            fo, fs = fla_step()  # checked before the in-place benchmarks below move st on
            row["fla_err_o"], row["fla_err_state"] = rel(fo[:, 0], o_ref), rel(fs, s_ref)
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = repr(e)[:300]
            fla_step = None
    row["ours_inplace"] = bench(lambda: lightning_attention_step(q, k, v, slope, st, inplace=True))
    row["ours_outofplace"] = bench(lambda: lightning_attention_step(q, k, v, slope, st, inplace=False))
    row["torch_step"] = bench(lambda: lightning_attention_step(q, k, v, slope, st, backend="torch"))
    if fla_step is not None:
        row["fla"] = bench(fla_step)
    return row


def part_decode(fused_recurrent, sweep_tiles=False):
    H, D = 32, 128
    slope = alibi(H)
    res = {}
    tiles = {"bv32_w4": (32, 4), "bv64_w4": (64, 4), "bv64_w8": (64, 8)}
    if sweep_tiles:
        for key, (bv, nw) in tiles.items():
            decode_mod.DECODE_TILE.update({"bv": bv, "num_warps": nw})
            for B in (64, 256):
                q, k, v, st = _step_inputs(B, H, D)
                res[f"sweep_{key}_B{B}"] = bench(lambda q=q, k=k, v=v, st=st: lightning_attention_step(q, k, v, slope,
                                                                                                     st))  # fmt: skip
        best = min(tiles, key=lambda kk: res[f"sweep_{kk}_B256"] + res[f"sweep_{kk}_B64"])
        decode_mod.DECODE_TILE.update({"bv": tiles[best][0], "num_warps": tiles[best][1]})
        res["best_tile"] = best
    res["tile"] = dict(decode_mod.DECODE_TILE)
    for B in (1, 64, 256):
        res[f"B{B}"] = row = _decode_row(B, H, D, slope, fused_recurrent)
        print(f"decode B{B}: {json.dumps(row)}", flush=True)
    RESULTS["decode"] = res
    save()


def part_norm():
    M, D = 16384, 4096
    x, u, dy = (torch.randn(M, D, device=DEV).to(torch.bfloat16) for _ in range(3))
    res = {"floor_norm_fwd": 4 * M * D / HBM * 1e3, "floor_gate_fwd": 6 * M * D / HBM * 1e3}
    res["err_norm"] = rel(srmsnorm(x, backend="triton"), srmsnorm_torch(x.double()))
    res["triton_norm_fwd"] = bench(lambda: srmsnorm(x, backend="triton"))
    res["torch_norm_fwd"] = bench(lambda: srmsnorm_torch(x))
    res["triton_gate_fwd"] = bench(lambda: srmsnorm_gate(x, u))
    res["unfused_gate_fwd"] = bench(lambda: srmsnorm(x, backend="triton") * u)
    xg, ug = x.detach().requires_grad_(), u.detach().requires_grad_()
    res["triton_norm_fb"] = bench(lambda: srmsnorm(xg, backend="triton").backward(dy), grad_to_none=[xg])
    res["torch_norm_fb"] = bench(lambda: srmsnorm_torch(xg).backward(dy), grad_to_none=[xg])
    res["triton_gate_fb"] = bench(lambda: srmsnorm_gate(xg, ug).backward(dy), grad_to_none=[xg, ug])
    res["unfused_gate_fb"] = bench(lambda: (srmsnorm(xg, backend="triton") * ug).backward(dy), grad_to_none=[xg, ug])
    RESULTS["norm"] = res
    print("norm:", json.dumps(res), flush=True)
    save()


WIDE_VARIANTS = {"wide_bt64_tile64": (64, 64), "wide_bt32_tile32": (32, 32)}


def part_table(shapes, chunk_simple_gla, la2, deadline):
    t_start = time.time()
    for shape in shapes:
        B, T, H, Dk, Dv = shape
        nm = name(shape)
        slope = alibi(H)
        f_fwd, f_fb = floors(*shape)
        row = {"floor_fwd": f_fwd, "floor_fb": f_fb}
        print(f"{nm}: floor fwd {f_fwd:.3f} fb {f_fb:.3f}", flush=True)
        if Dk > 128:  # the sweeps of width 256 have their own chunk/tile: try the candidates, keep the best
            base = chunk_mod.CONFIG
            row["ours_variants"] = {}
            for vname, (bt, tile) in WIDE_VARIANTS.items():
                chunk_mod.CONFIG = chunk_mod.KernelConfig(**{**vars(base), "wide_chunk": bt, "wide_tile": tile})
                row["ours_variants"][vname] = run_impl(vname, impl_ours, shape, slope, seed=11, check=impl_ours)
            chunk_mod.CONFIG = base
            ok = {k: r for k, r in row["ours_variants"].items() if "fb" in r}
            if ok:
                best = min(ok, key=lambda k: ok[k]["fb"])
                row["ours"] = {**ok[best], "variant": best}
        else:
            row["ours"] = run_impl("ours", impl_ours, shape, slope, seed=11, check=impl_ours)
        late = time.time() - t_start > deadline
        if late:
            print(f"  past the {deadline:.0f} s deadline: lightning_attn2 and SDPA skipped", flush=True)
        if chunk_simple_gla is not None:
            g_gamma = -slope

            def fla(q, k, v, s, g_gamma=g_gamma):
                return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]

            row["fla"] = run_impl("fla", fla, shape, slope, seed=11, check=fla)
        if la2 is not None and Dk == Dv and Dk <= 128 and not late:
            s3 = slope.view(H, 1, 1).contiguous()

            def la2_fn(q, k, v, s, s3=s3):
                return la2(q, k, v, s3)

            row["la2"] = run_impl("la2", la2_fn, shape, slope, seed=11, head_first=True)
        if T <= 32768 and Dk == Dv and not late:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa(q, k, v, s):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            row["sdpa"] = run_impl("sdpa", sdpa, shape, slope, seed=11, head_first=True)
        RESULTS["table"][nm] = row
        save()


def kernel_report():
    """Registers, spills, shared memory and pipelining depth of every compiled variant of our kernels."""
    rows = []
    kernels = [chunk_mod._fwd_sweep_kernel, chunk_mod._rev_sweep_kernel, chunk_mod._seg_local_kernel,
               chunk_mod._seg_scan_kernel, decode_mod._step_kernel]  # fmt: skip
    for kern in kernels:
        try:
            for entry in kern.device_caches.values():
                for key, ck in entry[0].items():
                    md = ck.metadata
                    const = {k: v for k, v in getattr(md, "constants", {}).items()} if hasattr(md, "constants") else {}
                    rows.append({"kernel": kern.fn.__name__, "regs": ck.n_regs, "spills": ck.n_spills,
                                 "shared": md.shared, "warps": md.num_warps, "stages": md.num_stages,
                                 "key": str(key)[-300:], "const": str(const)[:300]})  # fmt: skip
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": getattr(kern, "__name__", "?"), "error": repr(e)[:200]})
    RESULTS["kernels"] = rows
    RESULTS["stages_fallback"] = {str(k): v for k, v in chunk_mod._STAGES.items() if v != chunk_mod.CONFIG.num_stages}
    for r in rows:
        print("kernel", json.dumps({k: r.get(k) for k in ("kernel", "regs", "spills", "shared", "warps", "stages")}))
    print("stage fallbacks:", RESULTS["stages_fallback"])
    save()


def graph_ms(fn, leaves=()) -> float:
    """Median ms of fn replayed from a captured CUDA graph (warm-up and capture on one side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    for x in leaves:
        x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn()
    return bench(g.replay, warmup=10, rep=40)


def host_us(fn, n=20) -> float:
    """Host time per call (no synchronisation inside: the GPU queue absorbs the launches)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def errors_at(fn, q, k, v, slope, do) -> dict:
    """Rel. errors of o, dq, dk, dv against fp64 (chunked reference) on these inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, slope)
    o.backward(do)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, _ = lightning_attention_chunked(*refs, slope.double(), chunk_size=256)
    ro.backward(do.double())
    return {"o": rel(o, ro), "dq": rel(leaves[0].grad, refs[0].grad), "dk": rel(leaves[1].grad, refs[1].grad),
            "dv": rel(leaves[2].grad, refs[2].grad)}  # fmt: skip


def time_impl(fn, q, k, v, slope, do, warm_only: bool = False) -> dict:
    out = {}
    if warm_only:  # compile / autotune into the cache, time nothing
        fn(*[x.detach().requires_grad_() for x in (q, k, v)], slope).backward(do)
        return out
    try:
        with torch.no_grad():
            fn(q, k, v, slope)
            out["fwd"] = bench(lambda: fn(q, k, v, slope), warmup=10, rep=40)
            out["host_fwd_us"] = host_us(lambda: fn(q, k, v, slope))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def fb():
            fn(*leaves, slope).backward(do)

        fb()
        out["fb"] = bench(fb, grad_to_none=leaves, warmup=10, rep=40)
        out["host_fb_us"] = host_us(fb)
        try:
            with torch.no_grad():
                out["fwd_graph"] = graph_ms(lambda: fn(q, k, v, slope))
            out["fb_graph"] = graph_ms(fb, leaves)
        except Exception as e:  # noqa: BLE001
            out["graph_error"] = repr(e)[:200]
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)[:300]
        traceback.print_exc()
    return out


def load_kernel_file(label: str, path: str):
    """fn(q, k, v, slope) -> o from another version of chunk.py (A/B in one process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"chunk_{label}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return lambda q, k, v, s: mod.chunk_lightning_attention(q, k, v, s)[0]


def part_tp(chunk_simple_gla, ab: dict, deadline: float, only: list | None, warm_only: bool, impls: list | None):
    """Per-GPU launcher shapes (``only``: shape names, ``impls``: implementation labels to run; None = all).
    warm_only: compile and autotune into the cache, time nothing (several such processes in parallel make
    the timed run start warm)."""
    t_start = time.time()
    want = set(impls) if impls else None
    others = {label: load_kernel_file(label, path) for label, path in ab.items() if not want or label in want}
    for launcher, shape in TP_SHAPES:
        if only and name(shape) not in only:
            continue
        if time.time() - t_start > deadline:
            print(f"past the {deadline:.0f} s deadline: {name(shape)} skipped", flush=True)
            continue
        B, T, H, Dk, Dv = shape
        slope = alibi(H)
        f_fwd, f_fb = floors(*shape)
        q, k, v = inputs(B, T, H, Dk, Dv, seed=21)
        do = (torch.randn(B, T, H, Dv, device=DEV) * 0.1).to(torch.bfloat16)
        row = {"launcher": launcher, "floor_fwd": f_fwd, "floor_fb": f_fb}
        nm = name(shape)

        def run(label, fn, row=row, q=q, k=k, v=v, slope=slope, do=do, nm=nm):
            if want and label not in want:
                return
            t = time.time()
            row[label] = time_impl(fn, q, k, v, slope, do, warm_only)
            print(f"  {nm} {label} ({time.time() - t:.1f} s): {json.dumps(row[label])}", flush=True)
            RESULTS["tp"][nm] = row
            save()

        base = chunk_mod.CONFIG
        run("ours", impl_ours)
        if "ours" in row and not warm_only:
            row["ours"]["plan"] = chunk_mod.plan_segments(B * H, T, 2 if Dv > 64 else 1, False, q.device)
            row["ours"]["err"] = errors_at(impl_ours, q, k, v, slope, do)
        for vname, kw in TP_VARIANTS.items():
            chunk_mod.CONFIG = chunk_mod.KernelConfig(**{**vars(base), **kw})
            run(vname, impl_ours)
            chunk_mod.CONFIG = base
        for label, fn in others.items():
            run(label, fn)
        if chunk_simple_gla is not None:

            def fla(q, k, v, s, g_gamma=-slope):
                return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]

            run("fla", fla)
            if not warm_only:
                try:
                    row["fla"]["err"] = errors_at(fla, q, k, v, slope, do)
                except Exception as e:  # noqa: BLE001
                    row["fla"]["err_error"] = repr(e)[:200]
        RESULTS["tp"][name(shape)] = row
        print(name(shape), json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        save()


def part_tp_grid(only: list | None):
    """Graph-replayed fwd and fwd+bwd ms of every TP_GRID config at the D = 128 launcher shapes; the five fastest
    fwd+bwd configs per shape are printed."""
    base = chunk_mod.CONFIG
    for launcher, shape in TP_SHAPES:
        B, T, H, Dk, Dv = shape
        if Dk != 128 or Dv != 128 or (only and name(shape) not in only):
            continue
        slope = alibi(H)
        q, k, v = inputs(B, T, H, Dk, Dv, seed=3)
        do = (torch.randn(B, T, H, Dv, device=DEV) * 0.1).to(torch.bfloat16)
        row = {}
        for label, kw in TP_GRID.items():
            chunk_mod.CONFIG = chunk_mod.KernelConfig(**{**vars(base), **kw})
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def fb(leaves=leaves, slope=slope, do=do):
                impl_ours(*leaves, slope).backward(do)

            try:
                fb()
                with torch.no_grad():
                    fwd = graph_ms(lambda q=q, k=k, v=v, slope=slope: impl_ours(q, k, v, slope))
                row[label] = {"fwd_graph": fwd, "fb_graph": graph_ms(fb, leaves)}
            except Exception as e:  # noqa: BLE001
                row[label] = {"error": repr(e)[:200]}
        chunk_mod.CONFIG = base
        RESULTS["tp_grid"][name(shape)] = {"launcher": launcher, **row}
        ok = sorted((r["fb_graph"], label) for label, r in row.items() if "fb_graph" in r)
        print(name(shape), launcher, "default", row["default"], "fastest:", ok[:5], flush=True)
        save()


def print_tp_table():
    t = RESULTS["tp"]
    if not t:
        return
    nan = float("nan")

    def g(r, impl, key):
        return r.get(impl, {}).get(key, nan)

    impls = [i for i in next(iter(t.values())) if isinstance(next(iter(t.values()))[i], dict)]
    print("\n| launcher | shape | ours fwd / fwd+bwd | fla fwd / fwd+bwd | fla/ours fwd / fb | ours fb / floor "
          "| graph ours / fla fb | host us ours / fla | err ours / fla |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for nm, r in t.items():
        of, ob, ff, fb = g(r, "ours", "fwd"), g(r, "ours", "fb"), g(r, "fla", "fwd"), g(r, "fla", "fb")
        eo = max(r.get("ours", {}).get("err", {"x": nan}).values())
        ef = max(r.get("fla", {}).get("err", {"x": nan}).values())
        graph = f"{g(r, 'ours', 'fb_graph'):.3f} / {g(r, 'fla', 'fb_graph'):.3f}"
        host = f"{g(r, 'ours', 'host_fb_us'):.0f} / {g(r, 'fla', 'host_fb_us'):.0f}"
        print(f"| {r['launcher']} | {nm} | {of:.3f} / {ob:.3f} | {ff:.3f} / {fb:.3f} | {ff / of:.2f}x / {fb / ob:.2f}x "
              f"| {ob / r['floor_fb']:.1f} | {graph} | {host} | {eo:.1e} / {ef:.1e} |")  # fmt: skip
    print("\nvariants, fwd / fwd+bwd ms (graph replay fwd / fwd+bwd):")
    for nm, r in t.items():
        cells = [f"{i} {g(r, i, 'fwd'):.3f}/{g(r, i, 'fb'):.3f} ({g(r, i, 'fwd_graph'):.3f}/{g(r, i, 'fb_graph'):.3f})"
                 for i in impls]  # fmt: skip
        print(f"  {nm}: " + "; ".join(cells))


def print_table():
    t = RESULTS["table"]
    if not t:
        return

    def g(r, impl, key):
        return r.get(impl, {}).get(key, float("nan"))

    print("\n| shape | ours fwd / fwd+bwd | fla fwd / fwd+bwd | lightning_attn2 | SDPA flash | floor | vs fla fwd / fb "
          "| vs la2 fwd / fb | vs floor fwd / fb | peak GB ours / fla | max err ours / fla |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for nm, r in t.items():
        of, ob = g(r, "ours", "fwd"), g(r, "ours", "fb")
        ff, fb = g(r, "fla", "fwd"), g(r, "fla", "fb")
        lf, lb = g(r, "la2", "fwd"), g(r, "la2", "fb")
        sf, sb = g(r, "sdpa", "fwd"), g(r, "sdpa", "fb")
        eo = max(r.get("ours", {}).get("err", {"x": float("nan")}).values())
        ef = max(r.get("fla", {}).get("err", {"x": float("nan")}).values())
        print(f"| {nm} | {of:.3f} / {ob:.3f} | {ff:.3f} / {fb:.3f} | {lf:.3f} / {lb:.3f} | {sf:.3f} / {sb:.3f} | "
              f"{r['floor_fwd']:.3f} / {r['floor_fb']:.3f} | {ff / of:.2f}x / {fb / ob:.2f}x | "
              f"{lf / of:.2f}x / {lb / ob:.2f}x | {of / r['floor_fwd']:.2f} / {ob / r['floor_fb']:.2f} | "
              f"{g(r, 'ours', 'peak_gb'):.2f} / {g(r, 'fla', 'peak_gb'):.2f} | {eo:.1e} / {ef:.1e} |")  # fmt: skip
    for a, b in (("B4_T8192_H32_D256x128", "B4_T8192_H32_D128"), ("B1_T65536_H8_D256x128", "B1_T65536_H8_D128")):
        if a in t and b in t:
            print(f"LRPE {a} / {b} fwd+bwd: {g(t[a], 'ours', 'fb') / g(t[b], 'ours', 'fb'):.2f}x "
                  f"(fla {g(t[a], 'fla', 'fb') / g(t[b], 'fla', 'fb'):.2f}x)")  # fmt: skip
    d = RESULTS.get("decode", {})
    for B in (1, 64, 256):
        r = d.get(f"B{B}")
        if r:
            print(f"decode B{B}: ours {r['ours_inplace']:.4f} ms (out-of-place {r['ours_outofplace']:.4f}), "
                  f"fla {r.get('fla', float('nan')):.4f}, torch {r['torch_step']:.4f}, floor {r['floor']:.4f} "
                  f"-> {r['ours_inplace'] / r['floor']:.2f}x floor")  # fmt: skip


def main():
    global JSON_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--norm", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--shapes", nargs="*", help="subset of the table's shape names")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--deadline", type=float, default=1e9, help="seconds into the table after which la2/SDPA are skipped"
    )
    ap.add_argument("--decode-sweep", action="store_true", help="also sweep the decode tile")
    ap.add_argument("--tp-shapes", action="store_true", help="per-GPU launcher shapes beside fla (A/B with --ab)")
    ap.add_argument("--tp-grid", action="store_true", help="graph times of a grid of launch configs, TP shapes")
    ap.add_argument("--ab", nargs="*", default=[], help="LABEL=PATH of another chunk.py to time beside ours")
    ap.add_argument("--warm-only", action="store_true", help="--tp-shapes: compile/autotune into the cache only")
    ap.add_argument("--no-fla", action="store_true", help="leave fla out")
    ap.add_argument("--impls", nargs="*", help="--tp-shapes: labels to run (ours, variants, --ab labels, fla)")
    args = ap.parse_args()
    JSON_PATH = args.json
    p = torch.cuda.get_device_properties(0)
    RESULTS["meta"] = {"gpu": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
                       "triton": triton.__version__, "cmd": " ".join(sys.argv)}  # fmt: skip
    try:
        import fla

        RESULTS["meta"]["fla"] = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(RESULTS["meta"]), flush=True)
    chunk_simple_gla, fused_recurrent = (None, None) if args.no_fla else load_fla()
    la2 = load_la2()
    t0 = time.time()
    if args.all or args.sweep:
        part_sweep()
    if args.all or args.decode:
        part_decode(fused_recurrent, args.decode_sweep)
    if args.all or args.norm:
        part_norm()
    RESULTS["meta"]["config"] = vars(chunk_mod.CONFIG)
    RESULTS["meta"]["decode_tile"] = dict(decode_mod.DECODE_TILE)
    if args.tp_shapes:
        ab = dict(x.split("=", 1) for x in args.ab)
        part_tp(chunk_simple_gla, ab, args.deadline, args.shapes, args.warm_only, args.impls)
    if args.tp_grid:
        part_tp_grid(args.shapes)
    if args.all or args.table:
        shapes = [s for s in SHAPES if not args.shapes or name(s) in args.shapes]
        part_table(shapes, chunk_simple_gla, la2, args.deadline)
    RESULTS["meta"]["wall_s"] = time.time() - t0
    save()
    print_table()
    if not args.warm_only:
        kernel_report()
        print_tp_table()


if __name__ == "__main__":
    main()
