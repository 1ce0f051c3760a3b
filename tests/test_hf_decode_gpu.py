"""CUDA-graph decoding of the Hugging Face model on a GPU (skipped without one).

The recorded graph replays the same kernels as the eager step, so generate() must give the same tokens and
(to the last bit, or near it where cuBLAS is free to pick another kernel) the same logits in every mode.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD
from tests.hf_helpers import TINY, tiny_model
from tests.testing import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GEN = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5).cuda()


def _tokens(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY.vocab_size, (b, n), generator=g).cuda()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=50, temperature=1.5),
        dict(num_beams=4, num_return_sequences=2, do_sample=False, output_scores=True),
    ],
    ids=["greedy", "sampling", "beam"],
)
def test_generate_graph_equals_eager(model, kwargs):
    ids = _tokens(3, 17, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    outs = {}
    for mode in ("eager", "graph"):
        model.decode_mode = mode
        torch.manual_seed(3)
        outs[mode] = model.generate(ids, attention_mask=mask, **kwargs, **GEN)
    assert torch.equal(outs["graph"].sequences, outs["eager"].sequences)
    graph_logits, eager_logits = torch.stack(outs["graph"].logits), torch.stack(outs["eager"].logits)
    assert rel_err(graph_logits, eager_logits) < 1e-6
    assert any(g.graph is not None for g in model.decode_graphs.values())


def test_graph_decode_equals_recomputation_bf16():
    model = tiny_model(seed=6).cuda().to(torch.bfloat16)
    model.decode_mode = "auto"  # a CUDA graph on CUDA
    tokens = _tokens(4, 40, seed=2)
    with torch.no_grad():
        out = model(tokens[:, :31], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps = [model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(31, 40)]
        full = model(tokens, use_cache=False).logits[:, 31:]
    assert len(model.decode_graphs) == 1
    got = torch.cat(steps, dim=1).float()
    assert rel_err(got, full) < 3e-2
    assert cache.positions.tolist() == [40] * 4 and cache.seen_tokens == 40
