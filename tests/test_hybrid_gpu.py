"""Hybrid TNL on a GPU (skipped without one): the softmax layer's attention through SDPA's flash kernel in bf16,
and Hugging Face generation with the hybrid cache on CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_tnllm.hf import TransnormerForCausalLM
from megatron_tnllm.layers.softmax_attention import causal_attention
from tests.hf_helpers import GEN, hybrid_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flash_attention_bf16_matches_fp64_per_packed_segment():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 1000, 1001, 4096], device="cuda", dtype=torch.int32)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these inputs
        whole, packed = causal_attention(q, k, v), causal_attention(q, k, v, cu)
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(128)
    pos = torch.arange(4096, device="cuda")
    segment = torch.bucketize(pos, cu[1:], right=True)
    for out, same_segment in [(whole, True), (packed, segment[:, None] == segment[None, :])]:
        allowed = (pos[:, None] >= pos[None, :]) & same_segment
        expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        err = ((out.double() - expected).norm() / expected.norm()).item()
        assert err < 1e-2, f"flash bf16 attention off fp64 by {err:.1e}"


def test_hf_hybrid_generates_on_cuda_as_recomputation():
    torch.manual_seed(2)
    model = TransnormerForCausalLM(hybrid_config()).cuda().eval()  # decode_mode "auto": eager for a hybrid
    ids = torch.randint(3, 1000, (3, 40), generator=torch.Generator().manual_seed(1)).cuda()
    for kwargs in [dict(do_sample=False), dict(num_beams=4, num_return_sequences=2, do_sample=False)]:
        cached = model.generate(ids, **kwargs, **GEN)
        recomputed = model.generate(ids, use_cache=False, **kwargs, **GEN)
        assert torch.equal(cached.sequences, recomputed.sequences)
