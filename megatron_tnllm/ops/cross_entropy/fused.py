"""Triton cross-entropy over this rank's share of the vocabulary: one read of the logits forward, one read and one
write backward, no fp32 copy of the logits.

    forward   stats[:, r] = (m_r, s_r, t_r):  m_r = max_v x[r, v],  s_r = sum_v exp(x[r, v] - m_r),
              t_r = x[r, target_r - vocab_start] when the target is in this rank's columns, else 0
    backward  dx[r, v] = (exp(x[r, v] - lse_r) - [v == target_r - vocab_start]) * dloss_r

The ranks' (m, s, t) are combined into the loss lse_r - x_target by the caller (``vocab_parallel.py``): all
arithmetic in fp32, the gradient rounded once to the logits' dtype.

Layout: logits [M, V_local] read through a row stride (unit column stride); target [M] int; the forward runs one
program per row (its row in BV-wide blocks, a running max and rescaled sum), the backward one per BV columns of a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_tnllm.ops.backend import check_triton_device, poison

__all__ = ["logits_grad_triton", "row_stats_triton"]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _row_stats_kernel(x, target, stats, M, V, vocab_start, s_x, BV: tl.constexpr):
    """Grid (M,). stats [3, M] fp32: row max, sum of exp(x - max), target logit (0 when another rank's)."""
    row = tl.program_id(0).to(tl.int64)
    base = x + row * s_x
    cols = tl.arange(0, BV)
    # the first block holds at least one column, so the running max starts finite
    b_x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    row_max = tl.max(b_x, 0)
    sum_exp = tl.sum(tl.exp(b_x - row_max), 0)
    for i in range(1, tl.cdiv(V, BV)):
        c = i * BV + cols
        b_x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(b_x, 0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(b_x - new_max), 0)
        row_max = new_max
    local = tl.load(target + row).to(tl.int64) - vocab_start
    mine = (local >= 0) & (local < V)
    target_logit = tl.load(base + tl.where(mine, local, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(stats + row, row_max)
    tl.store(stats + M + row, sum_exp)
    tl.store(stats + 2 * M + row, target_logit)


@triton.jit
def _logits_grad_kernel(x, target, lse, grad_loss, dx, V, vocab_start, s_x, s_dx, BV: tl.constexpr):
    """Grid (M, cdiv(V, BV)) (rows on the axis without the 65535 limit).
    dx[r, v] = (exp(x[r, v] - lse[r]) - [v == target[r] - vocab_start]) * grad_loss[r]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    m = cols < V
    b_x = tl.load(x + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
    b_p = tl.exp(b_x - tl.load(lse + row))
    local = tl.load(target + row).to(tl.int64) - vocab_start
    b_p = tl.where(cols == local, b_p - 1.0, b_p) * tl.load(grad_loss + row)
    tl.store(dx + row * s_dx + cols, b_p.to(dx.dtype.element_ty), mask=m)


def _check(logits: torch.Tensor) -> None:
    check_triton_device(logits)
    if logits.dtype not in DTYPES:
        raise TypeError(f"the Triton cross-entropy takes logits in {DTYPES}; got {logits.dtype}")


def row_stats_triton(logits: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """logits [M, V_local] (unit column stride), target [M] global ids -> [3, M] fp32: row max, sum of
    exp(x - max), target logit or 0 (``naive.row_stats_torch``)."""
    _check(logits)
    M, V = logits.shape
    stats = poison(torch.empty(3, M, dtype=torch.float32, device=logits.device))
    if M:
        BV = min(4096, triton.next_power_of_2(V))
        _row_stats_kernel[(M,)](logits, target, stats, M, V, vocab_start, logits.stride(0), BV=BV, num_warps=8)
    return stats


def logits_grad_triton(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, vocab_start: int
) -> torch.Tensor:
    """d loss / d logits [M, V_local] in the logits' dtype, for lse and grad_loss [M] fp32
    (``naive.logits_grad_torch``)."""
    _check(logits)
    M, V = logits.shape
    dx = poison(torch.empty(M, V, dtype=logits.dtype, device=logits.device))
    if M:
        BV = min(4096, triton.next_power_of_2(V))
        grid = (M, triton.cdiv(V, BV))
        _logits_grad_kernel[grid](
            logits, target, lse, grad_loss, dx, V, vocab_start, logits.stride(0), dx.stride(0), BV=BV, num_warps=8
        )
    return dx
