"""The TNL decoder layer: Megatron's ``TransformerLayer`` plus the preset's embedding scale."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class TNLTransformerLayer(TransformerLayer):
    """A pre-norm ``TransformerLayer`` whose first layer scales its input by the embedding scale.

    ``pretrain_gpt.py`` builds the stock ``GPTModel``, whose embedding has no scale; TNL's
    h = embed(ids) * s_emb is applied here instead, at global layer 1, before the residual
    branch and the input norm — the same computation.
    """

    def __init__(self, *args, embedding_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embedding_scale = embedding_scale if self.layer_number == 1 else 1.0

    def _forward_attention(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.embedding_scale != 1.0:
            hidden_states = hidden_states * self.embedding_scale
        return super()._forward_attention(hidden_states, *args, **kwargs)
