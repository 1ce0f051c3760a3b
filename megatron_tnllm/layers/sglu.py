"""TNL's channel mixer, SGLU: l3(l1(x) * l2(x)), bias-free, no activation (docs/model.md §1)."""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.utils import nvtx_range_pop, nvtx_range_push

from megatron_tnllm.ops.glu import glu_product


def identity(x: torch.Tensor) -> torch.Tensor:
    """The GLU "activation" of SGLU: none."""
    return x


class SGLU(MLP):
    """Megatron's gated MLP with the activation removed.

    fc1 holds [l1; l2] (column-parallel, interleaved per TP rank and resharded by Megatron's
    swiglu checkpoint factory), fc2 is l3 (row-parallel). The module keeps a private copy of the
    config with the gated-linear-unit settings, so no command-line flag can turn SGLU into SwiGLU.
    Build it in a layer spec as ``functools.partial(SGLU.as_mlp_submodule, submodules=MLPSubmodules(...))``.

    ``forward`` replaces Megatron's non-fused gated path (chunk, ``+ glu_linear_offset``, product, and a cat in
    backward) with one gated-product op; the linears, the checkpoint layout and the (output, bias) contract are
    Megatron's.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        config = copy.copy(config)
        config.gated_linear_unit = True
        config.activation_func = identity
        config.bias_activation_fusion = False
        config.use_te_activation_func = False
        config.add_bias_linear = False
        config.glu_linear_offset = 0.0
        config.activation_func_clamp_value = None
        super().__init__(config, *args, **kwargs)

    def forward(
        self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, D] -> (l3(l1(x) * l2(x)) [s, b, D], fc2's bias: None, SGLU is bias-free)."""
        if per_token_scale is not None:
            raise NotImplementedError("SGLU is a dense MLP; per_token_scale (MoE expert weighting) is not supported")
        nvtx_range_push(suffix="linear_fc1")
        intermediate, _ = self.linear_fc1(hidden_states)  # [s, b, 2F/tp] = [l1 | l2] of this rank; bias-free
        nvtx_range_pop(suffix="linear_fc1")
        nvtx_range_push(suffix="activation")
        intermediate = glu_product(intermediate)  # [s, b, F/tp]
        nvtx_range_pop(suffix="activation")
        nvtx_range_push(suffix="linear_fc2")
        output, output_bias = self.linear_fc2(intermediate)
        nvtx_range_pop(suffix="linear_fc2")
        return output, output_bias
