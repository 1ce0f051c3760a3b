"""Decoding on static buffers (the path a CUDA graph records), on CPU.

``decode_mode="static"`` runs exactly the step that ``"graph"`` captures, on the same buffers, without the
capture. It must equal the plain cached forward bit for bit, and recomputation without a cache to rounding;
generate() (greedy, sampling, beam search, left padding) must produce what it produces in eager mode.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD
from tests.hf_helpers import TINY, tiny_model
from tests.testing import rel_err

GEN = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


@pytest.fixture
def model():
    return tiny_model(seed=3, num_layers=2)


def _tokens(b, n, seed=0):
    return torch.randint(3, TINY.vocab_size, (b, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, mode, tokens, prompt_len):
    """Prefill tokens[:, :prompt_len], then feed the rest one at a time -> (logits of every fed token, cache)."""
    model.decode_mode = mode
    with torch.no_grad():
        out = model(tokens[:, :prompt_len], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps = [
            model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prompt_len, tokens.shape[1])
        ]
    return torch.cat([out.logits, *steps], dim=1), cache


def test_static_step_equals_cached_forward_and_recomputation(model):
    tokens = _tokens(3, 20)
    eager, eager_cache = _decode(model, "eager", tokens, 12)
    static, static_cache = _decode(model, "static", tokens, 12)
    assert torch.equal(static, eager)  # the same operations, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(static_cache.states, eager_cache.states, strict=True))
    assert static_cache.positions.tolist() == [20] * 3 and static_cache.seen_tokens == 20
    graph = next(iter(model.decode_graphs.values()))
    assert all(s is t for s, t in zip(static_cache.states, graph.states, strict=True))  # it ran on the buffers
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
    assert rel_err(static, full) < 1e-5


def test_one_graph_per_batch_size_and_no_shared_state(model):
    """Two caches of one batch size alternate on one set of buffers; each must decode as if alone."""
    a, b, c = _tokens(2, 14, seed=1), _tokens(2, 14, seed=2), _tokens(5, 9, seed=3)
    expected = [_decode(model, "eager", t, 8)[0][:, 8:] for t in (a, b)]
    model.decode_mode = "static"
    with torch.no_grad():
        caches = [getattr(model(t[:, :8], use_cache=True), CACHE_FIELD) for t in (a, b)]
        got = [[], []]
        for t in range(8, 14):
            for i, (tokens, cache) in enumerate(zip((a, b), caches, strict=True)):
                got[i].append(model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits)
        _decode(model, "static", c, 6)  # another batch size: another graph
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(torch.cat(g, dim=1), e)
    assert sorted(g.ids.shape[0] for g in model.decode_graphs.values()) == [2, 5]


def test_reorder_is_in_place():
    cache = getattr(tiny_model(seed=0, num_layers=2)(_tokens(3, 5), use_cache=True), CACHE_FIELD)
    before = [s.clone() for s in cache.states]
    ids = [id(s) for s in cache.states]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert [id(s) for s in cache.states] == ids
    assert all(torch.equal(s, b[[2, 2, 0]]) for s, b in zip(cache.states, before, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=50, temperature=1.5),
        dict(num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True),
    ],
    ids=["greedy", "sampling", "beam"],
)
def test_generate_static_equals_eager(model, kwargs):
    ids = _tokens(2, 9, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    outs = {}
    for mode in ("eager", "static"):
        model.decode_mode = mode
        torch.manual_seed(11)
        outs[mode] = model.generate(ids, attention_mask=mask, **kwargs, **GEN)
    assert torch.equal(outs["static"].sequences, outs["eager"].sequences)
    assert torch.equal(torch.stack(outs["static"].logits), torch.stack(outs["eager"].logits))
    assert len(model.decode_graphs) == 1


def test_graph_mode_needs_cuda(model):
    model.decode_mode = "graph"
    with torch.no_grad():
        cache = getattr(model(_tokens(1, 4), use_cache=True), CACHE_FIELD)
        with pytest.raises(ValueError, match="decode_mode='graph' needs CUDA tensors; got input_ids on cpu"):
            model(_tokens(1, 1), cache=cache, use_cache=True)
    model.decode_mode = "fast"
    with pytest.raises(ValueError, match="decode_mode='fast'; expected one of"):
        with torch.no_grad():
            model(_tokens(1, 1), cache=cache, use_cache=True)


def test_moving_the_model_drops_its_graphs(model):
    _decode(model, "static", _tokens(1, 6), 4)
    assert model.decode_graphs
    model.to(torch.float64)
    assert not model.decode_graphs
