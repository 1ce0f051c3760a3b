"""Operators of TransNormerLLM: each has a plain PyTorch reference beside its Triton kernels."""

from megatron_tnllm.ops.glu import glu_product
from megatron_tnllm.ops.lightning_attn import lightning_attention, lightning_attention_step
from megatron_tnllm.ops.qkvu import qkvu_silu
from megatron_tnllm.ops.skinny_linear import skinny_glu, skinny_linear
from megatron_tnllm.ops.srmsnorm import norm_gate_rstd, srmsnorm, srmsnorm_gate

__all__ = [
    "glu_product",
    "lightning_attention",
    "lightning_attention_step",
    "norm_gate_rstd",
    "qkvu_silu",
    "skinny_glu",
    "skinny_linear",
    "srmsnorm",
    "srmsnorm_gate",
]
