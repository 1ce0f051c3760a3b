"""Plain PyTorch products of a few rows with a weight: the oracle for the kernels (and the path on CPU).

Each is what the Hugging Face model's layers compute op for op (``nn.Linear`` without bias, then the product or
the residual add in the input dtype), so a model on the CPU gives the same bits with or without these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def skinny_linear_torch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N], plus ``residual`` [..., N] when given."""
    y = F.linear(x, weight)
    return y if residual is None else residual + y


def skinny_glu_torch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SGLU's gated product (x w1^T) * (x w2^T): x [..., K], w1 and w2 [N, K] -> [..., N]."""
    return F.linear(x, w1) * F.linear(x, w2)
