"""TransNormerLLM for Hugging Face transformers: config, model with a constant-memory cache, tokenizer, export."""

from megatron_tnllm.hf.configuration_transnormer import TransnormerConfig
from megatron_tnllm.hf.modeling_transnormer import (
    TransnormerCache,
    TransnormerForCausalLM,
    TransnormerModel,
    TransnormerPreTrainedModel,
)
from megatron_tnllm.hf.tokenization_transnormer import TransnormerTokenizer

__all__ = [
    "TransnormerCache",
    "TransnormerConfig",
    "TransnormerForCausalLM",
    "TransnormerModel",
    "TransnormerPreTrainedModel",
    "TransnormerTokenizer",
]
