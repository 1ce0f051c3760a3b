"""Cross-entropy of the language-model head, vocabulary split across tensor-parallel ranks.

``vocab_parallel_cross_entropy`` takes Megatron's output-layer logits [s, b, V / tp] and the target ids [s, b]
and returns the per-token loss, as Megatron's ``vocab_parallel_cross_entropy`` does, in one pass over the logits
forward and one backward (``--cross-entropy-loss-fusion --cross-entropy-fusion-impl tnl`` with the patch of
``patches/``). ``backend`` ("auto", "torch", "triton"; see ``megatron_tnllm.ops.backend``) picks the Triton
kernels of ``fused.py`` or the PyTorch code of ``naive.py``; ``cross_entropy_torch`` is the oracle.
"""

from megatron_tnllm.ops.cross_entropy.naive import cross_entropy_torch
from megatron_tnllm.ops.cross_entropy.vocab_parallel import vocab_parallel_cross_entropy

__all__ = ["cross_entropy_torch", "vocab_parallel_cross_entropy"]
