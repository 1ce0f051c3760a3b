"""Triton products of a few rows with a weight, forward only.

    y = x W1^T                          (skinny_linear)
    y = residual + x W1^T               (skinny_linear with a residual: the add in the epilogue)
    y = (x W1^T) * (x W2^T)             (skinny_glu: both products from one read of x, the gate in the epilogue)

x [M, K] rows (M small: a decode step's batch), W [N, K] row-major as ``nn.Linear`` keeps it. Each program owns
BN output columns and walks K in BK-wide steps, pipelined over ``num_stages``; it reads its BN rows of the weight
once and the whole of x (a few rows, from L2). The weight read is the whole cost, so the grid is sized to keep
every SM reading: BN is the widest of 64, 32, 16 that still gives ``programs_per_sm`` programs per SM; a narrow
output (16-wide tiles give at most two programs per SM) takes long K steps (256) and a deep pipeline (5) so that
each program keeps enough of its weight in flight; with more than 16 rows the x tile is large, so K steps are
short (64) and there are two programs per SM (tools/bench/bench_skinny.py --sweep). Stages and K steps shrink to
fit SHARED_MEMORY (fp32, two weights). Products accumulate
in fp32 (fp32 inputs: exact fp32, not tf32) and are rounded to the output dtype before the gate or the
residual, as the PyTorch reference rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import as_rows, check_triton_device, poison, sm_count

__all__ = ["CONFIG", "SkinnyConfig", "skinny_glu_triton", "skinny_linear_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch settings; None: the rule of ``_settings`` (tools/bench/bench_skinny.py sweeps them)."""

    block_k: int | None = None
    num_stages: int | None = None
    num_warps: int = 4
    programs_per_sm: int | None = None  # BN shrinks (to 16 at least) until the grid has this many programs per SM


CONFIG = SkinnyConfig()
# shared memory the pipeline stages may take (an H100 / H200 SM has 227 KiB; the rest is the compiler's)
SHARED_MEMORY = 160 * 1024


@triton.jit
def _skinny_kernel(
    x, w1, w2, r, y, M, N, K, s_x, s_w1, s_w2, s_r, s_y,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    GLU: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BN), cdiv(M, BM)): y[rows, cols] of one BM x BN tile."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    ks = tl.arange(0, BK)
    p_x = x + rows.to(tl.int64)[:, None] * s_x + ks[None, :]
    p_w1 = w1 + cols.to(tl.int64)[:, None] * s_w1 + ks[None, :]
    p_w2 = w2 + cols.to(tl.int64)[:, None] * s_w2 + ks[None, :]
    m_x = rows[:, None] < M
    m_w = cols[:, None] < N
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        if EVEN_K:
            b_x = tl.load(p_x, mask=m_x, other=0.0)
            b_w1 = tl.load(p_w1, mask=m_w, other=0.0)
        else:
            m_k = (k0 + ks)[None, :] < K
            b_x = tl.load(p_x, mask=m_x & m_k, other=0.0)
            b_w1 = tl.load(p_w1, mask=m_w & m_k, other=0.0)
        acc1 = tl.dot(b_x, tl.trans(b_w1), acc1, input_precision=PRECISION)
        if GLU:
            if EVEN_K:
                b_w2 = tl.load(p_w2, mask=m_w, other=0.0)
            else:
                b_w2 = tl.load(p_w2, mask=m_w & m_k, other=0.0)
            acc2 = tl.dot(b_x, tl.trans(b_w2), acc2, input_precision=PRECISION)
        p_x += BK
        p_w1 += BK
        p_w2 += BK
    out = acc1.to(y.dtype.element_ty)
    m_y = (rows[:, None] < M) & (cols[None, :] < N)
    if GLU:
        out = (out.to(tl.float32) * acc2.to(y.dtype.element_ty).to(tl.float32)).to(y.dtype.element_ty)
    if RESIDUAL:
        b_r = tl.load(r + rows.to(tl.int64)[:, None] * s_r + cols[None, :], mask=m_y, other=0.0)
        out = (b_r.to(tl.float32) + out.to(tl.float32)).to(y.dtype.element_ty)
    tl.store(y + rows.to(tl.int64)[:, None] * s_y + cols[None, :], out, mask=m_y)


def _settings(M: int, N: int, K: int, sms: int, weights: int, itemsize: int, cfg: SkinnyConfig) -> dict:
    """BM, BN, BK, STAGES and the grid of an [M, K] x [N, K]^T product with ``weights`` (1, or 2 for the gated
    product) of ``itemsize`` bytes per element (module docstring)."""
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    m_tiles = triton.cdiv(M, BM)
    if triton.cdiv(N, 16) * m_tiles <= 2 * sms:  # narrow output
        block_k, stages, per_sm = 256, 5, 1
    elif M <= 16:
        block_k, stages, per_sm = 128, 4, 1
    else:
        block_k, stages, per_sm = 64, 5, 2
    block_k, stages = cfg.block_k or block_k, cfg.num_stages or stages
    per_sm = cfg.programs_per_sm or per_sm
    BN = 64
    while BN > 16 and triton.cdiv(N, BN) * m_tiles < per_sm * sms:
        BN //= 2
    BK = min(block_k, max(16, triton.next_power_of_2(K)))
    stage_bytes = (BM + weights * BN) * itemsize  # shared memory of one pipeline stage per unit of BK
    while BK > 32 and 2 * stage_bytes * BK > SHARED_MEMORY:
        BK //= 2
    stages = max(1, min(stages, SHARED_MEMORY // (stage_bytes * BK)))
    return {"BM": BM, "BN": BN, "BK": BK, "STAGES": stages, "grid": (triton.cdiv(N, BN), m_tiles)}


def _launch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, residual: torch.Tensor | None):
    check_triton_device(x)
    if x.dtype not in DTYPES:
        raise TypeError(f"the skinny products take {DTYPES}; got {x.dtype}")
    N, K = w1.shape
    x2 = as_rows(x)
    M = x2.shape[0]
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in (w1, w1 if w2 is None else w2)]
    r2 = as_rows(residual) if residual is not None else x2
    y = poison(torch.empty(M, N, dtype=x.dtype, device=x.device))
    if M and N and K == 0:
        y.zero_()
        if residual is not None:
            y.copy_(r2)
    elif M and N:
        meta = _settings(M, N, K, sm_count(x.device), 1 if w2 is None else 2, x.element_size(), CONFIG)
        _skinny_kernel[meta.pop("grid")](
            x2, weights[0], weights[1], r2, y, M, N, K,
            x2.stride(0), weights[0].stride(0), weights[1].stride(0), r2.stride(0), y.stride(0),
            GLU=w2 is not None, RESIDUAL=residual is not None, EVEN_K=K % meta["BK"] == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=CONFIG.num_warps, **meta,
        )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ residual [..., N]) -> [..., N], contiguous, in x's dtype."""
    return _launch(x, weight, None, residual)


def skinny_glu_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(x W1^T) * (x W2^T) for x [..., K], W1 and W2 [N, K] -> [..., N], contiguous, in x's dtype."""
    return _launch(x, w1, w2, None)
