"""Triton SRMSNorm, optionally fused with the output gate, forward and backward.

    rstd = 1 / sqrt(mean(x^2) + eps)                     (per row of D, fp32)
    srmsnorm(x)            = x * rstd
    srmsnorm_gate(x, u)    = x * rstd * u                (one pass over x and u instead of three)
    norm_gate_rstd(x, u, r) = x * r * u                  (rstd supplied by the caller)

The attention-output norm of the model spans all heads, i.e. all tensor-parallel ranks: there the caller
computes the per-row sum of squares of its shard, all-reduces it (with an op whose backward is an
all-reduce too), forms rstd = rsqrt(sum / D_total + eps) in torch, and calls ``norm_gate_rstd``; autograd
then carries d rstd = sum_d(x u dy) back through the all-reduce. ``srmsnorm_gate`` is the TP = 1 shortcut.

Layout: x, u [..., D] (rows read through a row stride, the last dim must be unit-stride, else one copy);
all arithmetic in fp32; outputs in x's dtype. One program per row (D <= 32768).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import check_triton_device, poison

__all__ = ["MAX_D", "norm_gate_rstd_triton", "srmsnorm_gate_triton", "srmsnorm_triton"]

MAX_D = 32768


@triton.jit
def _fwd_kernel(
    x, u, y, r, D, eps, s_x, s_u, s_y,
    BD: tl.constexpr, HAS_GATE: tl.constexpr, RSTD_IN: tl.constexpr, STORE_RSTD: tl.constexpr,
):  # fmt: skip
    """Grid (rows,). r [rows] fp32: read when RSTD_IN, else written when STORE_RSTD."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    b_x = tl.load(x + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
    if RSTD_IN:
        b_r = tl.load(r + row)
    else:
        b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
        if STORE_RSTD:
            tl.store(r + row, b_r)
    b_y = b_x * b_r
    if HAS_GATE:
        b_y = b_y * tl.load(u + row * s_u + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y + row * s_y + cols, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    x, u, dy, r, dx, du, dr, D, s_x, s_u, s_dy, s_dx, s_du,
    BD: tl.constexpr, HAS_GATE: tl.constexpr, RSTD_IN: tl.constexpr,
):  # fmt: skip
    """dx = r g - x r^3 mean(g x)   (g = dy u, or dy), or with rstd given: dx = r g, dr = sum(g x).  du = x r dy."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    b_x = tl.load(x + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + row * s_dy + cols, mask=m, other=0.0).to(tl.float32)
    b_r = tl.load(r + row)
    b_g = b_dy
    if HAS_GATE:
        b_u = tl.load(u + row * s_u + cols, mask=m, other=0.0).to(tl.float32)
        b_g = b_dy * b_u
        tl.store(du + row * s_du + cols, (b_x * b_r * b_dy).to(du.dtype.element_ty), mask=m)
    if RSTD_IN:
        b_dx = b_g * b_r
        tl.store(dr + row, tl.sum(b_g * b_x, axis=0))
    else:
        b_dx = b_g * b_r - b_x * (b_r * b_r * b_r * tl.sum(b_g * b_x, axis=0) / D)
    tl.store(dx + row * s_dx + cols, b_dx.to(dx.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(bd: int) -> int:
    return min(16, max(1, bd // 512))


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, rstd, eps):
        shape, D = x.shape, x.shape[-1]
        x2 = _rows(x)
        u2 = _rows(u) if u is not None else None
        M = x2.shape[0]
        y = poison(torch.empty(M, D, dtype=x.dtype, device=x.device))
        r = rstd.reshape(-1).float().contiguous() if rstd is not None else torch.empty(M, dtype=torch.float32,
                                                                                       device=x.device)  # fmt: skip
        BD = max(16, triton.next_power_of_2(D))
        if M:
            _fwd_kernel[(M,)](
                x2, u2, y, r, D, eps, x2.stride(0), u2.stride(0) if u2 is not None else 0, y.stride(0),
                BD=BD, HAS_GATE=u is not None, RSTD_IN=rstd is not None, STORE_RSTD=rstd is None,
                num_warps=_warps(BD),
            )  # fmt: skip
        ctx.save_for_backward(x2, u2, r)
        ctx.meta = (shape, rstd is not None, None if rstd is None else (rstd.shape, rstd.dtype))
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, u2, r = ctx.saved_tensors
        shape, rstd_in, rstd_meta = ctx.meta
        M, D = x2.shape
        dy2 = _rows(dy)
        dx = poison(torch.empty(M, D, dtype=x2.dtype, device=x2.device))
        du = poison(torch.empty(M, D, dtype=u2.dtype, device=u2.device)) if u2 is not None else None
        dr = poison(torch.empty(M, dtype=torch.float32, device=x2.device)) if rstd_in else None
        BD = max(16, triton.next_power_of_2(D))
        if M:
            _bwd_kernel[(M,)](
                x2, u2, dy2, r, dx, du, dr, D, x2.stride(0), u2.stride(0) if u2 is not None else 0,
                dy2.stride(0), dx.stride(0), du.stride(0) if du is not None else 0,
                BD=BD, HAS_GATE=u2 is not None, RSTD_IN=rstd_in, num_warps=_warps(BD),
            )  # fmt: skip
        d_rstd = dr.view(rstd_meta[0]).to(rstd_meta[1]) if rstd_in else None
        return dx.view(shape), (du.view(shape) if du is not None else None), d_rstd, None


def _check_input(x: torch.Tensor) -> None:
    check_triton_device(x)
    if x.shape[-1] > MAX_D:
        raise ValueError(f"the Triton SRMSNorm handles rows up to {MAX_D}; got {x.shape[-1]}")


def srmsnorm_triton(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., D] -> x / sqrt(mean(x^2) + eps) in x's dtype (fp32 math)."""
    _check_input(x)
    return _NormFunction.apply(x, None, None, eps)


def srmsnorm_gate_triton(x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, u [..., D] -> srmsnorm(x) * u in x's dtype, without rounding in between (TP = 1 only, see above)."""
    _check_input(x)
    return _NormFunction.apply(x, u, None, eps)


def norm_gate_rstd_triton(x: torch.Tensor, u: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """x, u [..., D], rstd [...] (one per row, fp32) -> x * rstd * u in x's dtype; rstd gets a gradient."""
    _check_input(x)
    return _NormFunction.apply(x, u, rstd, 0.0)
