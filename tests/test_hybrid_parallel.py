"""Hybrid TNL (softmax attention on layers 1 and 3 of tnl-tiny) in Megatron-Core: the softmax layer against
an explicit softmax, the placement by global layer number, and TP + SP, PP, CP against TP=1 on the loss and
every gradient, through torch_dist checkpoints (CPU, gloo)."""

import importlib
import math

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_tnllm import models
from megatron_tnllm.configs import HYBRID_PRESETS, get_preset, softmax_every
from megatron_tnllm.hybrid import SOFTMAX_ATTENTION
from megatron_tnllm.layers.softmax_attention import SoftmaxAttention
from megatron_tnllm.layers.token_mixer import TokenMixer
from tests.distributed import run_distributed
from tests.megatron_utils import (
    assert_step_matches_reference,
    assert_tp_sharded_params_saved_sharded,
    model_at_layout,
    tp1_reference,
)
from tests.testing import rel_err

PRESET = get_preset("tnl-tiny-hybrid")


def hybrid(**overrides):
    return models.build_model(PRESET, use_cpu_initialization=True, **overrides)


def _mixers(model) -> dict[int, type]:
    return {layer.layer_number - 1: type(layer.self_attention) for layer in model.decoder.layers}


def test_placement_rule_and_hybrid_presets():
    assert softmax_every(16, 8) == (7, 15) and softmax_every(30, 8) == (7, 15, 23) and softmax_every(4, 2) == (1, 3)
    with pytest.raises(ValueError, match="every=1"):
        softmax_every(8, 1)
    assert get_preset("tnl_1b_hybrid").softmax_layers == (7, 15) and get_preset("tnl-1b").softmax_layers == ()
    one_b, hybrid_1b = get_preset("tnl-1b"), get_preset("tnl-1b-hybrid")
    D = one_b.hidden_size
    assert one_b.num_parameters() - hybrid_1b.num_parameters() == 2 * D * D  # no gate projection on 2 layers
    with pytest.raises(ValueError, match=r"layers \[0\] are in both lrpe_layers and softmax_layers"):
        PRESET.replace(softmax_layers=(0, 1))
    for preset in HYBRID_PRESETS.values():  # the --spec MODULE NAME of every hybrid preset exists
        module, name = preset.to_megatron_args()[-2:]
        assert getattr(importlib.import_module(module), name).__name__ == name


def _explicit_softmax(q, k, v, segments):
    """q, k, v [b, h, s, d]: softmax(q k^T / sqrt(d)) v with a causal mask inside each segment id of [s]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    pos = torch.arange(q.shape[2])
    allowed = (pos[:, None] >= pos[None, :]) & (segments[:, None] == segments[None, :])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _layer_worker(rank, world):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    config = PRESET.to_transformer_config(use_cpu_initialization=True)
    layer = SOFTMAX_ATTENTION(config=config, layer_number=2)
    x = torch.randn(12, 2, PRESET.hidden_size, dtype=torch.float64)
    layer.double()
    out, bias = layer(x)
    assert bias is None
    h, d = PRESET.num_heads, PRESET.head_dim
    q, k, v = (x @ layer.qkv_proj.weight.T).view(12, 2, 3, h, d).permute(2, 1, 3, 0, 4)
    for segments, packed in [(torch.zeros(12), None), (torch.tensor([0] * 5 + [1] * 7), [0, 5, 12])]:
        if packed is not None:
            cu = torch.tensor(packed, dtype=torch.int32)
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
            out, _ = layer(x, packed_seq_params=params)
        o = _explicit_softmax(q, k, v, segments)
        expected = o.permute(2, 0, 1, 3).reshape(12, 2, -1) @ layer.out_proj.weight.T
        err = rel_err(out, expected)
        assert err < 1e-12, f"softmax attention (packed={packed}) off the explicit softmax by {err:.1e}"


def test_softmax_attention_equals_explicit_softmax():
    """The layer (fp64) is softmax(q k^T / sqrt(d)) v, causal, per packed segment, projected."""
    run_distributed(_layer_worker, 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tp1_reference(PRESET, tmp_path_factory.mktemp("hybrid_tp1"))


def _layout_worker(rank, world, reference, tp, pp, cp):
    model = model_at_layout(PRESET, reference, tp=tp, pp=pp, cp=cp, sequence_parallel=tp > 1)
    placed = {0: TokenMixer, 1: SoftmaxAttention, 2: TokenMixer, 3: SoftmaxAttention}
    if pp > 1:  # each stage holds a softmax layer
        first = parallel_state.is_pipeline_first_stage()
        placed = {i: m for i, m in placed.items() if (i < 2) == first}
    assert _mixers(model) == placed, _mixers(model)
    assert_step_matches_reference(model, PRESET, reference)


def test_tensor_sequence_parallel_matches_tp1(reference):
    run_distributed(_layout_worker, 2, reference, 2, 1, 1)


def test_pipeline_parallel_matches_tp1(reference):
    """PP=2 by hand (forward on stage 0, send, loss on stage 1, gradient back)."""
    run_distributed(_layout_worker, 2, reference, 1, 2, 1)


@pytest.mark.parametrize("tp", [1, 2], ids=["cp2", "cp2_tp2_sp"])
def test_context_parallel_matches_tp1(reference, tp):
    """CP=2 (with tp = 2 also TP=2 + SP, one head per rank in attention): zig-zag sequence shares; the summed
    token losses and CP-summed gradients equal TP=1's."""
    run_distributed(_layout_worker, 2 * tp, reference, tp, 1, 2)


def _vpp_placement_worker(rank, world):
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    chunks = [_mixers(hybrid(vp_stage=v)) for v in range(2)]
    expected = [{0: TokenMixer}, {2: TokenMixer}] if rank == 0 else [{1: SoftmaxAttention}, {3: SoftmaxAttention}]
    assert chunks == expected, chunks


def test_virtual_pipeline_chunks_build_their_own_layers():
    """PP=2 x VPP=2: rank 0 builds global layers 0 and 2 (TNL), rank 1 layers 1 and 3 (softmax)."""
    run_distributed(_vpp_placement_worker, 2)


def _sharding_worker(rank, world):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model = hybrid()
    sharded = model.sharded_state_dict()
    # Per layer qkv(u), out, fc1, fc2; theta on layer 0; the (tied) embedding.
    assert assert_tp_sharded_params_saved_sharded(model, sharded) == 4 * PRESET.num_layers + 2
    D = PRESET.hidden_size
    qkv = next(v for k, v in sharded.items() if k.endswith("layers.1.self_attention.qkv_proj.weight")).build()
    prefix = "decoder.layers.1.self_attention.qkv_proj.weight"
    assert {st.key: st.global_shape for st in qkv} == {f"{prefix}.{s}": (D, D) for s in ("query", "key", "value")}


def test_softmax_qkv_saved_as_tp_invariant_tensors():
    run_distributed(_sharding_worker, 2)
