"""Plain PyTorch cross-entropy over a vocabulary split across tensor-parallel ranks: the oracle for the kernels
(and the path on CPU)."""

from __future__ import annotations

import torch


def cross_entropy_torch(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The oracle: logits [..., V] (the whole vocabulary), target [...] -> per-token loss [...],
    log(sum_v exp(x_v)) - x_target, in the logits' precision (fp64 for the checks)."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def row_stats_torch(logits: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """This rank's share of the loss, [3, M] fp32 (fp64 for fp64 logits) for logits [M, V_local] holding
    columns vocab_start ... vocab_start + V_local - 1 of the vocabulary and global target ids [M]:
    rows (max_v x_v, sum_v exp(x_v - max), x_target or 0 when the target is another rank's)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    row_max = x.amax(dim=-1)
    sum_exp = torch.exp(x - row_max[:, None]).sum(dim=-1)
    local = target - vocab_start
    mine = (local >= 0) & (local < x.shape[-1])
    target_logit = x.gather(-1, torch.where(mine, local, 0)[:, None]).squeeze(-1) * mine
    return torch.stack([row_max, sum_exp, target_logit])


def logits_grad_torch(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, vocab_start: int
) -> torch.Tensor:
    """d loss / d logits [M, V_local] in the logits' dtype: (exp(x - lse) - [v == target]) * grad_loss,
    for lse [M] the log-sum-exp over the whole vocabulary and grad_loss [M]."""
    x = logits.to(lse.dtype)
    grad = torch.exp(x - lse[:, None])
    local = target - vocab_start
    mine = (local >= 0) & (local < x.shape[-1])
    rows = torch.arange(x.shape[0], device=x.device)[mine]
    grad[rows, local[mine]] -= 1.0
    return (grad * grad_loss[:, None]).to(logits.dtype)
