"""LRPE, linearized relative positional encoding (docs/model.md §1.2).

x -> concat(x * cos(theta p), x * sin(theta p)) along the head dim, so that
q'.k' = sum_c q_c k_c cos(theta_c (s - t)): relative, and invariant to a common position shift.
Angles are formed in fp32 (the released HF code forms them in the activation dtype, which rounds
positions above 256 in bf16).
"""

from __future__ import annotations

import torch


def lrpe_theta_init(num_heads: int, head_dim: int, first_head: int = 0, count: int | None = None) -> torch.Tensor:
    """theta_{h,c} = 10000^(-2 (h dh + c) / D), D = H dh, for heads first_head .. first_head+count-1.

    Returns [count, 1, head_dim] fp32 (the HF ``lrpe.theta`` layout).
    """
    count = num_heads - first_head if count is None else count
    width = num_heads * head_dim
    index = torch.arange(first_head * head_dim, (first_head + count) * head_dim, dtype=torch.float64)
    return (10000.0 ** (-2.0 * index / width)).float().view(count, 1, head_dim)


def apply_lrpe(x: torch.Tensor, theta: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [..., H, d] at ``positions`` (broadcastable to x.shape[:-2]) -> [..., H, 2d] in x's dtype.

    theta: [H, 1, d] (or [H, d]).
    """
    H, d = x.shape[-2], x.shape[-1]
    angle = positions.to(torch.float32)[..., None, None] * theta.reshape(H, d).float()
    xf = x.float()
    return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)
