"""Products of a few rows with a large weight, the matrix products of a decode step.

A decode step multiplies one row per sequence (batch x 1 token) with every weight of the model, so each product
is a pass over the weight with almost no arithmetic: its speed is the weight's read from memory. ``skinny_linear``
(x W^T, optionally plus a residual) and ``skinny_glu`` (SGLU's (x W1^T) * (x W2^T)) are one Triton kernel each,
with the residual add and the gated product in the epilogue (no extra launches). ``backend`` ("auto", "torch",
"triton"; see ``megatron_tnllm.ops.backend``) picks the kernels of ``fused.py`` or the PyTorch references of
``naive.py``. Forward only: nothing here records a gradient.
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.skinny_linear.naive import skinny_glu_torch, skinny_linear_torch

__all__ = ["skinny_glu", "skinny_glu_torch", "skinny_linear", "skinny_linear_torch"]


def _check(x: torch.Tensor, weights: tuple[torch.Tensor, ...], residual: torch.Tensor | None) -> None:
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1] or w.shape != weights[0].shape:
            raise ValueError(
                f"weights must be [N, K] with K = x's last dim {x.shape[-1]} (and one shape for both); "
                f"got {[tuple(w.shape) for w in weights]}"
            )
        if w.dtype != x.dtype:
            raise TypeError(f"x and the weights must share a dtype; got {x.dtype} and {w.dtype}")
    out_shape = (*x.shape[:-1], weights[0].shape[0])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}; got {tuple(residual.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, residual)):
        raise RuntimeError("skinny_linear / skinny_glu are forward only; call them under torch.no_grad()")


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ residual [..., N]) -> [..., N] in x's dtype: the product is rounded to the
    dtype, then the residual added and rounded again, as ``residual + F.linear(x, weight)`` rounds."""
    _check(x, (weight,), residual)
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.skinny_linear.fused import skinny_linear_triton

        return skinny_linear_triton(x, weight, residual)
    return skinny_linear_torch(x, weight, residual)


def skinny_glu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """(x W1^T) * (x W2^T) for x [..., K], W1 and W2 [N, K] -> [..., N] in x's dtype, each product rounded to
    the dtype before they are multiplied, as ``F.linear(x, w1) * F.linear(x, w2)`` rounds."""
    _check(x, (w1, w2), None)
    if resolve_backend(backend, x) == "triton":
        from megatron_tnllm.ops.skinny_linear.fused import skinny_glu_triton

        return skinny_glu_triton(x, w1, w2)
    return skinny_glu_torch(x, w1, w2)
