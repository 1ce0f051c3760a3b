"""Triton qkvu split with SiLU on q and k, forward and backward.

    qkvu [M, 4L] = [q | k | v | u]  (L = H d, rows M = tokens)
    forward:  qk [2, M, L] = [SiLU(q), SiLU(k)]        one launch; v, u returned as views of qkvu
    backward: dqkvu [M, 4L] = [dq' SiLU'(q) | dk' SiLU'(k) | dv | du]
              one launch, every element written once; an absent gradient (None) writes zeros.

    SiLU(x) = x / (1 + exp(-x)),   SiLU'(x) = s (1 + x (1 - s)),  s = 1 / (1 + exp(-x))   (fp32, as PyTorch)

Without it, autograd materialises a zero-filled [M, 3L] and [M, L] gradient for the two slices of qkvu, adds
them, and runs SiLU's backward on strided halves. q and k come out contiguous ([..., H, d] in qkvu's row order):
the lightning-attention kernels read any strides, and their gradients then arrive contiguous too.

Layout: qkvu read as rows through a row stride (last dim unit-stride, else one copy); gradients likewise.
Programs cover BM rows x BN columns of one section (program axis 2 picks q, k, v or u).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import check_triton_device, poison

__all__ = ["qkvu_silu_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fwd_kernel(x, qk, M, L, s_x, BM: tl.constexpr, BN: tl.constexpr):
    """Grid (cdiv(L, BN), cdiv(M, BM), 2). qk [2, M, L] contiguous: qk[j, r, c] = SiLU(x[r, j L + c])."""
    sec = tl.program_id(2)
    rows = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (rows < M) & (cols < L)
    b_x = tl.load(x + rows * s_x + sec * L + cols, mask=m, other=0.0).to(tl.float32)
    b_y = b_x / (1.0 + tl.exp(-b_x))
    tl.store(qk + (sec * M + rows) * L + cols, b_y.to(qk.dtype.element_ty), mask=m)


@triton.jit
def _grad_silu(x, dy, rows, cols, m, s_dy, HAS: tl.constexpr):
    """dy SiLU'(x) for the x tile given (fp32), zeros when the gradient dy is absent."""
    if HAS:
        b_dy = tl.load(dy + rows * s_dy + cols, mask=m, other=0.0).to(tl.float32)
        b_s = 1.0 / (1.0 + tl.exp(-x))
        b_g = b_dy * b_s * (1.0 + x * (1.0 - b_s))
    else:
        b_g = tl.zeros_like(x)
    return b_g


@triton.jit
def _copy_or_zero(g, rows, cols, m, s_g, BM: tl.constexpr, BN: tl.constexpr, HAS: tl.constexpr):
    """The g tile (fp32), zeros when the gradient g is absent."""
    if HAS:
        b_g = tl.load(g + rows * s_g + cols, mask=m, other=0.0).to(tl.float32)
    else:
        b_g = tl.zeros((BM, BN), dtype=tl.float32)
    return b_g


@triton.jit
def _bwd_kernel(
    x, dq, dk, dv, du, dx, M, L, s_x, s_dq, s_dk, s_dv, s_du, s_dx,
    BM: tl.constexpr, BN: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
    HAS_DU: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BN), cdiv(M, BM), 4). dx [M, 4L]: section sec of row r gets the gradient of qkvu's sec-th
    part (the SiLU derivative applied for q and k)."""
    sec = tl.program_id(2)
    rows = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (rows < M) & (cols < L)
    if sec < 2:
        b_x = tl.load(x + rows * s_x + sec * L + cols, mask=m, other=0.0).to(tl.float32)
        if sec == 0:
            b_g = _grad_silu(b_x, dq, rows, cols, m, s_dq, HAS_DQ)
        else:
            b_g = _grad_silu(b_x, dk, rows, cols, m, s_dk, HAS_DK)
    elif sec == 2:
        b_g = _copy_or_zero(dv, rows, cols, m, s_dv, BM, BN, HAS_DV)
    else:
        b_g = _copy_or_zero(du, rows, cols, m, s_du, BM, BN, HAS_DU)
    tl.store(dx + rows * s_dx + sec * L + cols, b_g.to(dx.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., (H, d)] -> [M, width] with a unit column stride (a view when the rows collapse, else a copy)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tiles(M: int, L: int, sections: int) -> tuple[tuple[int, int, int], dict]:
    """Grid and tile sizes: 1024-column tiles (fewer for a narrow L), ~4096 elements per program."""
    BN = min(1024, triton.next_power_of_2(max(L, 1)))
    BM = max(1, 4096 // BN)
    return (triton.cdiv(L, BN), triton.cdiv(M, BM), sections), {"BM": BM, "BN": BN, "num_warps": 4}


class _QkvuSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkvu, heads, head_dim):
        lead, L = qkvu.shape[:-1], heads * head_dim
        x2 = _rows(qkvu, 4 * L)
        M = x2.shape[0]
        qk = poison(torch.empty(2, M, L, dtype=qkvu.dtype, device=qkvu.device))
        if M and L:
            grid, meta = _tiles(M, L, 2)
            _fwd_kernel[grid](x2, qk, M, L, x2.stride(0), **meta)
        ctx.save_for_backward(x2)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: zeros are written, not read
        ctx.meta = (qkvu.shape, L)
        q, k = (t.view(*lead, heads, head_dim) for t in qk.unbind(0))
        v = qkvu[..., 2 * L : 3 * L].unflatten(-1, (heads, head_dim))
        return q, k, v, qkvu[..., 3 * L :]

    @staticmethod
    def backward(ctx, dq, dk, dv, du):
        (x2,) = ctx.saved_tensors
        shape, L = ctx.meta
        M = x2.shape[0]
        grads = [None if g is None else _rows(g, L) for g in (dq, dk, dv, du)]
        dx = poison(torch.empty(M, 4 * L, dtype=x2.dtype, device=x2.device))
        if M and L:
            grid, meta = _tiles(M, L, 4)
            ptrs = [x2 if g is None else g for g in grads]  # any tensor stands in for an absent gradient
            strides = [0 if g is None else g.stride(0) for g in grads]
            _bwd_kernel[grid](
                x2, *ptrs, dx, M, L, x2.stride(0), *strides, dx.stride(0),
                HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None, HAS_DU=du is not None,
                **meta,
            )  # fmt: skip
        return dx.view(shape), None, None


def qkvu_silu_triton(
    qkvu: torch.Tensor, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [..., 4 H d] (bf16, fp16 or fp32) -> SiLU(q), SiLU(k) [..., H, d] (contiguous), v [..., H, d] and
    u [..., H d] (views of qkvu)."""
    check_triton_device(qkvu)
    if qkvu.dtype not in DTYPES:
        raise TypeError(f"the Triton qkvu split takes {DTYPES}; got {qkvu.dtype}")
    return _QkvuSilu.apply(qkvu, heads, head_dim)
