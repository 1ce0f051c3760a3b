"""The gated product of SGLU: y = x[..., :F] * x[..., F:] for x [..., 2F] (the fc1 output holding [l1; l2]).

``glu_product`` replaces the chunk / ``+ 0.0`` / product / cat sequence of Megatron's non-fused gated MLP with
one pass forward and one pass backward. ``backend`` ("auto", "torch", "triton"; see
``megatron_tnllm.ops.backend``) picks the Triton kernels of ``fused.py`` or the PyTorch reference of ``naive.py``.
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.glu.naive import glu_product_torch

__all__ = ["glu_product", "glu_product_torch"]


def glu_product(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x [..., 2F] -> x[..., :F] * x[..., F:] [..., F] in x's dtype (the same bits as torch's product)."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"glu_product needs an even last dimension; got shape {tuple(x.shape)}")
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.glu.fused import glu_product_triton

        return glu_product_triton(x)
    return glu_product_torch(x)
