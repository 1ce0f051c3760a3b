"""The input side of the token mixer: the qkvu projection [..., 4 H d] split into q, k, v, u with SiLU on q, k,
and LRPE on q, k where the layer has it.

``qkvu_silu`` returns (SiLU(q), SiLU(k), v, u), or with ``theta`` and ``positions`` (LRPE) q' = [SiLU(q) cos t |
SiLU(q) sin t] and k' likewise, t = positions x theta in fp32 (``megatron_tnllm.ops.lrpe``). Its Triton form
writes q and k in one pass, hands v and u back as views of qkvu, and in backward writes the whole qkvu gradient
once (the SiLU and LRPE derivatives on the q and k parts, dv and du copied, zeros where a gradient is absent) and
theta's gradient from per-program partial sums, instead of autograd's zero-filled gradient per slice, their sum,
two SiLU backward passes and LRPE's fp32 tables and kernels. ``backend`` ("auto", "torch", "triton"; see
``megatron_tnllm.ops.backend``) picks the Triton kernels of ``fused.py`` or the PyTorch reference of ``naive.py``.
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.qkvu.naive import qkvu_silu_torch

__all__ = ["qkvu_silu", "qkvu_silu_torch"]


def qkvu_silu(
    qkvu: torch.Tensor,
    heads: int,
    head_dim: int,
    *,
    theta: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [s, ..., 4 H d] ([q | k | v | u], each H heads of d) -> SiLU(q), SiLU(k), v [s, ..., H, d] and
    u [s, ..., H d].

    With theta [H, 1, d] (LRPE's angles per channel) and positions [s] (integer positions of qkvu's first
    dimension, shared by the rest: the token mixer's [s, b] rows), q and k are [s, ..., H, 2d] with LRPE.
    v and u are views of qkvu; q and k are new tensors (Triton: contiguous).
    """
    if qkvu.dim() == 0 or qkvu.shape[-1] != 4 * heads * head_dim:
        raise ValueError(
            f"qkvu's last dimension must be 4 * heads * head_dim = {4 * heads * head_dim}; got shape "
            f"{tuple(qkvu.shape)}"
        )
    if (theta is None) != (positions is None):
        raise ValueError("LRPE needs both theta and positions; got only one of them")
    if theta is not None:
        if theta.numel() != heads * head_dim or theta.shape[-1] != head_dim:
            raise ValueError(f"theta must be [heads, 1, head_dim] = [{heads}, 1, {head_dim}]; got {tuple(theta.shape)}")
        if qkvu.dim() < 2 or positions.shape != qkvu.shape[:1] or positions.is_floating_point():
            raise ValueError(
                f"positions must be integers of shape [s] for qkvu [s, ..., 4 H d]; got {positions.dtype} "
                f"{tuple(positions.shape)} for qkvu {tuple(qkvu.shape)}"
            )
        if theta.device != qkvu.device or positions.device != qkvu.device:
            raise ValueError(
                f"theta ({theta.device}) and positions ({positions.device}) must be on qkvu's device {qkvu.device}"
            )
    if resolve_backend(backend, qkvu) == "triton":
        from megatron_tnllm.ops.qkvu.fused import qkvu_silu_triton

        return qkvu_silu_triton(qkvu, heads, head_dim, theta, positions)
    return qkvu_silu_torch(qkvu, heads, head_dim, theta, positions)
