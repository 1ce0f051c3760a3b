"""The Hugging Face hybrid model (softmax attention on layers 1 and 3 of a tiny TNL): layout, its cache against
a full forward, and its logits against Megatron's for the same weights. Its cached generation against
recomputation (greedy, sampling, beam search, left padding) is in tests/test_hf_model.py, for both models.
"""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core import parallel_state

from megatron_tnllm.hf import TransnormerForCausalLM
from megatron_tnllm.hf.export import standalone_modeling_source
from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD, NormLinearAttention, SoftmaxAttention
from tests.distributed import run_distributed
from tests.hf_helpers import (
    HYBRID,
    hybrid_config,
    incremental_forward,
    tiny_hybrid_model,
)
from tests.hf_helpers import prompts as _prompts
from tests.testing import rel_err

SOFTMAX = list(HYBRID.softmax_layers)  # [1, 3]


@pytest.fixture(scope="module")
def model():
    return tiny_hybrid_model(seed=1)


def test_layout_and_config_round_trip(tmp_path, model):
    D = HYBRID.hidden_size
    mixers = [type(layer.token_mixer) for layer in model.model.layers]
    assert mixers == [NormLinearAttention, SoftmaxAttention, NormLinearAttention, SoftmaxAttention]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".token_mixer." in k}
    assert shapes["model.layers.1.token_mixer.qkv_proj.weight"] == (3 * D, D)
    assert shapes["model.layers.1.token_mixer.out_proj.weight"] == (D, D)
    assert "model.layers.1.token_mixer.qkvu_proj.weight" not in shapes
    assert sum(p.numel() for p in model.parameters()) == HYBRID.num_parameters()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["softmax_attention_layers"] == SOFTMAX
    loaded = TransnormerForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _prompts([20])[0][None]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_bad_softmax_layers_are_rejected():
    config = hybrid_config()
    config.softmax_attention_layers = [0]
    with pytest.raises(ValueError, match=r"softmax_attention_layers \[0\] also use LRPE"):
        TransnormerForCausalLM(config)
    config.softmax_attention_layers = [4]
    with pytest.raises(ValueError, match=r"softmax_attention_layers \[4\] outside 0..3"):
        TransnormerForCausalLM(config)


def test_export_source_builds_the_hybrid(tmp_path, model):
    """The self-contained modeling file (what exports carry) builds and runs the hybrid the same way."""
    namespace = {"__name__": "exported_modeling"}
    source = standalone_modeling_source().replace(
        "from .configuration_transnormer import", "from megatron_tnllm.hf.configuration_transnormer import"
    )
    exec(compile(source, "modeling_transnormer.py", "exec"), namespace)
    exported = namespace["TransnormerForCausalLM"](model.config).eval()
    exported.load_state_dict(model.state_dict())
    tokens = _prompts([24])[0][None]
    with torch.no_grad():
        assert rel_err(exported(tokens).logits, model(tokens).logits) < 1e-6


def test_incremental_forward_equals_full_forward(model):
    logits, full, cache = incremental_forward(model, _prompts([40])[0][None])
    assert cache.seen_tokens == 40
    assert [None if k is None else tuple(k.shape) for k in cache.keys] == [None, (1, 4, 40, 64), None, (1, 4, 40, 64)]
    assert [s is None for s in cache.states] == [False, True, False, True]
    assert rel_err(logits, full) < 1e-5


def test_static_decoding_refuses_a_hybrid(model):
    tokens = _prompts([6])[0][None]
    with torch.no_grad():
        cache = getattr(model(tokens, use_cache=True), CACHE_FIELD)
        model.decode_mode = "static"
        try:
            with pytest.raises(ValueError, match=r"decode_mode='static' needs a pure TNL model; layers \[1, 3\]"):
                model(tokens[:, :1], cache=cache, use_cache=True)
        finally:
            model.decode_mode = "auto"


def _megatron_logits_worker(rank, world, out):
    """Builds the hybrid tnl-tiny in Megatron (TP=1), saves its weights under HF names and its logits."""
    from tests.test_hybrid_parallel import hybrid  # the Megatron hybrid builder (imports Megatron)

    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model = hybrid(vocab_size=HYBRID.vocab_size)
    ids = torch.stack(_prompts([32, 32], seed=6))
    positions = torch.arange(32).expand(2, -1)
    with torch.no_grad():
        logits = model(ids, positions, None)
    embedding = model.embedding.word_embeddings.weight
    hf = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}
    for i, layer in enumerate(model.decoder.layers):
        p, mixer = f"model.layers.{i}.", layer.self_attention
        for name, param in mixer.named_parameters():  # qkvu_proj / qkv_proj / out_proj .weight, lrpe_theta
            hf[p + "token_mixer." + name.replace("lrpe_theta", "lrpe.theta")] = param
        l1, l2 = layer.mlp.linear_fc1.weight.chunk(2)
        hf.update({f"{p}channel_mixer.l1.weight": l1, f"{p}channel_mixer.l2.weight": l2})
        hf[f"{p}channel_mixer.l3.weight"] = layer.mlp.linear_fc2.weight
    torch.save({"weights": {k: v.detach().clone() for k, v in hf.items()}, "ids": ids, "logits": logits}, out)


def test_hf_logits_equal_megatron(tmp_path):
    run_distributed(_megatron_logits_worker, 1, tmp_path / "megatron.pt")
    saved = torch.load(tmp_path / "megatron.pt")
    model = TransnormerForCausalLM(hybrid_config()).eval()
    model.load_state_dict(saved["weights"])
    with torch.no_grad():
        logits = model(saved["ids"]).logits
    assert logits.shape == saved["logits"].shape == (2, 32, HYBRID.vocab_size)
    err = rel_err(logits, saved["logits"])
    assert err < 1e-5, f"HF logits off Megatron's by {err:.1e}"
