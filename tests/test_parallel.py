"""Parallel layouts (TP, SP, PP, CP) against TP=1: losses and every parameter's gradient, and checkpoints
across layouts.

tnl-tiny (LRPE on layer 0, embeddings scaled by 16) runs on CPU with gloo. The TP=1 reference
saves its weights and its gradients as torch_dist checkpoints; every other layout loads both
(Megatron reshards them), runs the same batch and compares.
"""

import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_tnllm.configs import get_preset
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.megatron_utils import (
    BATCH,
    SEQ,
    all_reduce_tied_embedding_grads,
    assert_tp_sharded_params_saved_sharded,
    fixed_batch,
    load_checkpoint,
    loss_of,
    save_checkpoint,
    save_reference,
)
from tests.testing import rel_err

PRESET = get_preset("tnl-tiny")
GRAD_TOL = 1e-5


def tiny(**overrides):
    return build_model(PRESET, use_cpu_initialization=True, **overrides)


def _reference_worker(rank, world, out):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model = tiny()
    save_reference(model, PRESET.vocab_size, out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    run_distributed(_reference_worker, 1, out)
    return out


def _compare_grads(model, reference, layout, **overrides) -> tuple[float, int]:
    """Largest relative gradient error over all parameters against the TP=1 gradients."""
    expected = tiny(**overrides)
    load_checkpoint(expected, reference / "grads")
    worst, count = 0.0, 0
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        err = rel_err(p.grad, e.data)
        assert err <= GRAD_TOL, f"{layout}: gradient of {name} off by {err:.2e} (relative)"
        worst, count = max(worst, err), count + 1
    return worst, count


def _report(reference, layout, loss, worst, count):
    ref_loss = json.loads((reference / "loss.json").read_text())
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    assert loss_err <= 1e-6, f"{layout}: loss {loss} vs TP=1 {ref_loss}"
    if dist.get_rank() == 0:
        print(
            f"\n{layout}: loss {loss:.6f} (TP=1 {ref_loss:.6f}, rel {loss_err:.1e}); "
            f"max gradient rel err {worst:.1e} over {count} parameter tensors per rank"
        )


def _tp_worker(rank, world, reference, sequence_parallel):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(1)  # a different init; the checkpoint overwrites it
    model = tiny(sequence_parallel=sequence_parallel)
    load_checkpoint(model, reference / "weights")
    loss = loss_of(model, fixed_batch(PRESET.vocab_size))
    loss.backward()
    layout = f"TP=2{' + SP' if sequence_parallel else ''}"
    worst, count = _compare_grads(model, reference, layout, sequence_parallel=sequence_parallel)
    _report(reference, layout, loss.item(), worst, count)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_tp1(reference, sequence_parallel):
    run_distributed(_tp_worker, 2, reference, sequence_parallel)


def _pp_worker(rank, world, reference, tp):
    """PP=2 by hand (one micro-batch: forward on stage 0, send, loss on stage 1, gradient back); with tp = 2
    also TP=2 + SP inside each stage (4 ranks), the layout family of the 7B+ launchers."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=2)
    model = tiny(sequence_parallel=tp > 1)
    assert len(model.decoder.layers) == PRESET.num_layers // 2
    load_checkpoint(model, reference / "weights")
    batch = fixed_batch(PRESET.vocab_size)
    shape = (SEQ // tp, BATCH, PRESET.hidden_size)  # sequence-parallel activations cross stages split
    if parallel_state.is_pipeline_first_stage():
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
    layout = "PP=2" if tp == 1 else f"TP={tp} + SP x PP=2"
    worst, count = _compare_grads(model, reference, layout, sequence_parallel=tp > 1)
    if not parallel_state.is_pipeline_first_stage():
        ref_loss = json.loads((reference / "loss.json").read_text())
        assert abs(loss.item() - ref_loss) <= 1e-6 * abs(ref_loss), f"{layout} loss {loss.item()} vs TP=1 {ref_loss}"
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            print(
                f"\n{layout} (manual stage split): loss {loss.item():.6f} (TP=1 {ref_loss:.6f}); "
                f"max gradient rel err on the last stage {worst:.1e} over {count} tensors"
            )


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2_sp_pp2"])
def test_pipeline_parallel_matches_tp1(reference, tp):
    run_distributed(_pp_worker, 2 * tp, reference, tp)


def _cp_worker(rank, world, reference, tp):
    """CP=2: each rank holds a zig-zag quarter pair of every sequence (Megatron's split); the summed token
    losses and the CP-summed gradients must equal TP=1's."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=2)
    cp_group = parallel_state.get_context_parallel_group()
    model = tiny(sequence_parallel=tp > 1)
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
    layout = "CP=2" if tp == 1 else f"CP=2 x TP={tp} + SP"
    worst, count = _compare_grads(model, reference, layout, sequence_parallel=tp > 1)
    _report(reference, layout, total.item(), worst, count)


@pytest.mark.parametrize("tp", [1, 2], ids=["cp2", "cp2_tp2_sp"])
def test_context_parallel_matches_tp1(reference, tp):
    run_distributed(_cp_worker, 2 * tp, reference, tp)


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
