"""The input side of the token mixer: the qkvu projection [..., 4 H d] split into q, k, v, u with SiLU on q, k.

``qkvu_silu`` returns (SiLU(q), SiLU(k), v, u). Its Triton form writes SiLU(q) and SiLU(k) in one pass, hands v
and u back as views of qkvu, and in backward writes the whole qkvu gradient once (the SiLU derivative on the q
and k parts, dv and du copied, zeros where a gradient is absent) instead of autograd's zero-filled gradient per
slice, their sum and two SiLU backward passes. ``backend`` ("auto", "torch", "triton"; see
``megatron_tnllm.ops.backend``) picks the Triton kernels of ``fused.py`` or the PyTorch reference of ``naive.py``.
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.qkvu.naive import qkvu_silu_torch

__all__ = ["qkvu_silu", "qkvu_silu_torch"]


def qkvu_silu(
    qkvu: torch.Tensor, heads: int, head_dim: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkvu [..., 4 H d] ([q | k | v | u], each H heads of d) -> SiLU(q), SiLU(k), v [..., H, d] and u [..., H d].

    v and u are views of qkvu; q and k are new tensors (Triton: contiguous).
    """
    if qkvu.dim() == 0 or qkvu.shape[-1] != 4 * heads * head_dim:
        raise ValueError(
            f"qkvu's last dimension must be 4 * heads * head_dim = {4 * heads * head_dim}; got shape "
            f"{tuple(qkvu.shape)}"
        )
    if resolve_backend(backend, qkvu) == "triton":
        from megatron_tnllm.ops.qkvu.fused import qkvu_silu_triton

        return qkvu_silu_triton(qkvu, heads, head_dim)
    return qkvu_silu_torch(qkvu, heads, head_dim)
