"""TransNormerLLM checkpoint conversion between Hugging Face and Megatron-LM, at any scale (streaming).

``python -m megatron_tnllm.convert {hf-to-megatron,megatron-to-hf} SOURCE TARGET [options]``; see docs/conversion.md.
"""

from megatron_tnllm.convert.convert import ConversionResult, hf_to_megatron, megatron_to_hf
from megatron_tnllm.convert.errors import ConversionError, VerificationError

__all__ = ["ConversionError", "ConversionResult", "VerificationError", "hf_to_megatron", "megatron_to_hf"]
