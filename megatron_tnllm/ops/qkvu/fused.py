"""Triton qkvu split with SiLU on q and k, and LRPE on LRPE layers, forward and backward.

    qkvu [M, 4L] = [q | k | v | u]  (L = H d, rows M = tokens)
    forward:  qk [2, M, L] = [SiLU(q), SiLU(k)]        one launch; v, u returned as views of qkvu
    backward: dqkvu [M, 4L] = [dq' SiLU'(q) | dk' SiLU'(k) | dv | du]
              one launch, every element written once; an absent gradient (None) writes zeros.

    SiLU(x) = x / (1 + exp(-x)),   SiLU'(x) = s (1 + x (1 - s)),  s = 1 / (1 + exp(-x))   (fp32, as PyTorch)

With LRPE (theta [H, 1, d]; rows r = i B + j of S positions p_i, each shared by B rows: the token mixer's
[s, b]), a = SiLU(q) in fp32 and the angle t = p theta formed in fp32 as ``ops.lrpe.apply_lrpe`` forms it:

    forward:  qk [2, M, H, 2d],  q' = [a cos t | a sin t]  (k' likewise)        one launch
    backward: dq = SiLU'(q) (dq'_cos cos t + dq'_sin sin t)  (dk likewise), dv, du   one launch, and
              dtheta_{h,c} = sum over rows of p a (dq'_sin cos t - dq'_cos sin t), over q and k
cos t and sin t are computed once per (position, column) tile and used for the B rows of q and k that share it
(the sines and cosines, not the memory traffic, would otherwise bound the kernels; B, the micro-batch, is a
compile-time constant, which keeps the row loop's bound constant as Triton 3.6's interpreter needs). Backward
recomputes them from theta and p, so nothing of size [M, L] is kept but qkvu. Each backward program writes its
column sums of dtheta to an fp32 buffer [cdiv(S, BS), L] that one ``sum`` reduces: deterministic, no atomics.

Without it, autograd materialises a zero-filled [M, 3L] and [M, L] gradient for the two slices of qkvu, adds
them, and runs SiLU's backward on strided halves; LRPE adds fp32 [S, L] angle tables kept for backward, and its
own cos, sin, product, cat and cast kernels each way. q and k come out contiguous ([..., H, d] or [..., H, 2d]
in qkvu's row order): the lightning-attention kernels read any strides, and their gradients then arrive
contiguous too.

Layout: qkvu read as rows through a row stride (last dim unit-stride, else one copy); gradients likewise.
Programs cover BM rows x BN columns of one section (program axis 2 picks q, k, v or u); with LRPE, BS positions
x BN columns of all B rows of their positions (backward: axis 2 picks q and k, v, or u).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import as_rows, check_triton_device, poison

__all__ = ["TILE", "qkvu_silu_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TILE = 4096  # elements of a program's tile (its row or position block x its columns)


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


@triton.jit
def _angles(theta, pos, i, cols, S, L):
    """cos and sin [BS, BN] of the fp32 angles positions[i] * theta[cols] (zero angle outside), positions [BS, 1]."""
    b_p = tl.load(pos + i, mask=i < S, other=0).to(tl.float32)
    b_a = b_p * tl.load(theta + cols, mask=cols < L, other=0.0).to(tl.float32)
    return tl.cos(b_a), tl.sin(b_a), b_p


@triton.jit
def _fwd_lrpe_kernel(x, qk, theta, pos, S, L, D, s_x, B: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """Grid (cdiv(L, BN), cdiv(S, BS)). qk [2, S B, H, 2D]: for x row r = i B + j, section sec (q, k) and
    c = h D + e: qk[sec, r, h, e] = SiLU(x[r, sec L + c]) cos(p_i theta[c]), and sin at e + D."""
    i = (tl.program_id(1) * BS + tl.arange(0, BS)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (i < S) & (cols < L)
    b_cos, b_sin, _ = _angles(theta, pos, i, cols, S, L)
    out_cols = cols + (cols // D) * D  # head h's cos half starts at 2 h D
    for j in range(B):
        rows = i * B + j
        for sec in tl.static_range(2):
            b_x = tl.load(x + rows * s_x + sec * L + cols, mask=m, other=0.0).to(tl.float32)
            b_y = b_x / (1.0 + tl.exp(-b_x))
            out = qk + (sec * S * B + rows) * 2 * L + out_cols
            tl.store(out, (b_y * b_cos).to(qk.dtype.element_ty), mask=m)
            tl.store(out + D, (b_y * b_sin).to(qk.dtype.element_ty), mask=m)


@triton.jit
def _grad_lrpe(x, dy, rows, cols, m, L, D, s_x, s_dy, b_cos, b_sin, HAS: tl.constexpr):
    """For the x tile at ``rows``, ``cols`` (x: q's or k's columns): the gradient of x through SiLU and LRPE, and
    a (dy_sin cos - dy_cos sin), theta's gradient over p (fp32; zeros when the gradient dy is absent)."""
    if HAS:
        b_x = tl.load(x + rows * s_x + cols, mask=m, other=0.0).to(tl.float32)
        g = dy + rows * s_dy + cols + (cols // D) * D
        b_gc = tl.load(g, mask=m, other=0.0).to(tl.float32)
        b_gs = tl.load(g + D, mask=m, other=0.0).to(tl.float32)
        b_s = 1.0 / (1.0 + tl.exp(-b_x))
        b_g = (b_gc * b_cos + b_gs * b_sin) * b_s * (1.0 + b_x * (1.0 - b_s))
        b_dt = b_x * b_s * (b_gs * b_cos - b_gc * b_sin)
    else:
        b_g = tl.zeros_like(b_cos)
        b_dt = tl.zeros_like(b_cos)
    return b_g, b_dt


@triton.jit
def _bwd_lrpe_kernel(
    x, dq, dk, dv, du, dx, theta, pos, dtheta, S, L, D, s_x, s_dq, s_dk, s_dv, s_du, s_dx, B: tl.constexpr,
    BS: tl.constexpr, BN: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
    HAS_DU: tl.constexpr, DTHETA: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BN), cdiv(S, BS), 3); axis 2: q and k, v, u. dx [S B, 4L] as the plain kernel's, with the
    LRPE derivative for q and k. DTHETA: dtheta [grid[1], L] gets the program's column sums of
    p_i sum_j a (dy_sin cos - dy_cos sin) over its positions i, rows j and q, k."""
    part = tl.program_id(2)
    i = (tl.program_id(1) * BS + tl.arange(0, BS)).to(tl.int64)[:, None]
    cols = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
    m = (i < S) & (cols < L)
    if part == 0:
        b_cos, b_sin, b_p = _angles(theta, pos, i, cols, S, L)
        b_dt = tl.zeros((BS, BN), dtype=tl.float32)
        for j in range(B):
            rows = i * B + j
            b_g, b_d = _grad_lrpe(x, dq, rows, cols, m, L, D, s_x, s_dq, b_cos, b_sin, HAS_DQ)
            tl.store(dx + rows * s_dx + cols, b_g.to(dx.dtype.element_ty), mask=m)
            b_dt += b_d
            b_g, b_d = _grad_lrpe(x + L, dk, rows, cols, m, L, D, s_x, s_dk, b_cos, b_sin, HAS_DK)
            tl.store(dx + rows * s_dx + L + cols, b_g.to(dx.dtype.element_ty), mask=m)
            b_dt += b_d
        if DTHETA:
            c = tl.program_id(0) * BN + tl.arange(0, BN)
            tl.store(dtheta + tl.program_id(1) * L + c, tl.sum(b_p * b_dt, 0), mask=c < L)
    else:
        for j in range(B):
            rows = i * B + j
            if part == 1:
                b_g = _copy_or_zero(dv, rows, cols, m, s_dv, BS, BN, HAS_DV)
            else:
                b_g = _copy_or_zero(du, rows, cols, m, s_du, BS, BN, HAS_DU)
            tl.store(dx + rows * s_dx + (part + 1) * L + cols, b_g.to(dx.dtype.element_ty), mask=m)


def _tiles(M: int, L: int, sections: int) -> tuple[tuple[int, int, int], dict]:
    """Grid and tile sizes: 1024-column tiles (fewer for a narrow L), TILE elements per program."""
    BN = min(1024, triton.next_power_of_2(max(L, 1)))
    BM = max(1, TILE // BN)
    return (triton.cdiv(L, BN), triton.cdiv(M, BM), sections), {"BM": BM, "BN": BN, "num_warps": 4}


def _lrpe_tiles(S: int, L: int, backward: bool) -> tuple[tuple[int, int, int], dict]:
    """LRPE grid and tile sizes: BS positions x BN columns (256 at most, which keeps enough programs to fill the
    GPU at one row per position). TILE / 2 elements over 8 warps forward, TILE / 4 over 4 warps backward: 8 per
    thread, which ptxas (sm_90) keeps in registers beside the sines and cosines, where 16 or 32 spill."""
    BN = min(256, triton.next_power_of_2(max(L, 1)))
    elements, warps = (TILE // 4, 4) if backward else (TILE // 2, 8)
    BS = max(1, elements // BN)
    return (triton.cdiv(L, BN), triton.cdiv(S, BS), 3 if backward else 1), {"BS": BS, "BN": BN, "num_warps": warps}


class _QkvuSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkvu, heads, head_dim, theta, positions):
        lead, L = qkvu.shape[:-1], heads * head_dim
        x2 = as_rows(qkvu, 4 * L)
        M = x2.shape[0]
        if theta is None:
            qk = poison(torch.empty(2, M, L, dtype=qkvu.dtype, device=qkvu.device))
            if M and L:
                grid, meta = _tiles(M, L, 2)
                _fwd_kernel[grid](x2, qk, M, L, x2.stride(0), **meta)
            ctx.save_for_backward(x2)
            width = head_dim
        else:
            S = lead[0]
            ctx.theta_meta = (theta.shape, theta.dtype)
            theta = theta.detach().reshape(L).contiguous()
            positions = positions.contiguous()
            qk = poison(torch.empty(2, M, 2 * L, dtype=qkvu.dtype, device=qkvu.device))
            if M and L:
                grid, meta = _lrpe_tiles(S, L, backward=False)
                _fwd_lrpe_kernel[grid](x2, qk, theta, positions, S, L, head_dim, x2.stride(0), B=M // S, **meta)
            ctx.save_for_backward(x2, theta, positions)
            width = 2 * head_dim
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: zeros are written, not read
        ctx.meta = (qkvu.shape, L, head_dim)
        q, k = (t.view(*lead, heads, width) for t in qk.unbind(0))
        v = qkvu[..., 2 * L : 3 * L].unflatten(-1, (heads, head_dim))
        return q, k, v, qkvu[..., 3 * L :]

    @staticmethod
    def backward(ctx, dq, dk, dv, du):
        x2, *lrpe = ctx.saved_tensors
        shape, L, head_dim = ctx.meta
        M = x2.shape[0]
        widths = (2 * L if lrpe else L,) * 2 + (L, L)
        grads = [None if g is None else as_rows(g, w) for g, w in zip((dq, dk, dv, du), widths, strict=True)]
        ptrs = [x2 if g is None else g for g in grads]  # any tensor stands in for an absent gradient
        strides = [0 if g is None else g.stride(0) for g in grads]
        has = {"HAS_DQ": dq is not None, "HAS_DK": dk is not None, "HAS_DV": dv is not None, "HAS_DU": du is not None}
        dx = poison(torch.empty(M, 4 * L, dtype=x2.dtype, device=x2.device))
        if not lrpe:
            if M and L:
                grid, meta = _tiles(M, L, 4)
                _bwd_kernel[grid](x2, *ptrs, dx, M, L, x2.stride(0), *strides, dx.stride(0), **has, **meta)
            return dx.view(shape), None, None, None, None
        theta, positions = lrpe
        S = shape[0]
        grid, meta = _lrpe_tiles(S, L, backward=True)
        dtheta = None
        if ctx.needs_input_grad[3]:
            dtheta = poison(torch.empty(grid[1], L, dtype=torch.float32, device=x2.device))
        if M and L:
            _bwd_lrpe_kernel[grid](
                x2, *ptrs, dx, theta, positions, x2 if dtheta is None else dtheta, S, L, head_dim, x2.stride(0),
                *strides, dx.stride(0), B=M // S, DTHETA=dtheta is not None, **has, **meta,
            )  # fmt: skip
        if dtheta is not None:
            theta_shape, theta_dtype = ctx.theta_meta
            dtheta = dtheta.sum(0).view(theta_shape).to(theta_dtype)
        return dx.view(shape), None, None, dtheta, None


def qkvu_silu_triton(
    qkvu: torch.Tensor,
    heads: int,
    head_dim: int,
    theta: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [s, ..., 4 H d] (bf16, fp16 or fp32) -> SiLU(q), SiLU(k) [s, ..., H, d] (contiguous), v [..., H, d]
    and u [..., H d] (views of qkvu). With theta [H, 1, d] and positions [s] (integers), q and k carry LRPE:
    [s, ..., H, 2d] (contiguous). Arguments are checked by ``ops.qkvu.qkvu_silu``."""
    check_triton_device(qkvu)
    if qkvu.dtype not in DTYPES:
        raise TypeError(f"the Triton qkvu split takes {DTYPES}; got {qkvu.dtype}")
    return _QkvuSilu.apply(qkvu, heads, head_dim, theta, positions)
