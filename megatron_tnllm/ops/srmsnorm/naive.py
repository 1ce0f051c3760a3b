"""Plain PyTorch SRMSNorm (simple RMS norm, no weight, no bias): the oracle for the kernels."""

from __future__ import annotations

import torch


def srmsnorm_torch(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps), computed in fp32 (fp64 for fp64 input), returned in x's dtype."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
