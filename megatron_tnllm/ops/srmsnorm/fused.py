"""Triton SRMSNorm, optionally fused with the output gate, forward and backward; and a row sum of squares.

    rstd = 1 / sqrt(mean(x^2) + eps)                     (per row of D, fp32)
    srmsnorm(x)            = x * rstd
    srmsnorm_gate(x, u)    = x * rstd * u                (one pass over x and u instead of three)
    norm_gate_rstd(x, u, r) = x * r * u                  (rstd supplied by the caller)
    sum_of_squares(x)      = sum(x^2) per row            (fp32; the TP statistic below)

The attention-output norm of the model spans all heads, i.e. all tensor-parallel ranks: there the caller
computes the per-row sum of squares of its shard (``sum_of_squares``), all-reduces it (with an op whose
backward is an all-reduce too), forms rstd = rsqrt(sum / D_total + eps) in torch, and calls ``norm_gate_rstd``;
autograd then carries d rstd = sum_d(x u dy) back through the all-reduce. ``srmsnorm_gate`` is the TP = 1
shortcut.

Memory traffic is the op's least: the forward reads x [and u] and writes y (and the per-row fp32 rstd when a
backward will follow); the backward reads x, dy [and u] and the rstd and writes dx [and du, d rstd], one kernel
each way, nothing fp32 of row width in memory. A program takes ROWS rows of BD = next_pow2(D) columns, ROWS * BD
~ 4096 elements (several short rows per program), with one warp per 512 elements. Rows are read through a row
stride (a view such as the gate slice of a fused projection is not copied); outputs are contiguous. D is a
compile-time constant (one compilation per width). Without autograd (no grad mode or no input that needs a
gradient) the kernel is launched directly: no autograd node, no rstd written.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import as_rows, check_triton_device, poison

__all__ = ["MAX_D", "norm_gate_rstd_triton", "srmsnorm_gate_triton", "srmsnorm_triton", "sum_of_squares_triton"]

MAX_D = 32768
ELEMENTS = 4096  # per program: enough bytes in flight per SM at 4-8 programs per SM, few enough registers


@triton.jit
def _fwd_kernel(
    x, u, y, r, M, eps, s_x, s_u,
    D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr,
    HAS_GATE: tl.constexpr, RSTD_IN: tl.constexpr, STORE_RSTD: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(M, ROWS),); y [M, D] contiguous. r [M] fp32: read when RSTD_IN, else written when STORE_RSTD."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    m_r = rows < M
    m = m_r[:, None] & (cols[None, :] < D)
    rows = rows.to(tl.int64)[:, None]
    b_x = tl.load(x + rows * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if RSTD_IN:
        b_r = tl.load(r + rows, mask=m_r[:, None], other=0.0)
    else:
        b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1, keep_dims=True) / D + eps)
        if STORE_RSTD:
            tl.store(r + rows, b_r, mask=m_r[:, None])
    b_y = b_x * b_r
    if HAS_GATE:
        b_y = b_y * tl.load(u + rows * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(y + rows * D + cols[None, :], b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    x, u, dy, r, dx, du, dr, M, s_x, s_u, s_dy,
    D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr, HAS_GATE: tl.constexpr, RSTD_IN: tl.constexpr,
):  # fmt: skip
    """dx = r g - x r^3 mean(g x)   (g = dy u, or dy), or with rstd given: dx = r g, dr = sum(g x).  du = x r dy.
    dx, du [M, D] contiguous, dr [M] fp32."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    m_r = rows < M
    m = m_r[:, None] & (cols[None, :] < D)
    rows = rows.to(tl.int64)[:, None]
    b_x = tl.load(x + rows * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + rows * s_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_r = tl.load(r + rows, mask=m_r[:, None], other=0.0)
    b_g = b_dy
    if HAS_GATE:
        b_g = b_dy * tl.load(u + rows * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(du + rows * D + cols[None, :], (b_x * b_r * b_dy).to(du.dtype.element_ty), mask=m)
    b_gx = tl.sum(b_g * b_x, axis=1, keep_dims=True)
    if RSTD_IN:
        b_dx = b_g * b_r
        tl.store(dr + rows, b_gx, mask=m_r[:, None])
    else:
        b_dx = b_g * b_r - b_x * (b_r * b_r * b_r * b_gx / D)
    tl.store(dx + rows * D + cols[None, :], b_dx.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _sum_squares_kernel(x, s, M, s_x, D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr):
    """s [M] fp32 = sum over D of x^2, per row."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    m_r = rows < M
    m = m_r[:, None] & (cols[None, :] < D)
    b_x = tl.load(x + rows.to(tl.int64)[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(s + rows, tl.sum(b_x * b_x, axis=1), mask=m_r)


@lru_cache(maxsize=256)
def _config(M: int, D: int) -> tuple[int, int, int, int]:
    """(grid, BD, ROWS, num_warps) for M rows of width D (plain Python and cached: this runs on every call)."""
    BD = 1 << (D - 1).bit_length()
    rows = min(max(1, ELEMENTS // BD), 1 << (M - 1).bit_length())
    return -(-M // rows), BD, rows, min(16, max(1, rows * BD // 512))


def _empty(shape: torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return poison(torch.empty(shape, dtype=dtype or like.dtype, device=like.device))


def _forward(
    x2: torch.Tensor,
    u2: torch.Tensor | None,
    r_in: torch.Tensor | None,
    eps: float,
    store_rstd: bool,
    shape: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x2, u2 [M, D], r_in [M] fp32 or None -> (y: ``shape`` = [..., D] contiguous, rstd [M] fp32: r_in, or written
    when store_rstd)."""
    M, D = x2.shape
    y = _empty(shape, x2)
    r = r_in if r_in is not None else (_empty((M,), x2, torch.float32) if store_rstd else None)
    if M:
        grid, BD, ROWS, warps = _config(M, D)
        _fwd_kernel[(grid,)](
            x2, u2, y, r, M, eps, x2.stride(0), 0 if u2 is None else u2.stride(0),
            D=D, BD=BD, ROWS=ROWS, HAS_GATE=u2 is not None, RSTD_IN=r_in is not None,
            STORE_RSTD=r_in is None and store_rstd, num_warps=warps,
        )  # fmt: skip
    return y, r


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, rstd, eps):
        x2, u2 = as_rows(x), (None if u is None else as_rows(u))
        r_in = None if rstd is None else rstd.reshape(-1).float().contiguous()
        y, r = _forward(x2, u2, r_in, eps, True, x.shape)
        ctx.save_for_backward(x2, u2, r)
        ctx.meta = (x.shape, None if rstd is None else rstd.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, u2, r = ctx.saved_tensors
        shape, rstd_dtype = ctx.meta
        M, D = x2.shape
        dy2 = as_rows(dy)
        dx = _empty(shape, x2)
        du = None if u2 is None else _empty(shape, u2)
        dr = None if rstd_dtype is None else _empty(shape[:-1], x2, torch.float32)
        if M:
            grid, BD, ROWS, warps = _config(M, D)
            _bwd_kernel[(grid,)](
                x2, u2, dy2, r, dx, du, dr, M, x2.stride(0), 0 if u2 is None else u2.stride(0), dy2.stride(0),
                D=D, BD=BD, ROWS=ROWS, HAS_GATE=u2 is not None, RSTD_IN=dr is not None, num_warps=warps,
            )  # fmt: skip
        return dx, du, (None if dr is None else dr.to(rstd_dtype)), None


def _sum_squares(x2: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """x2 [M, D] -> sum(x2^2, -1) fp32, shaped ``shape[:-1]``."""
    M, D = x2.shape
    s = _empty(shape[:-1], x2, torch.float32)
    if M:
        grid, BD, ROWS, warps = _config(M, D)
        _sum_squares_kernel[(grid,)](x2, s, M, x2.stride(0), D=D, BD=BD, ROWS=ROWS, num_warps=warps)
    return s


class _SumSquaresFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = as_rows(x)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return _sum_squares(x2, x.shape)

    @staticmethod
    def backward(ctx, ds):
        (x2,) = ctx.saved_tensors
        return _forward(x2, None, (2.0 * ds.reshape(-1)).float(), 0.0, False, ctx.shape)[0]  # dx = 2 x ds: x * r


def _check_input(x: torch.Tensor) -> None:
    check_triton_device(x)
    if x.shape[-1] > MAX_D:
        raise ValueError(f"the Triton SRMSNorm handles rows up to {MAX_D}; got {x.shape[-1]}")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _norm(x: torch.Tensor, u: torch.Tensor | None, rstd: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_input(x)
    if _needs_grad(x, u, rstd):
        return _NormFunction.apply(x, u, rstd, eps)
    r_in = None if rstd is None else rstd.reshape(-1).float().contiguous()
    return _forward(as_rows(x), None if u is None else as_rows(u), r_in, eps, False, x.shape)[0]


def srmsnorm_triton(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., D] -> x / sqrt(mean(x^2) + eps) in x's dtype (fp32 math)."""
    return _norm(x, None, None, eps)


def srmsnorm_gate_triton(x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, u [..., D] -> srmsnorm(x) * u in x's dtype, without rounding in between (TP = 1 only, see above)."""
    return _norm(x, u, None, eps)


def norm_gate_rstd_triton(x: torch.Tensor, u: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """x, u [..., D], rstd [...] (one per row, fp32) -> x * rstd * u in x's dtype; rstd gets a gradient."""
    return _norm(x, u, rstd, 0.0)


def sum_of_squares_triton(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> sum(x^2, -1) [...] in fp32, differentiable (dx = 2 x ds, in x's dtype)."""
    _check_input(x)
    return _SumSquaresFunction.apply(x) if _needs_grad(x) else _sum_squares(as_rows(x), x.shape)
