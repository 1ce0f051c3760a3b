"""Hybrid TNL (softmax attention on layers 1 and 3 of tnl-tiny) in Megatron-Core: the softmax layer against
an explicit softmax, the placement by global layer number, and TP + SP, PP, CP against TP=1 on the loss and
every gradient, through torch_dist checkpoints (CPU, gloo)."""

import importlib
import json
import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_tnllm import models
from megatron_tnllm.configs import HYBRID_PRESETS, get_preset, softmax_every
from megatron_tnllm.hybrid import SOFTMAX_ATTENTION
from megatron_tnllm.layers.softmax_attention import SoftmaxAttention
from megatron_tnllm.layers.token_mixer import TokenMixer
from tests.distributed import run_distributed
from tests.megatron_utils import (
    BATCH,
    SEQ,
    all_reduce_tied_embedding_grads,
    assert_tp_sharded_params_saved_sharded,
    fixed_batch,
    load_checkpoint,
    loss_of,
    save_reference,
)
from tests.testing import rel_err

PRESET = get_preset("tnl-tiny-hybrid")
GRAD_TOL = 1e-5


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


def _reference_worker(rank, world, out):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model = hybrid()
    assert _mixers(model) == {0: TokenMixer, 1: SoftmaxAttention, 2: TokenMixer, 3: SoftmaxAttention}
    save_reference(model, PRESET.vocab_size, out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid_tp1")
    run_distributed(_reference_worker, 1, out)
    return out


def _check(model, reference, layout, loss: float | None, **overrides) -> None:
    """Every gradient (and, where this rank has it, the loss) against TP=1's."""
    expected = hybrid(**overrides)
    load_checkpoint(expected, reference / "grads")
    worst = 0.0
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        err = rel_err(p.grad, e.data)
        assert err <= GRAD_TOL, f"{layout}: gradient of {name} off by {err:.2e} (relative)"
        worst = max(worst, err)
    if loss is not None:
        ref_loss = json.loads((reference / "loss.json").read_text())
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), f"{layout}: loss {loss} vs TP=1 {ref_loss}"
        print(f"\n{layout}: loss {loss:.6f} (TP=1 {ref_loss:.6f}); max gradient rel err {worst:.1e}")


def _tp_worker(rank, world, reference):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(1)  # a different init; the checkpoint overwrites it
    model = hybrid(sequence_parallel=True)
    load_checkpoint(model, reference / "weights")
    loss = loss_of(model, fixed_batch(PRESET.vocab_size))
    loss.backward()
    _check(model, reference, "hybrid TP=2 + SP", loss.item(), sequence_parallel=True)


def test_tensor_sequence_parallel_matches_tp1(reference):
    run_distributed(_tp_worker, 2, reference)


def _pp_worker(rank, world, reference):
    """PP=2 by hand (forward on stage 0, send, loss on stage 1, gradient back); each stage holds a softmax layer."""
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    model = hybrid()
    first = parallel_state.is_pipeline_first_stage()
    assert _mixers(model) == ({0: TokenMixer, 1: SoftmaxAttention} if first else {2: TokenMixer, 3: SoftmaxAttention})
    load_checkpoint(model, reference / "weights")
    batch = fixed_batch(PRESET.vocab_size)
    shape = (SEQ, BATCH, PRESET.hidden_size)
    loss = None
    if first:
        hidden = model(batch[0], batch[1], None)
        dist.send(hidden.detach().contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
        grad = torch.empty(shape)
        dist.recv(grad, parallel_state.get_pipeline_model_parallel_next_rank())
        hidden.backward(grad)
    else:
        hidden = torch.empty(shape)
        dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
        hidden.requires_grad_()
        model.set_input_tensor(hidden)
        loss = loss_of(model, batch)
        loss.backward()
        dist.send(hidden.grad, parallel_state.get_pipeline_model_parallel_prev_rank())
    all_reduce_tied_embedding_grads(model)
    _check(model, reference, "hybrid PP=2", None if loss is None else loss.item())


def test_pipeline_parallel_matches_tp1(reference):
    run_distributed(_pp_worker, 2, reference)


def _cp_worker(rank, world, reference, tp):
    """CP=2 (with tp = 2 also TP=2 + SP, one head per rank in attention): zig-zag sequence shares; the summed
    token losses and CP-summed gradients equal TP=1's."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=2)
    cp_group = parallel_state.get_context_parallel_group()
    model = hybrid(sequence_parallel=tp > 1)
    load_checkpoint(model, reference / "weights")
    ids, positions, labels = fixed_batch(PRESET.vocab_size)
    local = get_batch_on_this_cp_rank(
        {"tokens": ids, "position_ids": positions, "labels": labels, "cu_seqlens": None}, False, cp_group
    )
    per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"]).float()
    loss = per_token.sum() / labels.numel()  # this rank's share of the mean over the whole batch
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=cp_group)  # Megatron's DDP reduces over data x context parallel ranks
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    layout = "hybrid CP=2" if tp == 1 else f"hybrid CP=2 x TP={tp} + SP"
    _check(model, reference, layout, total.item(), sequence_parallel=tp > 1)


@pytest.mark.parametrize("tp", [1, 2], ids=["cp2", "cp2_tp2_sp"])
def test_context_parallel_matches_tp1(reference, tp):
    run_distributed(_cp_worker, 2 * tp, reference, tp)


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
