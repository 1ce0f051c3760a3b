"""TransNormerLLM layers as Megatron-Core modules: token_mixer, softmax_attention (hybrids; both built on
head_parallel), sglu, norms, transformer_layer. The Megatron-free math they share with the Hugging Face model
(decay, lrpe) is in ``megatron_tnllm.ops``.

Import from the submodules: this package imports nothing itself.

Megatron-Core privates relied on (megatron-core 0.19.2; everything else is its public API):

* ``TransformerLayer._forward_attention``, overridden by
  :class:`~megatron_tnllm.layers.transformer_layer.TNLTransformerLayer` to scale the embeddings of layer 1.
  ``pretrain_gpt.py`` builds the stock ``GPTModel``, whose embedding has no scale, and the layer's public
  ``forward`` also runs the MLP half: ``_forward_attention`` is the one hook that sees the layer's input before
  its residual branch.
* ``megatron.core.ssm.utils._split_tensor_factory``, used by the token mixer's (and the softmax attention's)
  ``sharded_state_dict`` to save the fused q|k|v|u projection as one TP-invariant tensor per section. It is what
  Megatron's own Mamba and GatedDeltaNet layers use for their fused input projections; there is no public
  equivalent.
"""
