"""Triton gated product of SGLU, forward and backward.

    y[..., f]      = x[..., f] * x[..., F + f]                 x [..., 2F] -> y [..., F]
    dx[..., f]     = dy[..., f] * x[..., F + f]                (one [..., 2F] gradient, one pass;
    dx[..., F + f] = dy[..., f] * x[..., f]                     no zero-filled halves, no cat)

Each product is formed in fp32 and rounded once to the input dtype: the product of two bf16 (or fp16) numbers
is exact in fp32, so the result has the same bits as torch's ``a * b``.

Layout: x [..., 2F] read as rows through a row stride (the last dim must be unit-stride, else one copy); y and
dx are allocated contiguous. Programs cover BM rows x BN columns of the F-wide half.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import as_rows, check_triton_device, poison

__all__ = ["glu_product_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fwd_kernel(x, y, M, F, s_x, s_y, BM: tl.constexpr, BN: tl.constexpr):
    """Grid (cdiv(F, BN), cdiv(M, BM)). y[r, c] = x[r, c] * x[r, F + c]."""
    rows = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (rows < M) & (cols < F)
    b_a = tl.load(x + rows * s_x + cols, mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(x + rows * s_x + F + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y + rows * s_y + cols, (b_a * b_b).to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(x, dy, dx, M, F, s_x, s_dy, s_dx, BM: tl.constexpr, BN: tl.constexpr):
    """Grid (cdiv(F, BN), cdiv(M, BM)). dx[r, c] = dy[r, c] * x[r, F + c]; dx[r, F + c] = dy[r, c] * x[r, c]."""
    rows = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (rows < M) & (cols < F)
    b_a = tl.load(x + rows * s_x + cols, mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(x + rows * s_x + F + cols, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + rows * s_dy + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(dx + rows * s_dx + cols, (b_dy * b_b).to(dx.dtype.element_ty), mask=m)
    tl.store(dx + rows * s_dx + F + cols, (b_dy * b_a).to(dx.dtype.element_ty), mask=m)


def _tiles(M: int, F: int) -> tuple[tuple[int, int], dict]:
    """Grid and tile sizes: 1024-column tiles (fewer for a narrow F), ~4096 elements per program."""
    BN = min(1024, triton.next_power_of_2(max(F, 1)))
    BM = max(1, 4096 // BN)
    return (triton.cdiv(F, BN), triton.cdiv(M, BM)), {"BM": BM, "BN": BN, "num_warps": 4}


class _GluProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        shape, F = x.shape, x.shape[-1] // 2
        x2 = as_rows(x)
        M = x2.shape[0]
        y = poison(torch.empty(M, F, dtype=x.dtype, device=x.device))
        if M and F:
            grid, meta = _tiles(M, F)
            _fwd_kernel[grid](x2, y, M, F, x2.stride(0), y.stride(0), **meta)
        ctx.save_for_backward(x2)
        ctx.shape = shape
        return y.view(*shape[:-1], F)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        M, F = x2.shape[0], x2.shape[1] // 2
        dy2 = as_rows(dy)
        dx = poison(torch.empty(M, 2 * F, dtype=x2.dtype, device=x2.device))
        if M and F:
            grid, meta = _tiles(M, F)
            _bwd_kernel[grid](x2, dy2, dx, M, F, x2.stride(0), dy2.stride(0), dx.stride(0), **meta)
        return dx.view(ctx.shape)


def glu_product_triton(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] (bf16, fp16 or fp32) -> x[..., :F] * x[..., F:] [..., F], contiguous, in x's dtype."""
    check_triton_device(x)
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton gated product takes {DTYPES}; got {x.dtype}")
    return _GluProduct.apply(x)
