"""Plain PyTorch SRMSNorm (simple RMS norm, no weight, no bias) and its gated forms: the oracles for the kernels.

Each computes in fp32 (fp64 for fp64 input) and returns x's dtype.
"""

from __future__ import annotations

import torch


def srmsnorm_torch(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) for x [..., D]."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def srmsnorm_gate_torch(x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = srmsnorm(x) * u for x, u [..., D], without rounding in between."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * u.to(xf.dtype)).to(x.dtype)


def norm_gate_rstd_torch(x: torch.Tensor, u: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """y = x * rstd[..., None] * u for x, u [..., D] and a per-row rstd [...]."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * rstd.to(xf.dtype)[..., None] * u.to(xf.dtype)).to(x.dtype)


def sum_of_squares_torch(x: torch.Tensor) -> torch.Tensor:
    """sum(x^2, -1) [...] for x [..., D], in fp32 (fp64 for fp64 input)."""
    xf = x if x.dtype == torch.float64 else x.float()
    return xf.pow(2).sum(-1)
