"""Triton lightning attention for training and prefill: forward, backward, packed sequences.

Math (per head, lambda = exp(-slope), g = log2(lambda) <= 0, chunk of n <= BT tokens, i, j = 0..n-1):

    O  = ((Q K^T) * D) V + diag(lambda^(i+1)) Q S,         D_ij = lambda^(i-j) for i >= j, else 0
    S <- lambda^n S + (diag(lambda^(n-1-j)) K)^T V

Only powers >= 0 of lambda are ever formed (exp2 of g times a count >= 0): slopes from 0 to 8 per token
underflow to 0 cleanly instead of overflowing.

Kernels (one job each):

* ``_fwd_sweep_kernel``: walks the chunks of one segment forward with the fp32 state S in registers and
  writes O; no per-chunk state ever reaches HBM. It also computes dQ: dQ = fwd(dO, V, K) with the
  transposed state, because dq_t = sum_{s<=t} lambda^(t-s) (do_t . v_s) k_s + lambda^(t+1) do_t S0^T.
* ``_rev_sweep_kernel``: walks the chunks of one segment backward with the fp32 state gradient G in
  registers. With (a, b, c) = (Q, K, dO) and G = dS it yields dV; with (dO, V, Q) and G = dS^T, dK:

      Y_j = sum_{i >= j} lambda^(i-j) (b_j . a_i) c_i + lambda^(n-1-j) b_j G,
      G  <- lambda^n G + (diag(lambda^(i+1)) A)^T C.

* ``_seg_local_kernel`` and ``_seg_scan_kernel``: the chunk-parallel two-level scheme. When batch x heads
  is too small to fill the GPU, each sequence is cut into segments of ``seg_len`` tokens; the first kernel
  computes every segment's own state contribution in parallel, the second chains them (a short serial
  loop over segments), and the sweeps then run all segments in parallel from those states.

Layouts: q, k [B, T, H, Dk]; v, o [B, T, H, Dv], any strides (read through them, never copied); states
[N, H, Dk, Dv] fp32; slope [H]. Dot operands are in the input dtype (bf16/fp16 tensor cores; tf32x3 for
fp32 inputs), accumulation and the state are fp32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

__all__ = ["KernelConfig", "CONFIG", "chunk_lightning_attention", "plan_segments"]

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tests set this to fill every output with NaN before the kernels run, proving each element is written
POISON_OUTPUTS = False


@dataclass
class KernelConfig:
    """Launch knobs (module-level ``CONFIG``; the benchmark sweeps them, tests shrink them).

    chunk: tokens per chunk (BT). fwd_tile: output-column tile of the forward / dQ sweeps (of Dv, resp. Dk;
    0 = the whole width). rev_tile: output-column tile of the dV / dK sweeps. wide_chunk, wide_tile: chunk
    and tile of the sweeps whose reduced width is 256 (the LRPE layer's Dk): their q/k tiles are twice as
    large in shared memory.
    target_ctas: programs wanted per launch before cutting sequences into segments (0 = automatic: one
    segment once batch x heads x tiles reaches the SM count, else as many as fill two programs per SM).
    min_seg: shortest segment in tokens. num_warps: 0 = by state-tile size. num_stages: software-pipelining
    depth of the chunk loads (stepped down automatically when shared memory runs out).
    """

    chunk: int = 64
    fwd_tile: int = 64
    rev_tile: int = 64
    wide_chunk: int = 64
    wide_tile: int = 64
    target_ctas: int = 0
    min_seg: int = 512
    num_warps: int = 0
    num_stages: int = 2


CONFIG = KernelConfig()


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _seq_start(x, cu_seqlens, i_n, i_h, s_b, s_t, s_h, VARLEN: tl.constexpr):
    """x advanced to head i_h of sequence i_n's first token (packed sequences are rows of batch 0)."""
    if VARLEN:
        x += tl.load(cu_seqlens + i_n).to(tl.int64) * s_t
    else:
        x += i_n.to(tl.int64) * s_b
    return x + i_h.to(tl.int64) * s_h


@triton.jit
def _seq_len(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    if VARLEN:
        return (tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)).to(tl.int32)
    else:
        return T


@triton.jit
def _load_chunk(x, t_hi, t0, s_t, s_d, col0, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    """x[t0 : t0 + BT, col0 : col0 + BW], zero beyond token t_hi and column W. A block pointer keeps the
    addressing scalar (per-element 64-bit pointer tensors were what pushed the sweeps past 255 registers)."""
    p = tl.make_block_ptr(x, (t_hi, W), (s_t, s_d), (t0, col0), (BT, BW), (1, 0))
    return tl.load(p, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _store_chunk(x, val, t_hi, t0, s_t, s_d, col0, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    p = tl.make_block_ptr(x, (t_hi, W), (s_t, s_d), (t0, col0), (BT, BW), (1, 0))
    tl.store(p, val.to(x.dtype.element_ty), boundary_check=(0, 1))


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _fwd_sweep_kernel(
    q, k, v, o, g2, s_in, s_out, cu_seqlens,
    T, H, seg_len, n_seg,
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_ob, s_ot, s_oh, s_od,
    si_n, si_h, si_s, si_r, si_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (C tiles, segments, N*H). q, k [.., R]; v, o [.., C]; s_in [N, H, n_seg, R, C] (one segment: h0
    [N, H, R, C], read with segment stride 0); s_out [N, H, R, C]."""
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    seq_len = _seq_len(cu_seqlens, i_n, T, VARLEN)
    q = _seq_start(q, cu_seqlens, i_n, i_h, s_qb, s_qt, s_qh, VARLEN)
    k = _seq_start(k, cu_seqlens, i_n, i_h, s_kb, s_kt, s_kh, VARLEN)
    v = _seq_start(v, cu_seqlens, i_n, i_h, s_vb, s_vt, s_vh, VARLEN)
    o = _seq_start(o, cu_seqlens, i_n, i_h, s_ob, s_ot, s_oh, VARLEN)

    t_lo = i_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, seq_len)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BR)
    o_v = i_v * BC + tl.arange(0, BC)
    m_k = o_k < R
    m_v = o_v < C

    # decays as exp2(g * count), count >= 0 only
    g = tl.load(g2 + i_h).to(tl.float32)
    o_f = o_t.to(tl.float32)
    d_q = tl.exp2(g * (o_f + 1.0))
    dif = o_f[:, None] - o_f[None, :]
    d_a = tl.where(dif >= 0, tl.exp2(g * tl.maximum(dif, 0.0)), 0.0)

    b_s = tl.zeros([BR, BC], dtype=tl.float32)
    if HAS_S_IN:
        p_s = s_in + i_n.to(tl.int64) * si_n + i_h * si_h + i_s.to(tl.int64) * si_s
        b_s += tl.load(p_s + o_k[:, None] * si_r + o_v[None, :] * si_c, mask=m_k[:, None] & m_v[None, :], other=0.0)

    n_chunks = tl.cdiv(t_hi - t_lo, BT)
    for m in range(0, n_chunks):
        t0 = t_lo + m * BT
        b_q = _load_chunk(q, t_hi, t0, s_qt, s_qd, 0, R, BT, BR)
        b_k = _load_chunk(k, t_hi, t0, s_kt, s_kd, 0, R, BT, BR)
        b_v = _load_chunk(v, t_hi, t0, s_vt, s_vd, i_v * BC, C, BT, BC)

        # intra-chunk: masked, decayed Q K^T, then times V
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * d_a
        b_o = tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC)
        # inter-chunk: the state entering this chunk
        b_o += tl.dot(b_q, b_s.to(b_q.dtype), input_precision=PREC) * d_q[:, None]
        _store_chunk(o, b_o, t_hi, t0, s_ot, s_od, i_v * BC, C, BT, BC)

        # state update with the true chunk length n (the last chunk may be partial)
        n = tl.minimum(t_hi - t0, BT).to(tl.float32)
        d_k = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
        b_kd = (b_k * d_k[:, None]).to(b_k.dtype)
        b_s = b_s * tl.exp2(g * n) + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)

    if STORE_S_OUT:
        if i_s == n_seg - 1:
            p_so = s_out + i_n.to(tl.int64) * so_n + i_h * so_h + o_k[:, None] * so_r + o_v[None, :] * so_c
            tl.store(p_so, b_s.to(s_out.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _rev_sweep_kernel(
    a, b, c, y, g2, s_in, s_out, cu_seqlens,
    T, H, seg_len, n_seg,
    s_ab, s_at, s_ah, s_ad,
    s_bb, s_bt, s_bh, s_bd,
    s_cb, s_ct, s_ch, s_cd,
    s_yb, s_yt, s_yh, s_yd,
    si_n, si_h, si_s, si_r, si_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (C tiles, segments, N*H). a, b [.., R]; c, y [.., C]; G: s_in [N, H, n_seg, R, C] is the gradient of
    the state at each segment's end (one segment: dht [N, H, R, C], segment stride 0); s_out [N, H, R, C]
    receives G before the first token (dh0)."""
    i_c, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    seq_len = _seq_len(cu_seqlens, i_n, T, VARLEN)
    a = _seq_start(a, cu_seqlens, i_n, i_h, s_ab, s_at, s_ah, VARLEN)
    b = _seq_start(b, cu_seqlens, i_n, i_h, s_bb, s_bt, s_bh, VARLEN)
    c = _seq_start(c, cu_seqlens, i_n, i_h, s_cb, s_ct, s_ch, VARLEN)
    y = _seq_start(y, cu_seqlens, i_n, i_h, s_yb, s_yt, s_yh, VARLEN)

    t_lo = i_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, seq_len)
    n_chunks = tl.cdiv(t_hi - t_lo, BT)

    o_t = tl.arange(0, BT)
    o_a = tl.arange(0, BR)
    o_c = i_c * BC + tl.arange(0, BC)
    m_a = o_a < R
    m_c = o_c < C

    g = tl.load(g2 + i_h).to(tl.float32)
    o_f = o_t.to(tl.float32)
    d_a = tl.exp2(g * (o_f + 1.0))
    # P[j, i] = lambda^(i-j) (b_j . a_i) for i >= j: rows are keys j, columns queries i
    dif = o_f[None, :] - o_f[:, None]
    d_p = tl.where(dif >= 0, tl.exp2(g * tl.maximum(dif, 0.0)), 0.0)

    b_g = tl.zeros([BR, BC], dtype=tl.float32)
    if HAS_S_IN:
        p_s = s_in + i_n.to(tl.int64) * si_n + i_h * si_h + i_s.to(tl.int64) * si_s
        b_g += tl.load(p_s + o_a[:, None] * si_r + o_c[None, :] * si_c, mask=m_a[:, None] & m_c[None, :], other=0.0)

    for m in range(0, n_chunks):
        t0 = t_lo + (n_chunks - 1 - m) * BT
        b_a = _load_chunk(a, t_hi, t0, s_at, s_ad, 0, R, BT, BR)
        b_b = _load_chunk(b, t_hi, t0, s_bt, s_bd, 0, R, BT, BR)
        b_c = _load_chunk(c, t_hi, t0, s_ct, s_cd, i_c * BC, C, BT, BC)

        n = tl.minimum(t_hi - t0, BT).to(tl.float32)
        d_y = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
        # computed directly as b a^T (never as a transposed dot result: Triton 3.4-3.7 miscompiles
        # tl.dot(tl.trans(dot_result), ...) on Hopper)
        b_p = tl.dot(b_b, tl.trans(b_a), input_precision=PREC) * d_p
        b_y = tl.dot(b_p.to(b_c.dtype), b_c, input_precision=PREC)
        b_y += tl.dot(b_b, b_g.to(b_b.dtype), input_precision=PREC) * d_y[:, None]
        _store_chunk(y, b_y, t_hi, t0, s_yt, s_yd, i_c * BC, C, BT, BC)

        b_ad = (b_a * d_a[:, None]).to(b_a.dtype)
        b_g = b_g * tl.exp2(g * n) + tl.dot(tl.trans(b_ad), b_c, input_precision=PREC)

    if STORE_S_OUT:
        if i_s == 0:
            p_so = s_out + i_n.to(tl.int64) * so_n + i_h * so_h + o_a[:, None] * so_r + o_c[None, :] * so_c
            tl.store(p_so, b_g.to(s_out.dtype.element_ty), mask=m_a[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _seg_local_kernel(
    a, c, w, g2,
    T, H, seg_len, n_seg,
    s_ab, s_at, s_ah, s_ad,
    s_cb, s_ct, s_ch, s_cd,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    REVERSE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One segment's own state contribution, w [B, H, n_seg, R, C] fp32 (contiguous). Grid (C tiles, n_seg - 1, B*H).

    forward (a = K, c = V, segments 0..n_seg-2): W_s = sum_j lambda^(end-1-j) a_j^T c_j  (decayed to the segment end)
    reverse (a = Q, c = dO, segments 1..n_seg-1): W_s = sum_i lambda^(i-start+1) a_i^T c_i  (to before its start)
    """
    i_c, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if REVERSE:
        i_s += 1
    i_n, i_h = i_nh // H, i_nh % H
    a += i_n.to(tl.int64) * s_ab + i_h.to(tl.int64) * s_ah
    c += i_n.to(tl.int64) * s_cb + i_h.to(tl.int64) * s_ch
    t_lo = i_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, T)
    n_chunks = tl.cdiv(t_hi - t_lo, BT)

    o_t = tl.arange(0, BT)
    o_a = tl.arange(0, BR)
    o_c = i_c * BC + tl.arange(0, BC)
    m_a = o_a < R
    m_c = o_c < C
    g = tl.load(g2 + i_h).to(tl.float32)
    o_f = o_t.to(tl.float32)

    b_w = tl.zeros([BR, BC], dtype=tl.float32)
    for m in range(0, n_chunks):
        if REVERSE:
            t0 = t_lo + (n_chunks - 1 - m) * BT
        else:
            t0 = t_lo + m * BT
        b_a = _load_chunk(a, t_hi, t0, s_at, s_ad, 0, R, BT, BR)
        b_c = _load_chunk(c, t_hi, t0, s_ct, s_cd, i_c * BC, C, BT, BC)
        n = tl.minimum(t_hi - t0, BT).to(tl.float32)
        if REVERSE:
            d = tl.exp2(g * (o_f + 1.0))
        else:
            d = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
        b_ad = (b_a * d[:, None]).to(b_a.dtype)
        b_w = b_w * tl.exp2(g * n) + tl.dot(tl.trans(b_ad), b_c, input_precision=PREC)

    p_w = w + (i_nh.to(tl.int64) * n_seg + i_s) * (R * C)
    tl.store(p_w + o_a[:, None] * C + o_c[None, :], b_w, mask=m_a[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _seg_scan_kernel(
    w, s0, out, g2,
    T, H, seg_len, n_seg,
    s0_n, s0_h, s0_r, s0_c,
    C: tl.constexpr, RC: tl.constexpr, BLOCK: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """Chains segment states; w, out [B, H, n_seg, R, C] fp32 contiguous. Grid (cdiv(R*C, BLOCK), B*H).

    forward: out[0] = s0 (h0), out[s] = lambda^seg_len out[s-1] + w[s-1]   (state entering segment s)
    reverse: out[-1] = s0 (dht), out[s] = lambda^len(s+1) out[s+1] + w[s+1] (state gradient at segment s's end)
    """
    i_b, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < RC
    g = tl.load(g2 + i_h).to(tl.float32)
    x = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_S0:
        p0 = s0 + i_n.to(tl.int64) * s0_n + i_h * s0_h + (offs // C) * s0_r + (offs % C) * s0_c
        x += tl.load(p0, mask=m, other=0.0).to(tl.float32)
    base = i_nh.to(tl.int64) * n_seg * RC
    for it in range(0, n_seg):
        if REVERSE:
            i_s = n_seg - 1 - it
        else:
            i_s = it
        p = base + i_s * RC + offs
        tl.store(out + p, x, mask=m)
        ln = tl.minimum(seg_len, T - i_s * seg_len).to(tl.float32)
        b_w = tl.load(w + p, mask=m & (it < n_seg - 1), other=0.0)
        x = x * tl.exp2(g * ln) + b_w


# --------------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------------


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def plan_segments(n_heads_total: int, T: int, tiles: int, varlen: bool, device: torch.device) -> tuple[int, int]:
    """(n_seg, seg_len): cut each sequence into segments until the sweeps have ~target_ctas programs.

    Packed sequences (cu_seqlens) keep one segment each: their lengths live on the device and a plan
    would need a host sync.
    """
    cfg = CONFIG
    bt = cfg.chunk
    if varlen or T <= 0:
        return 1, max(T, 1)
    base = max(1, n_heads_total * tiles)
    if cfg.target_ctas:
        want = math.ceil(cfg.target_ctas / base)
    else:
        # H200 sweep (docs/kernels.md): a second segment costs an extra pass over k, v, so none once every
        # SM has a program; below that, fill two programs per SM without spilling into a second wave
        sms = _sm_count(device)
        want = 1 if base >= sms else max(1, (2 * sms) // base)
    n_seg = max(1, min(want, T // max(cfg.min_seg, bt)))
    seg_len = triton.cdiv(triton.cdiv(T, n_seg), bt) * bt
    return triton.cdiv(T, seg_len), seg_len


def _chunk_tile(full: int, tile: int) -> tuple[int, int]:
    """(BT, tile) of a sweep whose reduced (untiled) width is ``full``: wide ones get their own knobs.
    Chunks start at each segment's first token, so BT need not divide the segment length."""
    if full > 128:
        return CONFIG.wide_chunk, CONFIG.wide_tile
    return CONFIG.chunk, tile


def _warps(rows: int, cols: int) -> int:
    if CONFIG.num_warps:
        return CONFIG.num_warps
    return 4 if rows * cols <= 128 * 64 else 8


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 passes give ~fp32 accuracy; 16-bit inputs ignore it
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _bt_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _empty_like_bt(x: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, T, H, last] with x's B/T memory order: a [T, B, ...] view in gives a [T, B, ...]-ordered tensor out."""
    B, T, H = x.shape[:3]
    dtype = dtype or x.dtype
    if x.stride(0) < x.stride(1) and B > 1:
        out = torch.empty(T, B, H, last, dtype=dtype, device=x.device).transpose(0, 1)
    else:
        out = torch.empty(B, T, H, last, dtype=dtype, device=x.device)
    return _poison(out)


def _poison(t: torch.Tensor | None) -> torch.Tensor | None:
    if POISON_OUTPUTS and t is not None:
        t.fill_(float("nan"))
    return t


_STAGES: dict = {}


def _launch(kernel, grid, args: tuple, meta: dict) -> None:
    """Launches with CONFIG.num_stages, stepping the pipelining depth down when shared memory runs out
    (e.g. Dk = 256 tiles, or fp32 inputs); the depth that fits is remembered per kernel and tile shape."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel),) + tuple(sorted(meta.items()))
    stages = _STAGES.get(key, CONFIG.num_stages)
    while True:
        try:
            kernel[grid](*args, **meta, num_stages=stages)
            _STAGES[key] = stages
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


def _state_strides(s: torch.Tensor | None, transpose: bool = False, per_seg: bool = False) -> tuple[int, ...]:
    """(n, h, seg, row, col) strides of a [N, H, (S,) R, C] state; seg stride 0 for a single state."""
    if s is None:
        return (0, 0, 0, 0, 0)
    if per_seg:
        n, h, sg, r, c = s.stride()
    else:
        (n, h, r, c), sg = s.stride(), 0
    if transpose:
        r, c = c, r
    return (n, h, sg, r, c)


def _sweep(kernel, a, b, c, y, g2, s_in, s_in_strides, s_out, cu_seqlens, n_seg, seg_len, N, tile):
    """Launch a sweep kernel: y [.., C] from a, b [.., R] and c [.., C], in C tiles; s_out (optional) gets the
    state after the last token (forward) or before the first (reverse)."""
    B, T, H, R = a.shape
    C = c.shape[-1]
    BR = _pow2(R)
    bt, tile = _chunk_tile(BR, tile)
    BC = min(_pow2(C), tile) if tile else _pow2(C)
    so = _state_strides(s_out)
    grid = (triton.cdiv(C, BC), n_seg, N * H)
    args = (
        a, b, c, y, g2, s_in, s_out, cu_seqlens,
        T, H, seg_len, n_seg,
        *_bt_strides(a), *_bt_strides(b), *_bt_strides(c), *_bt_strides(y),
        *s_in_strides, so[0], so[1], so[3], so[4],
    )  # fmt: skip
    meta = dict(
        R=R, C=C, BR=BR, BC=BC, BT=bt,
        HAS_S_IN=s_in is not None, STORE_S_OUT=s_out is not None, VARLEN=cu_seqlens is not None,
        PREC=_prec(a.dtype), num_warps=_warps(BR, BC),
    )  # fmt: skip
    _launch(kernel, grid, args, meta)


def _segment_states(a, c, g2, s0, n_seg, seg_len, reverse, tile):
    """[B, H, n_seg, R, C] fp32: the state entering each segment (forward; s0 = h0), or the state gradient at
    each segment's end (reverse; s0 = dht)."""
    B, T, H, R = a.shape
    C = c.shape[-1]
    BR = _pow2(R)
    bt, tile = _chunk_tile(BR, tile)
    BC = min(_pow2(C), tile) if tile else _pow2(C)
    w = torch.empty(B, H, n_seg, R, C, dtype=torch.float32, device=a.device)
    out = torch.empty_like(w)
    _launch(
        _seg_local_kernel,
        (triton.cdiv(C, BC), n_seg - 1, B * H),
        (a, c, w, g2, T, H, seg_len, n_seg, *_bt_strides(a), *_bt_strides(c)),
        dict(R=R, C=C, BR=BR, BC=BC, BT=bt, REVERSE=reverse, PREC=_prec(a.dtype), num_warps=_warps(BR, BC)),
    )
    block = min(1024, triton.next_power_of_2(R * C))
    s0s = _state_strides(s0)
    _seg_scan_kernel[(triton.cdiv(R * C, block), B * H)](
        w, s0, out, g2, T, H, seg_len, n_seg, s0s[0], s0s[1], s0s[3], s0s[4],
        C=C, RC=R * C, BLOCK=block, HAS_S0=s0 is not None, REVERSE=reverse, num_warps=4,
    )  # fmt: skip
    return out


class LightningAttentionFunction(torch.autograd.Function):
    """(q, k, v, slope, h0) -> (o, final state); gradients for q, k, v and h0; the final state's gradient is used."""

    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, output_final_state, cu_seqlens):
        B, T, H, K = q.shape
        V = v.shape[-1]
        varlen = cu_seqlens is not None
        N = cu_seqlens.numel() - 1 if varlen else B
        g2 = (slope.detach().to(torch.float32) * -LOG2E).contiguous()
        tile = CONFIG.fwd_tile
        BV = min(_pow2(V), tile) if tile else _pow2(V)
        n_seg, seg_len = plan_segments(N * H, T, triton.cdiv(V, BV), varlen, q.device)

        o = _empty_like_bt(q, V)
        ht = _poison(torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)) if output_final_state else None
        s_seg = None
        if n_seg > 1:
            s_seg = _segment_states(k, v, g2, initial_state, n_seg, seg_len, False, tile)
            s_in, s_in_strides = s_seg, _state_strides(s_seg, per_seg=True)
        else:
            s_in, s_in_strides = initial_state, _state_strides(initial_state)
        _sweep(_fwd_sweep_kernel, q, k, v, o, g2, s_in, s_in_strides, ht, cu_seqlens, n_seg, seg_len, N, tile)

        ctx.save_for_backward(q, k, v, g2, initial_state, s_seg, cu_seqlens)
        ctx.plan = (N, n_seg, seg_len)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g2, h0, s_seg, cu_seqlens = ctx.saved_tensors
        N, n_seg, seg_len = ctx.plan
        want_dh0 = h0 is not None and ctx.needs_input_grad[4]

        # dQ: the forward recurrence of (dO, V, K) from the transposed states
        dq = _empty_like_bt(q, q.shape[-1])
        if s_seg is not None:
            s_in, s_in_strides = s_seg, _state_strides(s_seg, transpose=True, per_seg=True)
        else:
            s_in, s_in_strides = h0, _state_strides(h0, transpose=True)
        tile = CONFIG.fwd_tile
        _sweep(_fwd_sweep_kernel, do, v, k, dq, g2, s_in, s_in_strides, None, cu_seqlens, n_seg, seg_len, N, tile)

        # the state gradient at every segment's end
        if n_seg > 1:
            ds_seg = _segment_states(q, do, g2, dht, n_seg, seg_len, True, CONFIG.rev_tile)
            g_in, g_dv, g_dk = ds_seg, _state_strides(ds_seg, per_seg=True), _state_strides(ds_seg, True, True)
        else:
            g_in, g_dv, g_dk = dht, _state_strides(dht), _state_strides(dht, transpose=True)

        dh0 = _poison(torch.empty(h0.shape, dtype=torch.float32, device=q.device)) if want_dh0 else None
        dv = _empty_like_bt(v, v.shape[-1])
        _sweep(_rev_sweep_kernel, q, k, do, dv, g2, g_in, g_dv, dh0, cu_seqlens, n_seg, seg_len, N, CONFIG.rev_tile)
        dk = _empty_like_bt(k, k.shape[-1])
        _sweep(_rev_sweep_kernel, do, v, q, dk, g2, g_in, g_dk, None, cu_seqlens, n_seg, seg_len, N, CONFIG.rev_tile)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return dq, dk, dv, None, dh0, None, None


def chunk_lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton lightning attention (inputs already checked by the public ``lightning_attention``).

    Args:
        q, k: [B, T, H, Dk] bf16/fp16/fp32, any strides; v: [B, T, H, Dv] same dtype.
        slope: [H]; initial_state: [N, H, Dk, Dv] (fp32); cu_seqlens: [N + 1] int (B = 1).

    Returns:
        (o [B, T, H, Dv] in q's dtype with q's B/T memory order, final state [N, H, Dk, Dv] fp32 or None)
    """
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the Triton kernels take bf16, fp16 or fp32 inputs; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before megatron_tnllm is imported")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device)
    return LightningAttentionFunction.apply(q, k, v, slope, initial_state, output_final_state, cu_seqlens)
