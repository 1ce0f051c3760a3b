"""TransNormerLLM layers as Megatron-Core modules."""

from megatron_tnllm.layers.decay import alibi_slopes, layer_slopes
from megatron_tnllm.layers.lrpe import apply_lrpe, lrpe_theta_init
from megatron_tnllm.layers.norms import SRMSNorm, rstd_across_tp
from megatron_tnllm.layers.sglu import SGLU
from megatron_tnllm.layers.token_mixer import TokenMixer, TokenMixerSubmodules
from megatron_tnllm.layers.transformer_layer import TNLTransformerLayer

__all__ = [
    "SGLU",
    "SRMSNorm",
    "TNLTransformerLayer",
    "TokenMixer",
    "TokenMixerSubmodules",
    "alibi_slopes",
    "apply_lrpe",
    "layer_slopes",
    "lrpe_theta_init",
    "rstd_across_tp",
]
