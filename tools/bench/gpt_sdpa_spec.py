"""A softmax-attention GPT layer spec for Megatron-Core whose core attention is torch SDPA's flash kernel.

The baseline of the throughput comparison (tools/bench/bench_training.sh) on machines without Transformer
Engine: Megatron's local layer spec (RMSNorm, fused QKV, RoPE, SwiGLU) with ``DotProductAttention``
(which materialises the s x s scores) replaced by FlashAttention-2 through
``torch.nn.functional.scaled_dot_product_attention``.

    PYTHONPATH=tools/bench python pretrain_gpt.py ... --spec gpt_sdpa_spec gpt_sdpa_layer
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel


class SDPAFlashAttention(MegatronModule):
    """Causal softmax attention [s, b, h, d] x3 -> [s, b, h * d] (the core-attention builder protocol)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None, **kwargs) -> None:
        super().__init__(config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAFlashAttention has no context parallelism; use --context-parallel-size 1")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **kwargs) -> torch.Tensor:
        s, b, h, d = query.shape
        if key.shape[2] != h:  # grouped-query attention: repeat the key/value groups
            key = key.repeat_interleave(h // key.shape[2], dim=2)
            value = value.repeat_interleave(h // value.shape[2], dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.permute(2, 0, 1, 3).reshape(s, b, h * d)


gpt_sdpa_layer = get_gpt_layer_local_spec(normalization="RMSNorm")
gpt_sdpa_layer.submodules.self_attention.submodules.core_attention = SDPAFlashAttention
