"""TransNormerLLM checkpoint conversion between Hugging Face and Megatron-LM, at any scale (streaming).

``python -m megatron_tnllm.convert {hf-to-megatron,megatron-to-hf} SOURCE TARGET [options]``; see docs/conversion.md.
The names below load on first use, so that the command line can quiet Megatron-Core's import-time warnings first.
"""

import importlib

_EXPORTS = {
    "ConversionResult": "convert",
    "hf_to_megatron": "convert",
    "megatron_to_hf": "convert",
    "ConversionError": "errors",
    "VerificationError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
