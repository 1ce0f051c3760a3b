"""TransNormerLLM layers as Megatron-Core modules (token_mixer, sglu, norms, transformer_layer) and the
Megatron-free math they share with the Hugging Face model (decay, lrpe).

Import from the submodules: this package imports nothing itself, so that ``decay`` and ``lrpe`` load
without megatron-core.
"""
