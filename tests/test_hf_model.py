"""The Hugging Face model: OpenNLPLab layout, dtypes, and generation with the constant-size state cache.

Ground truth for every generation mode is the same generate() call with ``use_cache=False``, which recomputes
the whole sequence at every step (no state is carried, reordered or padded).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tnllm.hf import TransnormerCache, TransnormerConfig, TransnormerForCausalLM
from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD
from megatron_tnllm.ops.lrpe import lrpe_theta_init
from tests.hf_helpers import GEN, TINY, incremental_forward, tiny_hybrid_model, tiny_model
from tests.hf_helpers import prompts as _prompts
from tests.testing import rel_err


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module", params=["tnl", "hybrid"])
def generating(request, model):
    """The models whose cached generation is checked against recomputation: pure TNL (a constant-size state per
    layer) and the hybrid (softmax attention on layers 1 and 3: a KV cache there)."""
    return model if request.param == "tnl" else tiny_hybrid_model(seed=1)


def test_released_layout_names_and_shapes(model):
    D, G, H, V = TINY.hidden_size, TINY.glu_size, TINY.num_heads, TINY.vocab_size
    expected = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D)}
    for i in range(TINY.num_layers):
        p = f"model.layers.{i}."
        expected.update({
            f"{p}token_mixer.qkvu_proj.weight": (4 * D, D), f"{p}token_mixer.out_proj.weight": (D, D),
            f"{p}channel_mixer.l1.weight": (G, D), f"{p}channel_mixer.l2.weight": (G, D),
            f"{p}channel_mixer.l3.weight": (D, G),
        })  # fmt: skip
    expected["model.layers.0.token_mixer.lrpe.theta"] = (H, 1, D // H)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].token_mixer.lrpe.theta, lrpe_theta_init(H, D // H))
    assert model.model.embed_tokens.weight[0].abs().max() == 0  # the pad row


def test_config_reads_released_7b_json():
    released = {  # OpenNLPLab/TransNormerLLM-7B config.json (docs/model.md §4)
        "architectures": ["TransnormerForCausalLM"], "model_type": "transnormer", "vocab_size": 64000,
        "decoder_embed_dim": 4096, "hidden_dim": 4096, "decoder_layers": 30, "decoder_attention_heads": 32,
        "glu_dim": 11008, "no_scale_embedding": True, "linear_use_lrpe_list": [1] + [0] * 29,
        "linear_act_fun": "swish", "norm_type": "simplermsnorm", "bias": False, "add_bos_token": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "init_std": 0.02, "use_cache": True,
        "torch_dtype": "bfloat16", "model_max_length": 8192,
    }  # fmt: skip
    config = TransnormerConfig.from_dict(released)
    assert (config.decoder_layers, config.glu_dim, config.no_scale_embedding, config.tie_word_embeddings) == (
        30, 11008, True, True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="hidden_dim=2048 is not supported; expected decoder_embed_dim"):
        TransnormerForCausalLM(TransnormerConfig.from_dict({**released, "hidden_dim": 2048}))


def test_loads_released_bin_layout(tmp_path, model):
    """pytorch_model.bin with lm_head and Metaseq's decoder.version, config.json as on the hub."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.version"] = torch.tensor([3.0])
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = model.config.to_dict()
    config.update(torch_dtype="float32", transformers_version="4.32.0", linear_act_fun="swish")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = TransnormerForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _prompts([20])[0][None]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loads_in_each_dtype(tmp_path, model, dtype):
    model.save_pretrained(tmp_path)
    loaded = TransnormerForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    tokens = _prompts([24])[0][None]
    with torch.no_grad():
        out = loaded(tokens, use_cache=True)
        reference = model(tokens).logits
    assert out.logits.dtype == dtype and rel_err(out.logits, reference) <= 3e-2
    assert all(s.dtype == torch.float32 for s in getattr(out, CACHE_FIELD).states)
    generated = loaded.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 28)


def test_loss_is_shifted_cross_entropy(model):
    tokens = _prompts([16])[0][None]
    labels = tokens.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(tokens, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_incremental_forward_equals_full_forward(model):
    logits, full, cache = incremental_forward(model, _prompts([40])[0][None])
    assert cache.seen_tokens == 40 and cache.positions.tolist() == [40]
    assert rel_err(logits, full) <= 1e-5


def test_cache_is_constant_size(model):
    sizes = []
    for length in (8, 300):
        with torch.no_grad():
            cache = getattr(model(_prompts([length])[0][None], use_cache=True), CACHE_FIELD)
        assert isinstance(cache, TransnormerCache)
        dh = TINY.head_dim
        assert [tuple(s.shape) for s in cache.states] == [(1, TINY.num_heads, 2 * dh, dh)] + [
            (1, TINY.num_heads, dh, dh)
        ] * (TINY.num_layers - 1)
        sizes.append(sum(s.numel() * s.element_size() for s in cache.states))
    assert sizes[0] == sizes[1]


def _generated(out, prompt_len):
    return out.sequences[:, prompt_len:]


def test_greedy_with_cache_equals_recomputation(generating):
    prompt = torch.stack(_prompts([11, 11], seed=2))
    cached = generating.generate(prompt, do_sample=False, **GEN)
    recomputed = generating.generate(prompt, do_sample=False, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert rel_err(torch.stack(cached.logits), torch.stack(recomputed.logits)) <= 1e-5


def test_sampling_with_cache_equals_recomputation(generating):
    prompt = torch.stack(_prompts([9, 9, 9], seed=3))
    torch.manual_seed(7)
    cached = generating.generate(prompt, do_sample=True, top_k=50, temperature=1.5, **GEN)
    torch.manual_seed(7)
    recomputed = generating.generate(prompt, do_sample=True, top_k=50, temperature=1.5, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, recomputed.sequences)


def test_beam_search_reorders_the_state_and_keys(generating):
    prompt = torch.stack(_prompts([10, 10], seed=4))
    beams = dict(num_beams=4, num_return_sequences=2, do_sample=False, output_scores=True)
    cached = generating.generate(prompt, **beams, **GEN)
    recomputed = generating.generate(prompt, use_cache=False, **beams, **GEN)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.allclose(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5)
    # Beams really do swap rows here, so an un-reordered state (or KV cache) would have produced different text.
    assert cached.beam_indices[:, : GEN["max_new_tokens"]].ne(cached.beam_indices[:, :1]).any()


def test_left_padded_batch_equals_each_prompt_alone(generating):
    prompts = _prompts([3, 9, 14], seed=5)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    batched = generating.generate(ids, attention_mask=mask, do_sample=False, **GEN)
    for row, p in enumerate(prompts):
        alone = generating.generate(p[None], do_sample=False, **GEN)
        assert torch.equal(_generated(batched, width)[row], _generated(alone, len(p))[0])
        step_logits = torch.stack([step[row] for step in batched.logits])
        assert rel_err(step_logits, torch.stack([step[0] for step in alone.logits])) <= 1e-5
    # and with beam search on the padded batch
    beams = dict(num_beams=3, do_sample=False)
    padded = generating.generate(ids, attention_mask=mask, use_cache=True, **beams, **GEN)
    recomputed = generating.generate(ids, attention_mask=mask, use_cache=False, **beams, **GEN)
    assert torch.equal(padded.sequences, recomputed.sequences)
