"""SRMSNorm modules: TNL's only norm (no weight, no bias, fp32 statistics)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from megatron.core.transformer import TransformerConfig

from megatron_tnllm.ops import srmsnorm
from megatron_tnllm.ops.srmsnorm import sum_of_squares


class SRMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dim, for ``TransformerLayerSubmodules`` norm slots
    and the final norm (the Megatron norm-builder protocol: ``config=, hidden_size=, eps=``)."""

    def __init__(
        self, config: TransformerConfig | None = None, hidden_size: int | None = None, eps: float = 1e-6, **kwargs
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return srmsnorm(x, self.eps)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.eps}"


def rstd_across_tp(x: torch.Tensor, full_width: int, eps: float, group: dist.ProcessGroup | None) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over a vector split across tensor-parallel ranks: x [..., full_width / tp]
    is this rank's slice; returns the per-row rstd [...] (fp32) of the full vector.

    The sum of squares is all-reduced with an op whose backward is also an all-reduce: Megatron's
    ``reduce_from_tensor_model_parallel_region`` has an identity backward and would drop the other
    ranks' share of the gradient. On a GPU the sum of squares is one Triton pass over x (bf16 in, [...] fp32 out;
    its backward 2 x d_sum one more), with no fp32 copy of x.
    """
    sum_sq = sum_of_squares(x)
    if group is not None and dist.get_world_size(group) > 1:
        sum_sq = dist_nn.all_reduce(sum_sq, group=group)
    return torch.rsqrt(sum_sq / full_width + eps)
