"""megatron-tnllm: TransNormerLLM on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
