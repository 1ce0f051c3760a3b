"""TNL's channel mixer, SGLU: l3(l1(x) * l2(x)), bias-free, no activation (docs/model.md §1)."""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP


def identity(x: torch.Tensor) -> torch.Tensor:
    """The GLU "activation" of SGLU: none."""
    return x


class SGLU(MLP):
    """Megatron's gated MLP with the activation removed.

    fc1 holds [l1; l2] (column-parallel, interleaved per TP rank and resharded by Megatron's
    swiglu checkpoint factory), fc2 is l3 (row-parallel). The module keeps a private copy of the
    config with the gated-linear-unit settings, so no command-line flag can turn SGLU into SwiGLU.
    Build it in a layer spec as ``functools.partial(SGLU.as_mlp_submodule, submodules=MLPSubmodules(...))``.
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
