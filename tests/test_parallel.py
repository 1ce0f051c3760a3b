"""Parallel layouts (TP, SP, PP, CP) against TP=1: losses and every parameter's gradient, and checkpoints
across layouts.

tnl-tiny (LRPE on layer 0, embeddings scaled by 16) runs on CPU with gloo. The TP=1 reference
saves its weights and its gradients as torch_dist checkpoints; every other layout loads both
(Megatron reshards them), runs the same batch and compares.
"""

import json

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_tnllm.configs import get_preset
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.megatron_utils import (
    assert_step_matches_reference,
    assert_tp_sharded_params_saved_sharded,
    fixed_batch,
    load_checkpoint,
    loss_of,
    model_at_layout,
    save_checkpoint,
    tp1_reference,
)

PRESET = get_preset("tnl-tiny")


def tiny(**overrides):
    return build_model(PRESET, use_cpu_initialization=True, **overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tp1_reference(PRESET, tmp_path_factory.mktemp("tp1"))


def _layout_worker(rank, world, reference, tp, pp, cp, sequence_parallel):
    model = model_at_layout(PRESET, reference, tp=tp, pp=pp, cp=cp, sequence_parallel=sequence_parallel)
    assert len(model.decoder.layers) == PRESET.num_layers // pp
    assert_step_matches_reference(model, PRESET, reference)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_tp1(reference, sequence_parallel):
    run_distributed(_layout_worker, 2, reference, 2, 1, 1, sequence_parallel)


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2_sp_pp2"])
def test_pipeline_parallel_matches_tp1(reference, tp):
    """PP=2 by hand; with tp = 2 also TP=2 + SP inside each stage (4 ranks), the layout family of the 7B+
    launchers."""
    run_distributed(_layout_worker, 2 * tp, reference, tp, 2, 1, tp > 1)


@pytest.mark.parametrize("tp", [1, 2], ids=["cp2", "cp2_tp2_sp"])
def test_context_parallel_matches_tp1(reference, tp):
    """CP=2 (zig-zag sequence shares), with tp = 2 also TP=2 + SP: the summed token losses and the CP-summed
    gradients equal TP=1's."""
    run_distributed(_layout_worker, 2 * tp, reference, tp, 1, 2, tp > 1)


def _save_at_tp2(rank, world, out):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(7)
    model = tiny()
    save_checkpoint(model, out / "tp2")
    loss = loss_of(model, fixed_batch(PRESET.vocab_size))
    if rank == 0:
        (out / "tp2_loss.json").write_text(json.dumps(loss.item()))


def _load_at_tp1(rank, world, out):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(8)
    model = tiny()
    load_checkpoint(model, out / "tp2")
    loss = loss_of(model, fixed_batch(PRESET.vocab_size)).item()
    expected = json.loads((out / "tp2_loss.json").read_text())
    assert abs(loss - expected) <= 1e-6 * abs(expected), f"TP=2 checkpoint at TP=1: loss {loss} vs {expected}"


def test_tp2_checkpoint_loads_at_tp1(tmp_path):
    run_distributed(_save_at_tp2, 2, tmp_path)
    run_distributed(_load_at_tp1, 1, tmp_path)


def _sharding_worker(rank, world):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model = tiny()
    sharded = model.sharded_state_dict()
    checked = assert_tp_sharded_params_saved_sharded(model, sharded)
    # Per layer qkvu, out, fc1, fc2; theta on layer 0; the (tied) embedding.
    assert checked == 4 * PRESET.num_layers + 2, checked
    D = PRESET.hidden_size
    query = next(v for k, v in sharded.items() if k.endswith("layers.0.self_attention.qkvu_proj.weight")).build()
    keys = {st.key: st.global_shape for st in query}
    prefix = "decoder.layers.0.self_attention.qkvu_proj.weight"
    assert keys == {f"{prefix}.{s}": (D, D) for s in ("query", "key", "value", "gate")}, keys
    # The check must catch a TP-sharded parameter saved as replicated: Megatron's default
    # MegatronModule.sharded_state_dict does exactly that to theta.
    mixer = model.decoder.layers[0].self_attention
    with pytest.raises(AssertionError, match="lrpe_theta.*replicated"):
        assert_tp_sharded_params_saved_sharded(mixer, MegatronModule.sharded_state_dict(mixer, "x."))


def test_tp_sharded_parameters_are_saved_sharded():
    run_distributed(_sharding_worker, 2)
