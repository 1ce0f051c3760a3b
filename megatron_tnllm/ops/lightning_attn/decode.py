"""Triton decode step of lightning attention: one token per sequence, fp32 state updated in place or out of place.

    S <- lambda S + k^T v,    o = q S,    lambda = exp(-slope) per head

Purely bandwidth-bound: each (b, h) reads and writes its Dk x Dv state once (8 Dk Dv bytes in fp32); q, k, v, o
are noise. The grid splits Dv into tiles so that even B = 1 launches many programs; each program owns a
[Dk, BV] slab of the state, so the in-place update needs no synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import check_triton_device, poison

__all__ = ["DECODE_TILE", "lightning_attention_step_triton"]

DECODE_TILE = {"bv": 64, "num_warps": 4}  # H200 sweep: bv32/w4, bv64/w4, bv64/w8 (docs/kernels.md)


@triton.jit
def _step_kernel(
    q, k, v, o, s, s_new, slope, keep,
    H, s_slope, s_keep,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_kd,
    s_vb, s_vh, s_vd,
    s_ob, s_oh, s_od,
    s_sb, s_sh, s_sr, s_sc,
    s_nb, s_nh, s_nr, s_nc,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
    SILU: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, B*H). q, k [B, H, K]; v, o [B, H, V]; s, s_new [B, H, K, V] (s_new may alias s);
    keep [B] uint8 (read with HAS_KEEP: 0 zeroes the row's v); SILU: q, k <- SiLU(q), SiLU(k) rounded to their
    dtype, what F.silu gives the unfused path."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    b64 = i_b.to(tl.int64)
    b_q = tl.load(q + b64 * s_qb + i_h * s_qh + o_k * s_qd, mask=m_k, other=0.0).to(ACC)
    b_k = tl.load(k + b64 * s_kb + i_h * s_kh + o_k * s_kd, mask=m_k, other=0.0).to(ACC)
    b_v = tl.load(v + b64 * s_vb + i_h * s_vh + o_v * s_vd, mask=m_v, other=0.0).to(ACC)
    if SILU:
        b_q = (b_q / (1.0 + tl.exp(-b_q))).to(q.dtype.element_ty).to(ACC)
        b_k = (b_k / (1.0 + tl.exp(-b_k))).to(k.dtype.element_ty).to(ACC)
    if HAS_KEEP:
        b_v = tl.where(tl.load(keep + b64 * s_keep) != 0, b_v, 0.0)
    m_s = m_k[:, None] & m_v[None, :]
    p_s = s + b64 * s_sb + i_h * s_sh + o_k[:, None] * s_sr + o_v[None, :] * s_sc
    b_s = tl.load(p_s, mask=m_s, other=0.0).to(ACC)
    decay = tl.exp(-tl.load(slope + i_h * s_slope).to(ACC))
    b_s = b_s * decay + b_k[:, None] * b_v[None, :]
    b_o = tl.sum(b_q[:, None] * b_s, axis=0)
    p_n = s_new + b64 * s_nb + i_h * s_nh + o_k[:, None] * s_nr + o_v[None, :] * s_nc
    tl.store(p_n, b_s.to(s_new.dtype.element_ty), mask=m_s)
    tl.store(o + b64 * s_ob + i_h * s_oh + o_v * s_od, b_o.to(o.dtype.element_ty), mask=m_v)


def lightning_attention_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    inplace: bool = False,
    silu_qk: bool = False,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step (inputs checked by the public ``lightning_attention_step``).

    Args:
        q, k: [B, H, Dk]; v: [B, H, Dv] (any float dtype, any strides); slope: [H];
        state: [B, H, Dk, Dv] fp32 (fp64 is computed in fp64), any strides.
        inplace: write the new state into ``state`` (and return it) instead of a new tensor.
        silu_qk: SiLU of q and k as they are loaded; keep: [B] bool, False zeroes that row's v.

    Returns:
        (o [B, H, Dv] in q's dtype, the updated state)
    """
    check_triton_device(q)
    B, H, K = q.shape
    V = v.shape[-1]
    new = state if inplace else poison(torch.empty(state.shape, dtype=state.dtype, device=state.device))
    o = poison(torch.empty(B, H, V, dtype=q.dtype, device=q.device))
    acc = tl.float64 if state.dtype == torch.float64 else tl.float32
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), DECODE_TILE["bv"])
    keep_u8 = keep.view(torch.uint8) if keep is not None else slope  # a placeholder pointer when unused
    s_keep = keep_u8.stride(0) if keep is not None else 0
    _step_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, o, state, new, slope, keep_u8, H, slope.stride(0), s_keep,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *state.stride(), *new.stride(),
        K=K, V=V, BK=BK, BV=BV, ACC=acc, SILU=silu_qk, HAS_KEEP=keep is not None,
        num_warps=DECODE_TILE["num_warps"],
    )  # fmt: skip
    return o, new
