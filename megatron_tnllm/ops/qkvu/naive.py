"""Plain PyTorch qkvu split with SiLU on q and k (and LRPE): the oracle for the kernels (and the path on CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_tnllm.ops.lrpe import apply_lrpe


def qkvu_silu_torch(
    qkvu: torch.Tensor,
    heads: int,
    head_dim: int,
    theta: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [s, ..., 4 H d] -> SiLU(q), SiLU(k) [s, ..., H, d], v [s, ..., H, d] and u [s, ..., H d] (v, u: views
    of qkvu). With theta [H, 1, d] and positions [s]: ``apply_lrpe`` on SiLU(q) and SiLU(k) ([s, ..., H, 2d])."""
    local = heads * head_dim
    q, k, v = qkvu[..., : 3 * local].unflatten(-1, (3, heads, head_dim)).unbind(-3)
    q, k = F.silu(q), F.silu(k)
    if theta is not None:
        pos = positions.view(-1, *[1] * (qkvu.dim() - 2))  # [s, 1, ...]: one position for a row's batch
        q, k = apply_lrpe(q, theta, pos), apply_lrpe(k, theta, pos)
    return q, k, v, qkvu[..., 3 * local :]
