"""Plain PyTorch qkvu split with SiLU on q and k: the oracle for the kernels (and the path on CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qkvu_silu_torch(
    qkvu: torch.Tensor, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [..., 4 H d] -> SiLU(q), SiLU(k), v [..., H, d] and u [..., H d] (v, u: views of qkvu)."""
    local = heads * head_dim
    q, k, v = qkvu[..., : 3 * local].unflatten(-1, (3, heads, head_dim)).unbind(-3)
    return F.silu(q), F.silu(k), v, qkvu[..., 3 * local :]
