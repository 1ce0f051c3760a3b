"""Operators of TransNormerLLM: each has a plain PyTorch reference beside its Triton kernels."""

from megatron_tnllm.ops.lightning_attn import lightning_attention, lightning_attention_step
from megatron_tnllm.ops.srmsnorm import norm_gate_rstd, srmsnorm, srmsnorm_gate

__all__ = ["lightning_attention", "lightning_attention_step", "norm_gate_rstd", "srmsnorm", "srmsnorm_gate"]
