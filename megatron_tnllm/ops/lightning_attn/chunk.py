"""Triton lightning attention for training and prefill: forward, backward, packed sequences.

Math (per head, lambda = exp(-slope), g = log2(lambda) <= 0, chunk of n <= BT tokens, i, j = 0..n-1):

    O  = ((Q K^T) * D) V + diag(lambda^(i+1)) Q S,         D_ij = lambda^(i-j) for i >= j, else 0
    S <- lambda^n S + (diag(lambda^(n-1-j)) K)^T V

Only powers >= 0 of lambda are ever formed (exp2 of g times a count >= 0): slopes from 0 to 8 per token
underflow to 0 cleanly instead of overflowing. Causal masks are selects (``tl.where``), never products with a
0/1 mask. A segment whose state comes out non-finite raises a fix flag, and a second launch of the same
kernel (``RERUN``: one program, which finds no flag in the common case) runs it again with ``_tri_product``'s
SAFE form (the value operand of the masked intra-chunk product zeroed where non-finite, NaN put back inside each
row's triangle): a NaN / inf at position t reaches only the rows that depend on t (o and dq at >= t, dk and dv
at <= t). The re-run has a launch of its own because its code in the sweep costs the sweep registers even when
it never runs (docs/kernels.md §5, v4.3).

Kernels (one job each):

* ``_fwd_sweep_kernel``: walks the chunks of one segment forward with the fp32 state S in registers and
  writes O; no per-chunk state ever reaches HBM. It also computes dQ: dQ = fwd(dO, V, K) with the
  transposed state, because dq_t = sum_{s<=t} lambda^(t-s) (do_t . v_s) k_s + lambda^(t+1) do_t S0^T.
* ``_rev_sweep_kernel``: walks the chunks of one segment backward with the fp32 state gradient G in
  registers. With (a, b, c) = (Q, K, dO) and G = dS it yields dV; with (dO, V, Q) and G = dS^T, dK (two
  roles of one launch when their widths and stride kinds agree):

      Y_j = sum_{i >= j} lambda^(i-j) (b_j . a_i) c_i + lambda^(n-1-j) b_j G,
      G  <- lambda^n G + (diag(lambda^(i+1)) A)^T C.

* Segments (the chunk-parallel two-level scheme): when batch x heads is too small to fill the GPU, each
  sequence is cut into segments of ``seg_len`` tokens; every segment's own state contribution is computed
  in parallel, the contributions are chained (a short serial loop over segments), and the sweeps run all
  segments in parallel from those states. By default the sweeps do this themselves (``_claim``,
  ``_publish``, ``_collect``: tickets, flags and epochs in a per-(device, stream) buffer, so a program only
  ever waits for segments that started before it); ``_seg_local_kernel`` and ``_seg_scan_kernel`` are the
  two-launch form (``CONFIG.fused_segments = False``): 4-12 % less GPU time at the tensor-parallel shapes,
  ~0.1 ms more host time per eager call (docs/kernels.md §5), for steps replayed from a CUDA graph.

Layouts: q, k [B, T, H, Dk]; v, o [B, T, H, Dv], any strides (read through them, never copied); states
[N, H, Dk, Dv] fp32; slope [H]. Dot operands are in the input dtype (bf16/fp16 tensor cores; tf32x3 for
fp32 inputs), accumulation and the state are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from megatron_tnllm.ops.backend import check_triton_device, poison, sm_count

__all__ = ["KernelConfig", "CONFIG", "chunk_lightning_attention", "plan_segments"]

LOG2E = 1.4426950408889634
# the re-run programs scan the fix flags this many at a time
FIX_BLOCK = tl.constexpr(1024)


@dataclass
class KernelConfig:
    """Launch knobs (module-level ``CONFIG``; the benchmark sweeps them, tests shrink them).

    chunk: tokens per chunk (BT). fwd_tile: output-column tile of the forward / dQ sweeps (of Dv, resp. Dk;
    0 = the whole width). rev_tile: output-column tile of the dV / dK sweeps. wide_chunk, wide_tile: chunk
    and tile of the sweeps whose reduced width is 256 (the LRPE layer's Dk): their q/k tiles are twice as
    large in shared memory.
    target_ctas: programs wanted per launch before cutting sequences into segments (0 = automatic: one
    segment once batch x heads x tiles reaches the SM count, else as many as fill two programs per SM).
    min_seg: shortest segment in tokens of the backward sweeps. fwd_min_seg: of the forward sweep (0, or above
    min_seg: min_seg); the backward's segments are whole multiples of the forward's and read every k-th of
    their saved states (v4.2, docs/kernels.md §5: shorter forward segments speed the forward at small
    batch x heads, where shorter backward ones cost more than they gain).
    num_warps: 0 = by state-tile size. num_stages: software-pipelining
    depth of the chunk loads (stepped down automatically when shared memory runs out). fused_segments: form
    the segments' states inside the sweeps (one launch per sweep) instead of two extra launches per direction
    (which cost host time in eager calls and save GPU time: docs/kernels.md §5).
    """

    chunk: int = 64
    fwd_tile: int = 64
    rev_tile: int = 64
    wide_chunk: int = 64
    wide_tile: int = 64
    target_ctas: int = 0
    min_seg: int = 512
    fwd_min_seg: int = 256
    num_warps: int = 0
    num_stages: int = 2
    fused_segments: bool = True


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
    addressing scalar (per-element 64-bit pointer tensors push the sweeps past 255 registers: docs/kernels.md, v3)."""
    p = tl.make_block_ptr(x, (t_hi, W), (s_t, s_d), (t0, col0), (BT, BW), (1, 0))
    return tl.load(p, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _store_chunk(x, val, t_hi, t0, s_t, s_d, col0, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    p = tl.make_block_ptr(x, (t_hi, W), (s_t, s_d), (t0, col0), (BT, BW), (1, 0))
    tl.store(p, val.to(x.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _nonfinite(x):
    """1.0 where x is NaN or +-inf, else 0.0 (x * 0 is 0 exactly for finite x)."""
    return tl.where(x * 0.0 == 0.0, 0.0, 1.0)


@triton.jit
def _tri_product(m, x, tri, PREC: tl.constexpr, SAFE: tl.constexpr):
    """m @ x for m [BT, BT] (fp32, zero outside the triangle ``tri`` [BT, BT] bool) and x [BT, BW].

    SAFE: x's non-finite entries are zeroed for the product (a 0 * NaN outside the triangle would reach rows
    that do not depend on them) and y[i, c] is NaN where some x[j, c] with tri[i, j] is non-finite. The
    sweeps run SAFE only when re-running a segment whose state came out non-finite (rare): the fast path
    keeps x in shared memory for the dot, and the extra tiles would spill registers there.
    """
    if SAFE:
        bad = _nonfinite(x)
        y = tl.dot(m.to(x.dtype), tl.where(bad > 0.0, 0.0, x).to(x.dtype), input_precision=PREC)
        reach = tl.dot(tl.where(tri, 1.0, 0.0).to(tl.float16), bad.to(tl.float16))  # counts <= BT: exact
        y = tl.where(reach > 0.0, float("nan"), y)
    else:
        y = tl.dot(m.to(x.dtype), x, input_precision=PREC)
    return y


@triton.jit
def _claim(sync, n_tiles, n_rows, n_seg, REVERSE: tl.constexpr):
    """(tile, segment, row, epoch) of this program, handed out in launch order by a ticket counter.

    sync [4] int32 (tickets, finished programs, epoch): the program holding the last ticket resets the
    counter for the next launch. Tickets go segment by segment (forward: 0 first; reverse: the last first), so
    every segment a program waits for holds a smaller ticket and has started: no program waits on one that
    cannot run. The epoch (launches finished so far) tells this launch's flags from older ones.
    """
    tk = tl.atomic_add(sync, 1)
    if tk == n_tiles * n_rows * n_seg - 1:
        tl.atomic_xchg(sync, 0)
    epoch = tl.atomic_add(sync + 2, 0)
    i_t = tk % n_tiles
    i_row = (tk // n_tiles) % n_rows
    i_s = tk // (n_tiles * n_rows)
    if REVERSE:
        i_s = n_seg - 1 - i_s
    return i_t, i_s, i_row, epoch


@triton.jit
def _finish(sync, total):
    """The last program to finish resets the finished count and advances the epoch."""
    if tl.atomic_add(sync + 1, 1) == total - 1:
        tl.atomic_xchg(sync + 1, 0)
        tl.atomic_add(sync + 2, 1)


@triton.jit
def _publish(ws, flags, slot, b_w, epoch, BR: tl.constexpr, BC: tl.constexpr):
    """Writes a segment's own state contribution to ws[slot] [BR, BC] fp32, then raises flags[slot]."""
    o_r = tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    tl.store(ws + slot.to(tl.int64) * (BR * BC) + o_r[:, None] * BC + o_c[None, :], b_w)
    tl.debug_barrier()
    tl.atomic_xchg(flags + slot, epoch + 1, sem="release", scope="gpu")


@triton.jit
def _collect(ws, flags, slot, epoch, BR: tl.constexpr, BC: tl.constexpr, WAIT: tl.constexpr):
    """Waits for flags[slot] of this launch and reads ws[slot] (past L1: another SM wrote it). Not WAIT: the
    re-run launch, which follows the launch that wrote every slot."""
    if WAIT:
        while tl.atomic_add(flags + slot, 0, sem="acquire", scope="gpu") != epoch + 1:
            pass
    o_r = tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    return tl.load(ws + slot.to(tl.int64) * (BR * BC) + o_r[:, None] * BC + o_c[None, :], cache_modifier=".cg")


@triton.jit
def _local_state(a, c, g, t_lo, t_hi, s_at, s_ad, s_ct, s_cd, col0,
                 R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
                 REVERSE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """A segment's own state contribution [BR, BC] fp32 over tokens [t_lo, t_hi):

    forward (a = K, c = V): W = sum_j lambda^(t_hi-1-j) a_j^T c_j            (decayed to the segment's end)
    reverse (a = Q, c = dO): W = sum_i lambda^(i-t_lo+1) a_i^T c_i            (decayed to before its start)
    """
    o_f = tl.arange(0, BT).to(tl.float32)
    n_chunks = tl.cdiv(t_hi - t_lo, BT)
    b_w = tl.zeros([BR, BC], dtype=tl.float32)
    for m in range(0, n_chunks):
        if REVERSE:
            t0 = t_lo + (n_chunks - 1 - m) * BT
        else:
            t0 = t_lo + m * BT
        b_a = _load_chunk(a, t_hi, t0, s_at, s_ad, 0, R, BT, BR)
        b_c = _load_chunk(c, t_hi, t0, s_ct, s_cd, col0, C, BT, BC)
        n = tl.minimum(t_hi - t0, BT).to(tl.float32)
        if REVERSE:
            d = tl.exp2(g * (o_f + 1.0))
        else:
            d = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
        b_ad = (b_a * d[:, None]).to(b_a.dtype)
        b_w = b_w * tl.exp2(g * n) + tl.dot(tl.trans(b_ad), b_c, input_precision=PREC)
    return b_w


@triton.jit
def _fwd_entering(s_in, ws, flags, g, seg_len, n_seg, i_n, i_h, i_s, key, epoch, si_n, si_h, si_s, si_r, si_c,
                  o_k, o_v, m_k, m_v, BR: tl.constexpr, BC: tl.constexpr, HAS_S_IN: tl.constexpr,
                  COMBINE: tl.constexpr, WAIT: tl.constexpr):  # fmt: skip
    """The state entering segment i_s: s_in's (per segment, or h0), or COMBINE: lambda^(i_s seg_len) h0 +
    sum_{j < i_s} lambda^((i_s-1-j) seg_len) W_j over the published contributions (Horner)."""
    b_s = tl.zeros([BR, BC], dtype=tl.float32)
    if HAS_S_IN:
        p_s = s_in + i_n.to(tl.int64) * si_n + i_h * si_h + i_s.to(tl.int64) * si_s
        b_s += tl.load(p_s + o_k[:, None] * si_r + o_v[None, :] * si_c, mask=m_k[:, None] & m_v[None, :], other=0.0)
    if COMBINE:
        d_seg = tl.exp2(g * seg_len.to(tl.float32))
        for j in range(0, i_s):
            b_s = b_s * d_seg + _collect(ws, flags, key * n_seg + j, epoch, BR, BC, WAIT)
    return b_s


@triton.jit
def _fwd_chunk(q, k, v, o, b_s, t0, t_hi, s_qt, s_qd, s_kt, s_kd, s_vt, s_vd, s_ot, s_od, col0, g, o_f, d_q, d_a,
               R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
               PREC: tl.constexpr, SAFE: tl.constexpr):  # fmt: skip
    """One chunk of the forward sweep: writes o[t0 : t0 + BT] and returns the state after it."""
    b_q = _load_chunk(q, t_hi, t0, s_qt, s_qd, 0, R, BT, BR)
    b_k = _load_chunk(k, t_hi, t0, s_kt, s_kd, 0, R, BT, BR)
    b_v = _load_chunk(v, t_hi, t0, s_vt, s_vd, col0, C, BT, BC)

    # intra-chunk: masked (a select: a NaN key beyond row i stays out), decayed Q K^T, then times V
    b_a = tl.where(d_a >= 0.0, tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * d_a, 0.0)
    b_o = _tri_product(b_a, b_v, d_a >= 0.0, PREC, SAFE)
    # inter-chunk: the state entering this chunk
    b_o += tl.dot(b_q, b_s.to(b_q.dtype), input_precision=PREC) * d_q[:, None]
    _store_chunk(o, b_o, t_hi, t0, s_ot, s_od, col0, C, BT, BC)

    # state update with the true chunk length n (the last chunk may be partial); the true v: NaN carries on
    n = tl.minimum(t_hi - t0, BT).to(tl.float32)
    d_k = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
    b_kd = (b_k * d_k[:, None]).to(b_k.dtype)
    return b_s * tl.exp2(g * n) + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)


@triton.jit
def _fwd_segment(
    q, k, v, o, g2, s_in, s_out, s_seg, cu_seqlens, ws, flags, fix, i_v, i_s, i_nh, epoch,
    T, H, seg_len, n_seg, n_tiles,
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_ob, s_ot, s_oh, s_od,
    si_n, si_h, si_s, si_r, si_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    COMBINE: tl.constexpr, STORE_SEG: tl.constexpr, SAFE: tl.constexpr,
):  # fmt: skip
    """Segment i_s of (sequence, head) i_nh, column tile i_v. The sweep (not SAFE) publishes the segment's own
    contribution, waits for its predecessors', writes o (and the saved and final states) and raises
    fix[slot] when its state comes out non-finite. The re-run (SAFE) writes o again with the causal
    intra-chunk product, from the contributions the sweep left in ws."""
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
    key = i_nh * n_tiles + i_v
    if not SAFE:
        if COMBINE:
            if i_s < n_seg - 1:
                b_w = _local_state(k, v, g, t_lo, t_hi, s_kt, s_kd, s_vt, s_vd, i_v * BC, R, C, BR, BC, BT, False,
                                   PREC)  # fmt: skip
                _publish(ws, flags, key * n_seg + i_s, b_w, epoch, BR, BC)

    b_s = _fwd_entering(s_in, ws, flags, g, seg_len, n_seg, i_n, i_h, i_s, key, epoch, si_n, si_h, si_s, si_r, si_c,
                        o_k, o_v, m_k, m_v, BR, BC, HAS_S_IN, COMBINE, not SAFE)  # fmt: skip
    if not SAFE:
        if STORE_SEG:
            p_sg = s_seg + (i_nh.to(tl.int64) * n_seg + i_s) * (R * C)
            tl.store(p_sg + o_k[:, None] * C + o_v[None, :], b_s, mask=m_k[:, None] & m_v[None, :])

    o_f = o_t.to(tl.float32)
    d_q = tl.exp2(g * (o_f + 1.0))
    # lambda^(i-j) on and below the diagonal, -1 above: the causal mask is d_a >= 0, a select (one live tile)
    dif = o_f[:, None] - o_f[None, :]
    d_a = tl.where(dif >= 0, tl.exp2(g * tl.maximum(dif, 0.0)), -1.0)

    n_chunks = tl.cdiv(t_hi - t_lo, BT)
    for m in range(0, n_chunks):
        b_s = _fwd_chunk(q, k, v, o, b_s, t_lo + m * BT, t_hi, s_qt, s_qd, s_kt, s_kd, s_vt, s_vd, s_ot, s_od,
                         i_v * BC, g, o_f, d_q, d_a, R, C, BR, BC, BT, PREC, SAFE)  # fmt: skip

    if not SAFE:
        if STORE_S_OUT:
            if i_s == n_seg - 1:
                p_so = s_out + i_n.to(tl.int64) * so_n + i_h * so_h + o_k[:, None] * so_r + o_v[None, :] * so_c
                tl.store(p_so, b_s.to(s_out.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
        # a non-finite input in this segment (its state shows it): the re-run launch repeats it causally
        if tl.sum(_nonfinite(b_s)) > 0:
            tl.store(fix + key * n_seg + i_s, 1)


@triton.jit(do_not_specialize=["T", "H", "NH", "seg_len", "n_seg", "n_tiles"])
def _fwd_sweep_kernel(
    q, k, v, o, g2, s_in, s_out, s_seg, cu_seqlens, ws, flags, sync, fix,
    T, H, NH, seg_len, n_seg, n_tiles,
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_ob, s_ot, s_oh, s_od,
    si_n, si_h, si_s, si_r, si_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    COMBINE: tl.constexpr, STORE_SEG: tl.constexpr, RERUN: tl.constexpr,
):  # fmt: skip
    """n_tiles * n_seg * NH programs (C tiles, segments, N*H). q, k [.., R]; v, o [.., C]; s_in [N, H, n_seg, R, C]
    (the state entering each segment; or h0 [N, H, R, C], read with segment stride 0); s_out [N, H, R, C].

    COMBINE: the segments' entering states are formed here: each program computes its segment's own
    contribution, publishes it (ws [N*H*n_tiles, n_seg, BR, BC] fp32, flags), and adds up its predecessors'
    (s_in then holds h0); STORE_SEG saves each entering state to s_seg [N, H, n_seg, R, C] for the backward.
    RERUN: one program that, after the sweep, repeats with the causal product every segment whose fix flag
    [N*H*n_tiles, n_seg] the sweep raised (rare: a non-finite input), and lowers the flag. Keeping that path out
    of the sweep's code keeps its registers (docs/kernels.md, v4.3).
    """
    if RERUN:
        n_slots = NH * n_tiles * n_seg
        for base in range(0, n_slots, FIX_BLOCK):
            o_fx = base + tl.arange(0, FIX_BLOCK)
            if tl.max(tl.load(fix + o_fx, mask=o_fx < n_slots, other=0)) > 0:
                for slot in range(base, tl.minimum(base + FIX_BLOCK, n_slots)):
                    if tl.load(fix + slot) > 0:
                        tl.store(fix + slot, 0)
                        key = slot // n_seg
                        _fwd_segment(
                            q, k, v, o, g2, s_in, s_out, s_seg, cu_seqlens, ws, flags, fix,
                            key % n_tiles, slot % n_seg, key // n_tiles, 0, T, H, seg_len, n_seg, n_tiles,
                            s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
                            s_ob, s_ot, s_oh, s_od, si_n, si_h, si_s, si_r, si_c, so_n, so_h, so_r, so_c,
                            R, C, BR, BC, BT, HAS_S_IN, STORE_S_OUT, VARLEN, PREC, COMBINE, STORE_SEG, True,
                        )  # fmt: skip
    else:
        if COMBINE:
            i_v, i_s, i_nh, epoch = _claim(sync, n_tiles, NH, n_seg, False)
        else:
            i_v, i_s, i_nh, epoch = tl.program_id(0), tl.program_id(1), tl.program_id(2), 0
        _fwd_segment(
            q, k, v, o, g2, s_in, s_out, s_seg, cu_seqlens, ws, flags, fix, i_v, i_s, i_nh, epoch,
            T, H, seg_len, n_seg, n_tiles,
            s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
            s_ob, s_ot, s_oh, s_od, si_n, si_h, si_s, si_r, si_c, so_n, so_h, so_r, so_c,
            R, C, BR, BC, BT, HAS_S_IN, STORE_S_OUT, VARLEN, PREC, COMBINE, STORE_SEG, False,
        )  # fmt: skip
        if COMBINE:
            _finish(sync, n_tiles * NH * n_seg)


@triton.jit
def _rev_entering(s_in, ws, flags, g, T, seg_len, n_seg, i_n, i_h, i_s, key, epoch, si_n, si_h, si_s, si_r, si_c,
                  o_a, o_c, m_a, m_c, BR: tl.constexpr, BC: tl.constexpr, HAS_S_IN: tl.constexpr,
                  COMBINE: tl.constexpr, WAIT: tl.constexpr):  # fmt: skip
    """G at segment i_s's end: s_in's (per segment, or dht), or COMBINE: dht and every later segment's
    published contribution, decayed (Horner from the last segment)."""
    b_g = tl.zeros([BR, BC], dtype=tl.float32)
    if HAS_S_IN:
        p_s = s_in + i_n.to(tl.int64) * si_n + i_h * si_h + i_s.to(tl.int64) * si_s
        b_g += tl.load(p_s + o_a[:, None] * si_r + o_c[None, :] * si_c, mask=m_a[:, None] & m_c[None, :], other=0.0)
    if COMBINE:
        for jj in range(0, n_seg - 1 - i_s):
            j = n_seg - 1 - jj
            d_seg = tl.exp2(g * tl.minimum(seg_len, T - j * seg_len).to(tl.float32))
            b_g = b_g * d_seg + _collect(ws, flags, key * n_seg + j, epoch, BR, BC, WAIT)
    return b_g


@triton.jit
def _rev_chunk(a, b, c, y, b_g, t0, t_hi, s_at, s_ad, s_bt, s_bd, s_ct, s_cd, s_yt, s_yd, col0, g, o_f, d_a, d_p,
               R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
               PREC: tl.constexpr, SAFE: tl.constexpr):  # fmt: skip
    """One chunk of the reverse sweep: writes y[t0 : t0 + BT] and returns G before it."""
    b_a = _load_chunk(a, t_hi, t0, s_at, s_ad, 0, R, BT, BR)
    b_b = _load_chunk(b, t_hi, t0, s_bt, s_bd, 0, R, BT, BR)
    b_c = _load_chunk(c, t_hi, t0, s_ct, s_cd, col0, C, BT, BC)

    n = tl.minimum(t_hi - t0, BT).to(tl.float32)
    d_y = tl.where(o_f < n, tl.exp2(g * tl.maximum(n - 1.0 - o_f, 0.0)), 0.0)
    # computed directly as b a^T (never as a transposed dot result: Triton 3.4-3.7 miscompiles
    # tl.dot(tl.trans(dot_result), ...) on Hopper)
    b_p = tl.where(d_p >= 0.0, tl.dot(b_b, tl.trans(b_a), input_precision=PREC) * d_p, 0.0)
    b_y = _tri_product(b_p, b_c, d_p >= 0.0, PREC, SAFE)
    b_y += tl.dot(b_b, b_g.to(b_b.dtype), input_precision=PREC) * d_y[:, None]
    _store_chunk(y, b_y, t_hi, t0, s_yt, s_yd, col0, C, BT, BC)

    b_ad = (b_a * d_a[:, None]).to(b_a.dtype)
    return b_g * tl.exp2(g * n) + tl.dot(tl.trans(b_ad), b_c, input_precision=PREC)


@triton.jit
def _rev_segment(
    a0, b0, c0, y0, a1, b1, c1, y1, g2, s_in, s_out, cu_seqlens, ws, flags, fix, i_c, i_s, i_row, epoch,
    T, H, NH, seg_len, n_seg, n_tiles,
    s_a0b, s_a0t, s_a0h, s_a0d, s_b0b, s_b0t, s_b0h, s_b0d, s_c0b, s_c0t, s_c0h, s_c0d, s_y0b, s_y0t, s_y0h, s_y0d,
    s_a1b, s_a1t, s_a1h, s_a1d, s_b1b, s_b1t, s_b1h, s_b1d, s_c1b, s_c1t, s_c1h, s_c1d, s_y1b, s_y1t, s_y1h, s_y1d,
    si0_n, si0_h, si0_s, si0_r, si0_c,
    si1_n, si1_h, si1_s, si1_r, si1_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    COMBINE: tl.constexpr, SAFE: tl.constexpr,
):  # fmt: skip
    """Segment i_s of row i_row (role-major N*H), column tile i_c: the sweep (not SAFE) or its causal re-run
    (SAFE), as ``_fwd_segment``, backwards."""
    role = i_row // NH
    i_nh = i_row % NH
    if role == 0:
        a, s_ab, s_at, s_ah, s_ad = a0, s_a0b, s_a0t, s_a0h, s_a0d
        b, s_bb, s_bt, s_bh, s_bd = b0, s_b0b, s_b0t, s_b0h, s_b0d
        c, s_cb, s_ct, s_ch, s_cd = c0, s_c0b, s_c0t, s_c0h, s_c0d
        y, s_yb, s_yt, s_yh, s_yd = y0, s_y0b, s_y0t, s_y0h, s_y0d
        si_n, si_h, si_s, si_r, si_c = si0_n, si0_h, si0_s, si0_r, si0_c
    else:
        a, s_ab, s_at, s_ah, s_ad = a1, s_a1b, s_a1t, s_a1h, s_a1d
        b, s_bb, s_bt, s_bh, s_bd = b1, s_b1b, s_b1t, s_b1h, s_b1d
        c, s_cb, s_ct, s_ch, s_cd = c1, s_c1b, s_c1t, s_c1h, s_c1d
        y, s_yb, s_yt, s_yh, s_yd = y1, s_y1b, s_y1t, s_y1h, s_y1d
        si_n, si_h, si_s, si_r, si_c = si1_n, si1_h, si1_s, si1_r, si1_c
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
    key = i_row * n_tiles + i_c
    if not SAFE:
        if COMBINE:
            if i_s > 0:
                b_w = _local_state(a, c, g, t_lo, t_hi, s_at, s_ad, s_ct, s_cd, i_c * BC, R, C, BR, BC, BT, True,
                                   PREC)  # fmt: skip
                _publish(ws, flags, key * n_seg + i_s, b_w, epoch, BR, BC)

    b_g = _rev_entering(s_in, ws, flags, g, T, seg_len, n_seg, i_n, i_h, i_s, key, epoch, si_n, si_h, si_s, si_r,
                        si_c, o_a, o_c, m_a, m_c, BR, BC, HAS_S_IN, COMBINE, not SAFE)  # fmt: skip

    o_f = o_t.to(tl.float32)
    d_a = tl.exp2(g * (o_f + 1.0))
    # P[j, i] = lambda^(i-j) (b_j . a_i) for i >= j: rows are keys j, columns queries i; -1 marks i < j
    dif = o_f[None, :] - o_f[:, None]
    d_p = tl.where(dif >= 0, tl.exp2(g * tl.maximum(dif, 0.0)), -1.0)

    for m in range(0, n_chunks):
        b_g = _rev_chunk(a, b, c, y, b_g, t_lo + (n_chunks - 1 - m) * BT, t_hi, s_at, s_ad, s_bt, s_bd, s_ct, s_cd,
                         s_yt, s_yd, i_c * BC, g, o_f, d_a, d_p, R, C, BR, BC, BT, PREC, SAFE)  # fmt: skip

    if not SAFE:
        if STORE_S_OUT:
            if role == 0:
                if i_s == 0:
                    p_so = s_out + i_n.to(tl.int64) * so_n + i_h * so_h + o_a[:, None] * so_r + o_c[None, :] * so_c
                    tl.store(p_so, b_g.to(s_out.dtype.element_ty), mask=m_a[:, None] & m_c[None, :])
        # a non-finite input in this segment (its state gradient shows it): the re-run launch repeats it causally
        if tl.sum(_nonfinite(b_g)) > 0:
            tl.store(fix + key * n_seg + i_s, 1)


@triton.jit(do_not_specialize=["T", "H", "NH", "seg_len", "n_seg", "n_tiles", "si0_n", "si0_h", "si0_s", "si0_r",
                               "si0_c", "si1_n", "si1_h", "si1_s", "si1_r", "si1_c"])  # fmt: skip
def _rev_sweep_kernel(
    a0, b0, c0, y0, a1, b1, c1, y1, g2, s_in, s_out, cu_seqlens, ws, flags, sync, fix,
    T, H, NH, seg_len, n_seg, n_tiles,
    s_a0b, s_a0t, s_a0h, s_a0d, s_b0b, s_b0t, s_b0h, s_b0d, s_c0b, s_c0t, s_c0h, s_c0d, s_y0b, s_y0t, s_y0h, s_y0d,
    s_a1b, s_a1t, s_a1h, s_a1d, s_b1b, s_b1t, s_b1h, s_b1d, s_c1b, s_c1t, s_c1h, s_c1d, s_y1b, s_y1t, s_y1h, s_y1d,
    si0_n, si0_h, si0_s, si0_r, si0_c,
    si1_n, si1_h, si1_s, si1_r, si1_c,
    so_n, so_h, so_r, so_c,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, ROLES: tl.constexpr,
    HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    COMBINE: tl.constexpr, RERUN: tl.constexpr,
):  # fmt: skip
    """n_tiles * n_seg * ROLES*NH programs (C tiles, segments, role-major N*H). Role r reads (a_r, b_r, c_r) and
    writes y_r: a, b [.., R]; c, y [.., C] (dV is role 0: (Q, K, dO); dK role 1: (dO, V, Q), when Dk = Dv both
    run in one launch). G: s_in [N, H, n_seg, R, C] with role r's strides si_r is the gradient of the state at
    each segment's end (one segment, or COMBINE: dht [N, H, R, C], segment stride 0); s_out [N, H, R, C]
    receives role 0's G before the first token (dh0). COMBINE: as in ``_fwd_sweep_kernel``, backwards; RERUN
    likewise (fix [ROLES*N*H*n_tiles, n_seg]).
    """
    if RERUN:
        n_slots = ROLES * NH * n_tiles * n_seg
        for base in range(0, n_slots, FIX_BLOCK):
            o_fx = base + tl.arange(0, FIX_BLOCK)
            if tl.max(tl.load(fix + o_fx, mask=o_fx < n_slots, other=0)) > 0:
                for slot in range(base, tl.minimum(base + FIX_BLOCK, n_slots)):
                    if tl.load(fix + slot) > 0:
                        tl.store(fix + slot, 0)
                        key = slot // n_seg
                        _rev_segment(
                            a0, b0, c0, y0, a1, b1, c1, y1, g2, s_in, s_out, cu_seqlens, ws, flags, fix,
                            key % n_tiles, slot % n_seg, key // n_tiles, 0, T, H, NH, seg_len, n_seg, n_tiles,
                            s_a0b, s_a0t, s_a0h, s_a0d, s_b0b, s_b0t, s_b0h, s_b0d,
                            s_c0b, s_c0t, s_c0h, s_c0d, s_y0b, s_y0t, s_y0h, s_y0d,
                            s_a1b, s_a1t, s_a1h, s_a1d, s_b1b, s_b1t, s_b1h, s_b1d,
                            s_c1b, s_c1t, s_c1h, s_c1d, s_y1b, s_y1t, s_y1h, s_y1d,
                            si0_n, si0_h, si0_s, si0_r, si0_c, si1_n, si1_h, si1_s, si1_r, si1_c,
                            so_n, so_h, so_r, so_c,
                            R, C, BR, BC, BT, HAS_S_IN, STORE_S_OUT, VARLEN, PREC, COMBINE, True,
                        )  # fmt: skip
    else:
        if COMBINE:
            i_c, i_s, i_row, epoch = _claim(sync, n_tiles, NH * ROLES, n_seg, True)
        else:
            i_c, i_s, i_row, epoch = tl.program_id(0), tl.program_id(1), tl.program_id(2), 0
        _rev_segment(
            a0, b0, c0, y0, a1, b1, c1, y1, g2, s_in, s_out, cu_seqlens, ws, flags, fix, i_c, i_s, i_row, epoch,
            T, H, NH, seg_len, n_seg, n_tiles,
            s_a0b, s_a0t, s_a0h, s_a0d, s_b0b, s_b0t, s_b0h, s_b0d, s_c0b, s_c0t, s_c0h, s_c0d,
            s_y0b, s_y0t, s_y0h, s_y0d, s_a1b, s_a1t, s_a1h, s_a1d, s_b1b, s_b1t, s_b1h, s_b1d,
            s_c1b, s_c1t, s_c1h, s_c1d, s_y1b, s_y1t, s_y1h, s_y1d,
            si0_n, si0_h, si0_s, si0_r, si0_c, si1_n, si1_h, si1_s, si1_r, si1_c, so_n, so_h, so_r, so_c,
            R, C, BR, BC, BT, HAS_S_IN, STORE_S_OUT, VARLEN, PREC, COMBINE, False,
        )  # fmt: skip
        if COMBINE:
            _finish(sync, n_tiles * NH * ROLES * n_seg)


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _seg_local_kernel(
    a, c, w, g2,
    T, H, seg_len, n_seg,
    s_ab, s_at, s_ah, s_ad,
    s_cb, s_ct, s_ch, s_cd,
    R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
    REVERSE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Two-launch segment scheme, first launch: every segment's ``_local_state``, w [B, H, n_seg, R, C] fp32
    (contiguous). Grid (C tiles, n_seg - 1, B*H): forward segments 0..n_seg-2 (a = K, c = V), reverse
    1..n_seg-1 (a = Q, c = dO)."""
    i_c, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if REVERSE:
        i_s += 1
    i_n, i_h = i_nh // H, i_nh % H
    a += i_n.to(tl.int64) * s_ab + i_h.to(tl.int64) * s_ah
    c += i_n.to(tl.int64) * s_cb + i_h.to(tl.int64) * s_ch
    t_lo = i_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, T)
    g = tl.load(g2 + i_h).to(tl.float32)
    b_w = _local_state(a, c, g, t_lo, t_hi, s_at, s_ad, s_ct, s_cd, i_c * BC, R, C, BR, BC, BT, REVERSE, PREC)
    o_a = tl.arange(0, BR)
    o_c = i_c * BC + tl.arange(0, BC)
    p_w = w + (i_nh.to(tl.int64) * n_seg + i_s) * (R * C)
    tl.store(p_w + o_a[:, None] * C + o_c[None, :], b_w, mask=(o_a < R)[:, None] & (o_c < C)[None, :])


@triton.jit(do_not_specialize=["T", "H", "seg_len", "n_seg"])
def _seg_scan_kernel(
    w, s0, out, g2,
    T, H, seg_len, n_seg,
    s0_n, s0_h, s0_r, s0_c,
    C: tl.constexpr, RC: tl.constexpr, BLOCK: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """Two-launch segment scheme, second launch: chains segment states; w, out [B, H, n_seg, R, C] fp32
    contiguous. Grid (cdiv(R*C, BLOCK), B*H).

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


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def plan_segments(
    n_heads_total: int, T: int, tiles: int, varlen: bool, device: torch.device, min_seg: int | None = None
) -> tuple[int, int]:
    """(n_seg, seg_len): cut each sequence into segments of at least ``min_seg`` tokens (default
    CONFIG.min_seg) until the sweeps have ~target_ctas programs.

    Packed sequences (cu_seqlens) keep one segment each: their lengths live on the device and a plan
    would need a host sync.
    """
    cfg = CONFIG
    bt = cfg.chunk
    min_seg = cfg.min_seg if min_seg is None else min_seg
    if varlen or T <= 0:
        return 1, max(T, 1)
    base = max(1, n_heads_total * tiles)
    if cfg.target_ctas:
        want = math.ceil(cfg.target_ctas / base)
    else:
        # H200 sweep (docs/kernels.md): a second segment costs an extra pass over k, v, so none once every
        # SM has a program; below that, fill two programs per SM without spilling into a second wave
        sms = sm_count(device)
        want = 1 if base >= sms else max(1, (2 * sms) // base)
    n_seg = max(1, min(want, T // max(min_seg, bt)))
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
    return poison(out)


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


# Combining segments inside the sweeps needs a ticket counter and per-segment flags that outlive one launch,
# and the re-run launch reads the sweep's per-segment fix flags (which it lowers again): one set per (device,
# stream), grown on demand. Earlier (smaller) flag buffers are kept alive, because a captured CUDA graph may
# still point at them.
_SYNC: dict = {}
_RETIRED: list = []


def _sync_buffers(device: torch.device, n_flags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sync [4], flags [>= n_flags], fix [>= n_flags]) int32 of the current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    sync, flags, fix = _SYNC.get(key, (None, None, None))
    if sync is None:
        sync = torch.zeros(4, dtype=torch.int32, device=device)
    if flags is None or flags.numel() < n_flags:
        if flags is not None:
            _RETIRED.extend((flags, fix))
        # zeros are older than every epoch: flags wait for epoch + 1 >= 1; fix flags are raised to 1
        flags = torch.zeros(max(n_flags, 4096), dtype=torch.int32, device=device)
        fix = torch.zeros_like(flags)
        _SYNC[key] = (sync, flags, fix)
    return sync, flags, fix


def _fused(n_seg: int) -> bool:
    return n_seg > 1 and CONFIG.fused_segments


def _fwd_sweep(a, b, c, y, g2, s_in, s_in_strides, s_out, s_seg, cu_seqlens, n_seg, seg_len, N, tile, combine):
    """Forward-direction sweep: y [.., C] from a, b [.., R] and c [.., C], in C tiles; s_out (optional) gets the
    state after the last token; combine: segment states formed in the kernel (s_in = h0), saved to s_seg."""
    B, T, H, R = a.shape
    C = c.shape[-1]
    BR = _pow2(R)
    bt, tile = _chunk_tile(BR, tile)
    BC = min(_pow2(C), tile) if tile else _pow2(C)
    n_tiles = triton.cdiv(C, BC)
    so = _state_strides(s_out)
    ws = None
    sync, flags, fix = _sync_buffers(a.device, N * H * n_tiles * n_seg)
    if combine:
        ws = torch.empty(N * H * n_tiles * n_seg * BR * BC, dtype=torch.float32, device=a.device)
    args = (
        a, b, c, y, g2, s_in, s_out, s_seg, cu_seqlens, ws, flags, sync, fix,
        T, H, N * H, seg_len, n_seg, n_tiles,
        *_bt_strides(a), *_bt_strides(b), *_bt_strides(c), *_bt_strides(y),
        *s_in_strides, so[0], so[1], so[3], so[4],
    )  # fmt: skip
    meta = dict(
        R=R, C=C, BR=BR, BC=BC, BT=bt,
        HAS_S_IN=s_in is not None, STORE_S_OUT=s_out is not None, VARLEN=cu_seqlens is not None,
        PREC=_prec(a.dtype), COMBINE=combine, STORE_SEG=s_seg is not None, num_warps=_warps(BR, BC),
    )  # fmt: skip
    grid = (n_tiles * n_seg * N * H,) if combine else (n_tiles, n_seg, N * H)
    _launch(_fwd_sweep_kernel, grid, args, meta | dict(RERUN=False))
    _launch(_fwd_sweep_kernel, (1,), args, meta | dict(RERUN=True))


def _same_kinds(x: tuple, y: tuple) -> bool:
    """Triton turns an int argument equal to 1 into a constant and one past int32 into an int64: the two roles
    of one launch select their strides at run time, so they need the same kinds."""
    return all((p == 1) == (r == 1) and abs(p) < 2**31 and abs(r) < 2**31 for p, r in zip(x, y, strict=True))


def _rev_sweeps(roles, g2, s_in, s_out, cu_seqlens, n_seg, seg_len, N, tile, combine):
    """Reverse-direction sweeps, one per role (a, b, c, y, s_in strides): y [.., C] from a, b [.., R], c [.., C];
    s_out (optional) gets role 0's G before the first token. Roles of equal widths share one launch."""
    groups = [roles]
    a0, _, c0, _, _ = roles[0]
    if len(roles) == 2:
        a1, _, c1, _, _ = roles[1]
        st = [sum((_bt_strides(x) for x in r[:4]), ()) for r in roles]
        if a0.shape[-1] != a1.shape[-1] or c0.shape[-1] != c1.shape[-1] or not _same_kinds(*st):
            groups = [[roles[0]], [roles[1]]]
    for gi, group in enumerate(groups):
        a, _, c, _, _ = group[0]
        B, T, H, R = a.shape
        C = c.shape[-1]
        BR = _pow2(R)
        bt, tile_g = _chunk_tile(BR, tile)
        BC = min(_pow2(C), tile_g) if tile_g else _pow2(C)
        n_tiles = triton.cdiv(C, BC)
        n_roles = len(group)
        s_out_g = s_out if gi == 0 else None
        so = _state_strides(s_out_g)
        ws = None
        sync, flags, fix = _sync_buffers(a.device, n_roles * N * H * n_tiles * n_seg)
        if combine:
            ws = torch.empty(n_roles * N * H * n_tiles * n_seg * BR * BC, dtype=torch.float32, device=a.device)
        r0 = group[0]
        r1 = group[-1]
        args = (
            *r0[:4], *r1[:4], g2, s_in, s_out_g, cu_seqlens, ws, flags, sync, fix,
            T, H, N * H, seg_len, n_seg, n_tiles,
            *(s for x in r0[:4] for s in _bt_strides(x)), *(s for x in r1[:4] for s in _bt_strides(x)),
            *r0[4], *r1[4], so[0], so[1], so[3], so[4],
        )  # fmt: skip
        meta = dict(
            R=R, C=C, BR=BR, BC=BC, BT=bt, ROLES=n_roles,
            HAS_S_IN=s_in is not None, STORE_S_OUT=s_out_g is not None, VARLEN=cu_seqlens is not None,
            PREC=_prec(a.dtype), COMBINE=combine, num_warps=_warps(BR, BC),
        )  # fmt: skip
        grid = (n_tiles * n_seg * N * H * n_roles,) if combine else (n_tiles, n_seg, N * H * n_roles)
        _launch(_rev_sweep_kernel, grid, args, meta | dict(RERUN=False))
        _launch(_rev_sweep_kernel, (1,), args, meta | dict(RERUN=True))


def _segment_states(a, c, g2, s0, n_seg, seg_len, reverse, tile):
    """Two-launch segment scheme: [B, H, n_seg, R, C] fp32, the state entering each segment (forward; s0 = h0),
    or the state gradient at each segment's end (reverse; s0 = dht)."""
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
        fwd_min_seg = min(CONFIG.fwd_min_seg or CONFIG.min_seg, CONFIG.min_seg)
        n_seg, seg_len = plan_segments(N * H, T, triton.cdiv(V, BV), varlen, q.device, fwd_min_seg)
        combine = _fused(n_seg)
        needs_grad = any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[4]

        o = _empty_like_bt(q, V)
        ht = poison(torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)) if output_final_state else None
        s_seg = None
        if n_seg > 1 and not combine:
            s_seg = _segment_states(k, v, g2, initial_state, n_seg, seg_len, False, tile)
            s_in, s_in_strides = s_seg, _state_strides(s_seg, per_seg=True)
        else:
            s_in, s_in_strides = initial_state, _state_strides(initial_state)
        s_store = None
        if combine and needs_grad:
            s_seg = s_store = torch.empty(N, H, n_seg, K, V, dtype=torch.float32, device=q.device)
        _fwd_sweep(q, k, v, o, g2, s_in, s_in_strides, ht, s_store, cu_seqlens, n_seg, seg_len, N, tile, combine)

        # the backward's segments: whole multiples of the forward's, so their entering states are every
        # stride-th of s_seg (a strided view; the same plan when fwd_min_seg is not below min_seg)
        stride = 1
        if n_seg > 1 and fwd_min_seg < CONFIG.min_seg:
            _, bwd_len = plan_segments(N * H, T, triton.cdiv(V, BV), varlen, q.device)
            stride = triton.cdiv(bwd_len, seg_len)
        if stride > 1:
            seg_len *= stride
            n_seg = triton.cdiv(T, seg_len)
            s_seg = None if s_seg is None else s_seg[:, :, ::stride]
        ctx.save_for_backward(q, k, v, g2, initial_state, s_seg, cu_seqlens)
        ctx.plan = (N, n_seg, seg_len)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g2, h0, s_seg, cu_seqlens = ctx.saved_tensors
        N, n_seg, seg_len = ctx.plan
        want_dh0 = h0 is not None and ctx.needs_input_grad[4]
        combine = _fused(n_seg)

        # dQ: the forward recurrence of (dO, V, K) from the transposed states
        dq = _empty_like_bt(q, q.shape[-1])
        if s_seg is not None:
            s_in, s_in_strides = s_seg, _state_strides(s_seg, transpose=True, per_seg=True)
        else:
            s_in, s_in_strides = h0, _state_strides(h0, transpose=True)
        tile = CONFIG.fwd_tile
        _fwd_sweep(do, v, k, dq, g2, s_in, s_in_strides, None, None, cu_seqlens, n_seg, seg_len, N, tile, False)

        # the state gradient at every segment's end: from dht (in the kernels when combining)
        if n_seg > 1 and not combine:
            ds_seg = _segment_states(q, do, g2, dht, n_seg, seg_len, True, CONFIG.rev_tile)
            g_in, g_dv, g_dk = ds_seg, _state_strides(ds_seg, per_seg=True), _state_strides(ds_seg, True, True)
        else:
            g_in, g_dv, g_dk = dht, _state_strides(dht), _state_strides(dht, transpose=True)

        dh0 = poison(torch.empty(h0.shape, dtype=torch.float32, device=q.device)) if want_dh0 else None
        dv = _empty_like_bt(v, v.shape[-1])
        dk = _empty_like_bt(k, k.shape[-1])
        roles = [(q, k, do, dv, g_dv), (do, v, q, dk, g_dk)]
        _rev_sweeps(roles, g2, g_in, dh0, cu_seqlens, n_seg, seg_len, N, CONFIG.rev_tile, combine)
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
    check_triton_device(q)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device)
    return LightningAttentionFunction.apply(q, k, v, slope, initial_state, output_final_state, cu_seqlens)
