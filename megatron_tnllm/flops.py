"""Model FLOPs of TNL, the counterpart of Megatron's softmax-attention formula.

Counted like Megatron's ``num_floating_point_operations``: matrix products only, 2 FLOPs per
multiply-add, backward = 2x forward (so training = 3x forward), causal work counted once (the
masked half of a block is free). Per token and layer, forward:

    projections   2 D (4D) + 2 D D       fused qkvu, out
    SGLU          2 D (2G) + 2 G D       l1, l2, l3
    attention     H [C (dk + dv) + 4 dk dv]
                  intra-chunk Q K^T and A V over the causal half of a C-token chunk, plus the
                  inter-chunk products Q S and K^T V with the dk x dv state (dk = 2 dh on LRPE layers)
    logits        2 D V                  once per token

The chunk C is the kernels' 64. Unlike softmax attention nothing grows with the sequence length. A hybrid's
softmax-attention layers (:mod:`megatron_tnllm.hybrid`) count 2 D (3D) + 2 D D for qkv and out, the same SGLU,
and 2 s D for Q K^T and A V over the causal half of an s-token sequence (the masked half counted as free).
"""

from __future__ import annotations

import argparse

from megatron_tnllm.spec_table import spec_info

CHUNK = 64


def tnl_forward_flops_per_token(
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
    num_lrpe_layers: int = 1,
    chunk: int = CHUNK,
    num_softmax_layers: int = 0,
    seq_length: int = 0,
) -> int:
    """Forward FLOPs of one token through the whole model (see the module docstring); ``num_softmax_layers`` of
    the layers use softmax attention over ``seq_length`` tokens instead of the TNL token mixer."""
    D, G, H = hidden_size, ffn_hidden_size, num_heads
    dh = D // H

    def attention(dk: int) -> int:
        return H * (chunk * (dk + dh) + 4 * dk * dh)

    sglu = 2 * D * 2 * G + 2 * G * D
    dense = 2 * D * 4 * D + 2 * D * D + sglu
    num_tnl = num_layers - num_lrpe_layers - num_softmax_layers
    per_layer = num_tnl * (dense + attention(dh)) + num_lrpe_layers * (dense + attention(2 * dh))
    softmax = 2 * D * 3 * D + 2 * D * D + sglu + 2 * seq_length * D
    return per_layer + num_softmax_layers * softmax + 2 * D * vocab_size


def tnl_training_flops(args: argparse.Namespace, tokens: int) -> float:
    """Training FLOPs (forward + backward) for ``tokens`` tokens, from ``pretrain_gpt.py`` args.

    Called by Megatron-LM's ``num_floating_point_operations`` when patched with
    ``patches/core_v0.19.0-tnl-flops.patch``; the LRPE and softmax-attention layers are those of the spec NAME
    (:data:`megatron_tnllm.spec_table.SPECS`).
    """
    info = spec_info(args.spec[1])
    softmax_layers = [i for i in info.softmax_layers_of(args.num_layers) if i < args.num_layers]
    per_token = tnl_forward_flops_per_token(
        args.num_layers,
        args.hidden_size,
        args.num_attention_heads,
        args.ffn_hidden_size,
        args.padded_vocab_size,
        len(info.lrpe_layers),
        num_softmax_layers=len(softmax_layers),
        seq_length=args.seq_length if softmax_layers else 0,
    )
    return 3.0 * per_token * tokens
