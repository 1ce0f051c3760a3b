"""Cross-entropy of logits split by vocabulary across tensor-parallel ranks (Megatron's output layer): each rank
reduces its own columns to three numbers per token, one all-reduce of the max and one of the rescaled sums and
target logits combine them, and each rank computes the gradient of its own columns.

Megatron's ``vocab_parallel_cross_entropy`` (and its "native" fused variant) copies the logits to fp32, keeps
exp(logits) for the backward and makes several passes over them; here the forward reads the logits once, the
backward reads them once and writes the gradient once, and the saved state is the logits themselves plus the
log-sum-exp per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_tnllm.ops.backend import as_rows, resolve_backend
from megatron_tnllm.ops.cross_entropy.naive import logits_grad_torch, row_stats_torch

__all__ = ["vocab_parallel_cross_entropy"]


def _row_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from megatron_tnllm.ops.cross_entropy.fused import row_stats_triton

        return row_stats_triton(logits, target, vocab_start)
    return row_stats_torch(logits, target, vocab_start)


def _logits_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from megatron_tnllm.ops.cross_entropy.fused import logits_grad_triton

        return logits_grad_triton(logits, target, lse, grad_loss, vocab_start)
    return logits_grad_torch(logits, target, lse, grad_loss, vocab_start)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, backend):
        x, t = as_rows(logits), target.reshape(-1).contiguous()
        tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * x.shape[1]
        row_max, sum_exp, target_logit = _row_stats(x, t, vocab_start, backend)
        if tp_size > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit])
            dist.all_reduce(sums, group=tp_group)
            row_max, (sum_exp, target_logit) = global_max, sums
        lse = row_max + torch.log(sum_exp)
        ctx.save_for_backward(x, t, lse)
        ctx.vocab_start, ctx.backend = vocab_start, backend
        return (lse - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, t, lse = ctx.saved_tensors
        g = grad_loss.reshape(-1).to(lse.dtype).contiguous()
        dx = _logits_grad(x, t, lse, g, ctx.vocab_start, ctx.backend)
        return dx.view(*grad_loss.shape, x.shape[1]), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy loss [s, b] (fp32; fp64 for fp64 logits) of logits [s, b, V / tp] (this rank's
    columns ``rank * V/tp`` ... of the vocabulary, as Megatron's ``ColumnParallelLinear`` output layer leaves
    them) and target ids [s, b] in the whole vocabulary, reduced over ``tp_group`` (None: one rank holds all of
    it). The gradient of the logits comes back in their dtype. Any leading shape works in place of [s, b].

    Targets outside [0, V) count as another rank's (their loss is the log-sum-exp); Megatron's loss mask is
    applied by the caller, as with Megatron's own cross-entropy. No label smoothing."""
    if not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"logits must be a floating tensor [..., V]; got {logits.dtype} {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids; got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape without the vocabulary dim "
            f"{tuple(logits.shape[:-1])}"
        )
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, resolve_backend(backend, logits))
