"""Causal softmax attention as a Megatron-Core ``self_attention`` module, for hybrid TNL models.

Per layer, on TP-local heads (the same conventions as the TNL token mixer):
    [q|k|v] = x W_qkv               column-parallel by head; this rank holds [q_r; k_r; v_r]
    o = softmax(q k^T / sqrt(d) + causal mask) v     torch SDPA (flash on CUDA, math on a CPU)
    out = o W_out                   row-parallel (all-reduce, or reduce-scatter under SP)

No position encoding (NoPE). In a hybrid the lightning-attention layers carry position: their decay is a
recency bias and layer 0 has LRPE, so the hidden states reaching a softmax layer already encode where each
token is, and the causal mask itself orders tokens; Jamba drops positions in its attention layers for the same
reason. NoPE also keeps the layer free of rotary bookkeeping under context parallelism, packed sequences and the
KV cache, and has no trained-length limit of its own. (MiniMax-01 applies RoPE to half of each head instead.)

Context parallelism uses the token mixer's all-to-all: the rank's zig-zag share of the sequence is traded for
the whole sequence, in natural order, of 1/CP of its heads, so the causal mask needs no rank arithmetic; a
second all-to-all trades the output back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.gated_delta_net import tensor_a2a_cp2hp, tensor_a2a_hp2cp
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_tnllm.layers.head_parallel import HeadParallelMixer

QKV_SECTIONS = ("query", "key", "value")


@dataclass
class SoftmaxAttentionSubmodules:
    """The two parallel linears of the layer (local Megatron layers by default)."""

    qkv_proj: ModuleSpec | type = ColumnParallelLinear
    out_proj: ModuleSpec | type = RowParallelLinear


class SoftmaxAttention(HeadParallelMixer):
    """Multi-head causal softmax attention; plugs into ``TransformerLayerSubmodules.self_attention``.

    Args:
        config: the model's TransformerConfig (heads, kv_channels).
        submodules: the qkv and output projections.
        layer_number: 1-based global layer number (Megatron passes it; every softmax layer computes the same).
        pg_collection: process groups (TP and CP are used); defaults to parallel_state's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SoftmaxAttentionSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config, pg_collection)
        self.qkv_proj, self.out_proj = self._build_projections(
            submodules.qkv_proj, submodules.out_proj, len(QKV_SECTIONS), "qkv_proj", name
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context: BaseInferenceContext | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, D] ([s/tp, b, D] under sequence parallelism) -> ([s(/tp), b, D], None).

        The attention mask is ignored (the layer is causal by construction); packed THD batches attend
        within each ``packed_seq_params.cu_seqlens_q`` segment only.
        """
        cu_seqlens = self._packed_cu_seqlens(inference_context, packed_seq_params)
        qkv, _ = self.qkv_proj(hidden_states)  # [s, b, 3 * D / tp] (s: this CP rank's tokens)
        b = qkv.shape[1]
        local = self.heads_local * self.head_dim
        qkv = tensor_a2a_cp2hp(qkv, 0, -1, self.cp_group, split_sections=[local] * 3)
        seq = qkv.shape[0]  # the whole sequence under CP
        q, k, v = qkv.view(seq, b, 3, self.heads_attn, self.head_dim).permute(2, 1, 3, 0, 4)  # [b, h, seq, d] each
        o = causal_attention(q, k, v, cu_seqlens)
        o = tensor_a2a_hp2cp(o.permute(2, 0, 1, 3).reshape(seq, b, -1), 0, -1, self.cp_group)  # [s, b, D / tp]
        return self.out_proj(o)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """TP-invariant checkpoint keys: qkv is saved as three tensors ``qkv_proj.weight.{query,key,value}``,
        each [D, D] globally (the HF row blocks)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}qkv_proj.weight"
        local = self.heads_local * self.head_dim
        state[key] = _split_tensor_factory(state[key], [local] * 3, list(QKV_SECTIONS), 0)
        return state


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """q, k, v [b, h, s, d] -> o [b, h, s, d]; causal, scale 1/sqrt(d).

    With ``cu_seqlens`` (packed sequences, int [n + 1] offsets into s) each segment attends only to itself;
    segments run one by one so that every call keeps SDPA's mask-free causal (flash) path.
    """
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[2]:
        raise ValueError(f"cu_seqlens must run from 0 to the sequence length {q.shape[2]}; got {bounds}")
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], is_causal=True)
            for a, e in zip(bounds[:-1], bounds[1:], strict=True)
            if e > a
        ],
        dim=2,
    )
