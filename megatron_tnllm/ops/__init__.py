"""Operators of TransNormerLLM: each has a plain PyTorch reference beside its Triton kernels."""

from megatron_tnllm.ops.lightning_attn import lightning_attention, lightning_attention_step
from megatron_tnllm.ops.srmsnorm import srmsnorm

__all__ = ["lightning_attention", "lightning_attention_step", "srmsnorm"]
