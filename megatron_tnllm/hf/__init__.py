"""TransNormerLLM for Hugging Face transformers: config, model with a constant-memory cache, tokenizer, export."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_tnllm.hf.configuration_transnormer import TransnormerConfig
from megatron_tnllm.hf.modeling_transnormer import (
    TransnormerCache,
    TransnormerForCausalLM,
    TransnormerModel,
    TransnormerPreTrainedModel,
)
from megatron_tnllm.hf.tokenization_transnormer import TransnormerTokenizer


def register_auto_classes() -> None:
    """Makes AutoConfig / AutoModelForCausalLM / AutoTokenizer load ``model_type: "transnormer"`` directories with
    this package's classes, so that exports load with ``trust_remote_code=False`` (their copied ``*.py`` files are
    not run). Idempotent."""
    AutoConfig.register(TransnormerConfig.model_type, TransnormerConfig, exist_ok=True)
    AutoModelForCausalLM.register(TransnormerConfig, TransnormerForCausalLM, exist_ok=True)
    AutoTokenizer.register(TransnormerConfig, slow_tokenizer_class=TransnormerTokenizer, exist_ok=True)


__all__ = [
    "TransnormerCache",
    "TransnormerConfig",
    "TransnormerForCausalLM",
    "TransnormerModel",
    "TransnormerPreTrainedModel",
    "TransnormerTokenizer",
    "register_auto_classes",
]
