"""SRMSNorm: x / sqrt(mean(x^2) + eps) over the last dimension, no parameters."""

from __future__ import annotations

import torch

from megatron_tnllm.ops.lightning_attn import resolve_backend
from megatron_tnllm.ops.srmsnorm.naive import srmsnorm_torch

__all__ = ["srmsnorm", "srmsnorm_torch"]


def srmsnorm(x: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """SRMSNorm of x [..., D] over D in fp32; the result has x's dtype and shape."""
    if resolve_backend(backend, x) == "triton":
        raise NotImplementedError("the Triton SRMSNorm kernel is not built yet; use backend='torch'")
    return srmsnorm_torch(x, eps)
