"""SRMSNorm: x / sqrt(mean(x^2) + eps) over the last dimension, no parameters.

``srmsnorm`` is the norm itself; ``srmsnorm_gate`` fuses the attention output gate (TP = 1);
``norm_gate_rstd`` takes a per-row rstd computed by the caller, for a norm that spans tensor-parallel
ranks (see ``fused.py``), whose per-row statistic is ``sum_of_squares``. ``backend`` ("auto", "torch", "triton";
see ``megatron_tnllm.ops.backend``) picks the Triton kernels of ``fused.py`` or the PyTorch references of
``naive.py``; for ``srmsnorm`` alone, "auto" on a GPU runs ``torch.nn.functional.rms_norm`` without a weight, the
same fp32-statistics norm in one fused kernel each way, whose native autograd node costs less host time than a
Python autograd function around a Triton launch (the gated forms have no PyTorch counterpart and stay Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.srmsnorm.naive import (
    norm_gate_rstd_torch,
    srmsnorm_gate_torch,
    srmsnorm_torch,
    sum_of_squares_torch,
)

__all__ = ["norm_gate_rstd", "srmsnorm", "srmsnorm_gate", "srmsnorm_torch", "sum_of_squares"]


def srmsnorm(x: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """SRMSNorm of x [..., D] over D in fp32; the result has x's dtype and shape."""
    if resolve_backend(backend, x) == "triton":
        if backend == "auto":
            return F.rms_norm(x, x.shape[-1:], None, eps)
        from megatron_tnllm.ops.srmsnorm.fused import srmsnorm_triton

        return srmsnorm_triton(x, eps)
    return srmsnorm_torch(x, eps)


def srmsnorm_gate(x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """srmsnorm(x) * u for x, u [..., D], in fp32 without rounding in between; x's dtype out. TP = 1 only."""
    if u.shape != x.shape:
        raise ValueError(f"u must have x's shape {tuple(x.shape)}; got {tuple(u.shape)}")
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.srmsnorm.fused import srmsnorm_gate_triton

        return srmsnorm_gate_triton(x, u, eps)
    return srmsnorm_gate_torch(x, u, eps)


def norm_gate_rstd(x: torch.Tensor, u: torch.Tensor, rstd: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x * rstd[..., None] * u for x, u [..., D] and a per-row rstd [...] (fp32) that also gets a gradient.

    For the attention-output norm under tensor parallelism: rstd = rsqrt(all_reduce(sum(x^2, -1)) / D_total + eps).
    """
    if u.shape != x.shape or tuple(rstd.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"need u {tuple(x.shape)} and rstd {tuple(x.shape[:-1])}; got {tuple(u.shape)}, {tuple(rstd.shape)}"
        )
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.srmsnorm.fused import norm_gate_rstd_triton

        return norm_gate_rstd_triton(x, u, rstd)
    return norm_gate_rstd_torch(x, u, rstd)


def sum_of_squares(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """sum(x^2, -1) [...] of x [..., D] in fp32, differentiable; the statistic of an SRMSNorm split across ranks."""
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.srmsnorm.fused import sum_of_squares_triton

        return sum_of_squares_triton(x)
    return sum_of_squares_torch(x)
