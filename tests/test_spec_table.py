"""The spec table: each NAME of ``--spec megatron_tnllm.specs NAME`` has one row, which the block specs, the
converter and the FLOP counter all read."""

import math
from types import SimpleNamespace

import pytest

from megatron_tnllm import specs
from megatron_tnllm.configs import PRESETS
from megatron_tnllm.convert.megatron_format import megatron_args
from megatron_tnllm.flops import tnl_training_flops
from megatron_tnllm.spec_table import SPEC_MODULE, SPECS, spec_for, spec_info, spec_of_args

TINY = PRESETS["tnl-tiny"]


def test_every_row_has_its_callable_and_every_callable_its_row():
    callables = {n for n in specs.__all__ if n not in ("hybrid_block_spec", "tnl_block_spec", "tnl_layer_spec")}
    assert callables == {n for n, s in SPECS.items() if s.module == SPEC_MODULE}
    for name in callables:
        assert getattr(specs, name).__name__ == name


@pytest.mark.parametrize("name", ["tnl_tiny", "tnl", "tnl_scaled_embedding"])
def test_block_spec_builds_the_rows_lrpe_layers_and_embedding_scale(name, monkeypatch):
    monkeypatch.setattr(specs, "get_num_layers_to_build", lambda config, vp_stage: config.num_layers)  # no PP state
    config = TINY.to_transformer_config(use_cpu_initialization=True)
    block = getattr(specs, name)(SimpleNamespace(transformer=config))
    layer = block.layer_specs[0]
    info = spec_info(name)
    assert layer.submodules.self_attention.params["lrpe_layers"] == info.lrpe_layers == (0,)
    assert layer.params["embedding_scale"] == (math.sqrt(256) if name != "tnl" else 1.0)


@pytest.mark.parametrize("name", ["tnl_hybrid", "tnl_hybrid_scaled_embedding"])
def test_shape_free_hybrid_specs_put_softmax_on_every_8th_layer(name, monkeypatch):
    monkeypatch.setattr(specs, "get_num_layers_to_build", lambda config, vp_stage: config.num_layers)  # no PP state
    config = TINY.replace(num_layers=16).to_transformer_config(use_cpu_initialization=True)
    block = getattr(specs, name)(SimpleNamespace(transformer=config))
    mixers = {layer.submodules.self_attention.params["softmax_layers"] for layer in block.layer_specs}
    assert mixers == {frozenset({7, 15})}
    scales = {layer.params["embedding_scale"] for layer in block.layer_specs}
    assert scales == {math.sqrt(256) if name.endswith("scaled_embedding") else 1.0}


def test_preset_rows_are_the_presets():
    for preset in PRESETS.values():
        row = spec_info(preset.spec_name)
        assert (row.preset, row.lrpe_layers, row.scale_embedding, row.softmax_layers) == (
            preset,
            preset.lrpe_layers,
            preset.scale_embedding,
            (),
        )
        assert row.embedding_scale(preset.hidden_size) == preset.embedding_scale


def test_spec_for_prefers_the_preset_then_the_shape_free_spec():
    assert spec_for(TINY.replace(name="custom", vocab_size=77)).name == "tnl_tiny"
    wider = TINY.replace(name="custom", glu_size=512)
    assert spec_for(wider).name == "tnl_scaled_embedding"
    assert spec_for(wider.replace(scale_embedding=False)).name == "tnl"
    assert spec_for(wider.replace(lrpe_layers=(0, 1))) is None
    hybrid = wider.replace(num_layers=8, softmax_layers=(7,))  # the last of every 8 layers
    assert spec_for(hybrid).name == "tnl_hybrid_scaled_embedding"
    assert spec_for(hybrid.replace(scale_embedding=False)).name == "tnl_hybrid"
    assert spec_for(hybrid.replace(softmax_layers=(3, 7))) is None  # no spec builds it at a custom shape


def test_spec_of_args_reads_only_this_tables_module():
    assert spec_of_args(["megatron_tnllm.specs", "tnl_1b"]).scale_embedding is True
    assert spec_of_args(["megatron_tnllm.specs", "tnl_7b"]).scale_embedding is False
    assert spec_of_args(["somewhere.else", "tnl_1b"]) is None
    assert spec_of_args(["megatron_tnllm.specs", "nope"]) is None
    assert spec_of_args(None) is None
    with pytest.raises(KeyError, match="unknown spec 'nope'; expected one of tnl_tiny, "):
        spec_info("nope")


def test_converter_records_the_tables_name():
    import torch

    args = megatron_args(
        TINY.replace(glu_size=512, scale_embedding=False), tensor_parallel=1, pipeline_parallel=1,
        padded_vocab=2048, make_vocab_size_divisible_by=1, dtype=torch.float32, tokenizer_model=None,
    )  # fmt: skip
    assert args.spec == ["megatron_tnllm.specs", "tnl"]


def test_flops_count_the_rows_lrpe_layers():
    args = SimpleNamespace(
        num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=704, padded_vocab_size=2048
    )
    tnl_rows = [name for name, info in SPECS.items() if not info.softmax_layers_of(args.num_layers)]
    flops = {name: tnl_training_flops(SimpleNamespace(spec=[SPEC_MODULE, name], **vars(args)), 1) for name in tnl_rows}
    assert flops["tnl_tiny"] == flops["tnl"] == flops["tnl_scaled_embedding"]  # LRPE on layer 0 in each


def test_flops_count_a_hybrids_softmax_layers():
    """tnl-1b-hybrid (softmax attention on layers 7 and 15) = tnl-1b with two TNL layers replaced: per token
    2 x (TNL layer - softmax layer), the softmax layer counting 8 D^2 + SGLU + 2 s D (causal Q K^T and A V)."""
    D, H, G, L, s, V = 2048, 16, 5632, 16, 4096, 64000
    args = dict(num_layers=L, hidden_size=D, num_attention_heads=H, ffn_hidden_size=G, padded_vocab_size=V)
    tnl = tnl_training_flops(SimpleNamespace(spec=[SPEC_MODULE, "tnl_1b"], seq_length=s, **args), 1) / 3
    hybrid = tnl_training_flops(SimpleNamespace(spec=[SPEC_MODULE, "tnl_1b_hybrid"], seq_length=s, **args), 1) / 3
    dh = D // H
    tnl_layer = 10 * D * D + 6 * D * G + H * (64 * 2 * dh + 4 * dh * dh)
    softmax_layer = 8 * D * D + 6 * D * G + 2 * s * D
    assert tnl - hybrid == 2 * (tnl_layer - softmax_layer)
    shape_free = tnl_training_flops(SimpleNamespace(spec=[SPEC_MODULE, "tnl_hybrid"], seq_length=s, **args), 1) / 3
    assert shape_free == hybrid  # every 8th layer of 16: the same two
