"""Plain PyTorch gated product: the oracle for the kernels (and the path on CPU)."""

from __future__ import annotations

import torch


def glu_product_torch(x: torch.Tensor) -> torch.Tensor:
    """y = x[..., :F] * x[..., F:] for x [..., 2F]; autograd gives dx = [dy * x[..., F:], dy * x[..., :F]]."""
    a, b = torch.chunk(x, 2, dim=-1)
    return a * b
