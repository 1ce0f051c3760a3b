"""Helpers for the Megatron tests: a fixed batch, loss and gradients, dist-checkpoint save/load, a parallel
layout against the TP=1 reference, and the checks on sharded state dicts. Everything but
:func:`tp1_reference` runs inside the gloo workers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.testing import rel_err

BATCH, SEQ = 2, 64
GRAD_TOL = 1e-5  # relative error of every parameter's gradient at a parallel layout against TP=1
LOSS_TOL = 1e-6  # relative error of the loss


def fixed_batch(vocab_size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, labels), each [BATCH, SEQ], identical in every process."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]


def loss_of(model, batch) -> torch.Tensor:
    ids, positions, labels = batch
    return model(ids, positions, None, labels=labels).float().mean()


def save_checkpoint(model, path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def load_checkpoint(model, path) -> None:
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))


def load_chunks(chunks, path) -> None:
    """Load a torch_dist checkpoint into all virtual-pipeline model chunks of this rank at once, as pretrain_gpt.py
    does (chunk v under "model{v}"): loads are collective, and a tensor's main replica may sit in another rank's
    other chunk (the tied embedding and output layer)."""
    state = dist_checkpointing.load({f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}, str(path))
    for v, c in enumerate(chunks):
        c.load_state_dict(state[f"model{v}"])


def grads_into_params(model) -> None:
    """Replace every parameter by its gradient, so that a checkpoint of the model stores gradients
    (and dist-checkpointing reshards them like weights)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)


def save_reference(model, vocab_size: int, out) -> None:
    """The TP=1 reference of a parity test: ``out/loss.json``, and the weights and every gradient of ``model`` on
    :func:`fixed_batch` as torch_dist checkpoints (``out/weights``, ``out/grads``) that load at any layout."""
    loss = loss_of(model, fixed_batch(vocab_size))
    loss.backward()
    save_checkpoint(model, out / "weights")
    grads_into_params(model)
    save_checkpoint(model, out / "grads")
    (out / "loss.json").write_text(json.dumps(loss.item()))


def _reference_worker(rank: int, world: int, preset: TNLConfig, out: Path) -> None:
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    save_reference(build_model(preset, use_cpu_initialization=True), preset.vocab_size, out)


def tp1_reference(preset: TNLConfig, out: Path) -> Path:
    """Run ``preset`` at TP=1 in one gloo process and :func:`save_reference` it under ``out``; returns ``out``."""
    run_distributed(_reference_worker, 1, preset, out)
    return out


def model_at_layout(
    preset: TNLConfig, reference: Path, *, tp: int = 1, pp: int = 1, cp: int = 1, sequence_parallel: bool = False
) -> GPTModel:
    """This rank's model of ``preset`` at TP=tp x PP=pp x CP=cp, holding the weights saved by
    :func:`save_reference` under ``reference``."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    torch.manual_seed(1)  # a different init from the reference's; the checkpoint overwrites it
    model = build_model(preset, use_cpu_initialization=True, sequence_parallel=sequence_parallel)
    load_checkpoint(model, reference / "weights")
    return model


def _pipeline_step(model, batch) -> float | None:
    """PP=2 by hand (one micro-batch: forward on stage 0, send, loss on stage 1, gradient back), then the tied
    embedding gradients summed; the loss on the last stage, None on the first."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    shape = (SEQ // tp, BATCH, model.config.hidden_size)  # sequence-parallel activations cross stages split
    loss = None
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
    return None if loss is None else loss.item()


def _context_parallel_step(model, batch) -> float:
    """CP=2: each rank holds a zig-zag quarter pair of every sequence (Megatron's split); returns the summed token
    losses over the CP ranks (the mean over the whole batch), gradients summed over the CP ranks."""
    cp_group = parallel_state.get_context_parallel_group()
    ids, positions, labels = batch
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
    return total.item()


def _layout_name(model) -> str:
    """The parallel layout of this rank's model, e.g. "TP=2 + SP x PP=2" ("TP=1" when there is none)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    parts = [f"TP={tp}{' + SP' if model.config.sequence_parallel else ''}"] if tp > 1 else []
    parts += [f"PP={pp}"] * (pp > 1) + [f"CP={cp}"] * (cp > 1)
    return " x ".join(parts) or "TP=1"


def assert_step_matches_reference(model, preset: TNLConfig, reference: Path) -> None:
    """One forward and backward of :func:`fixed_batch` at the layout of ``model`` (built by
    :func:`model_at_layout`); every parameter's gradient within GRAD_TOL and the loss (on the ranks that
    have it) within LOSS_TOL of the TP=1 reference saved by :func:`save_reference`."""
    batch = fixed_batch(preset.vocab_size)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        loss = _pipeline_step(model, batch)
    elif parallel_state.get_context_parallel_world_size() > 1:
        loss = _context_parallel_step(model, batch)
    else:
        step = loss_of(model, batch)
        step.backward()
        loss = step.item()
    layout = f"{preset.name} {_layout_name(model)}"
    expected = build_model(preset, use_cpu_initialization=True, sequence_parallel=model.config.sequence_parallel)
    load_checkpoint(expected, reference / "grads")
    worst, count = 0.0, 0
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        err = rel_err(p.grad, e.data)
        assert err <= GRAD_TOL, f"{layout}: gradient of {name} off by {err:.2e} (relative)"
        worst, count = max(worst, err), count + 1
    if loss is None:  # a first pipeline stage
        return
    ref_loss = json.loads((reference / "loss.json").read_text())
    assert abs(loss - ref_loss) <= LOSS_TOL * abs(ref_loss), f"{layout}: loss {loss} vs TP=1 {ref_loss}"
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0:
        print(
            f"\n{layout}: loss {loss:.6f} (TP=1 {ref_loss:.6f}); "
            f"max gradient rel err {worst:.1e} over {count} parameter tensors on this rank"
        )


def sharded_tensors(sharded_state_dict: dict) -> list[ShardedTensor]:
    """All ShardedTensors of a sharded state dict, with factories expanded."""
    out = []
    for value in sharded_state_dict.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            out.extend(built if isinstance(built, list) else [built])
        elif isinstance(value, ShardedTensor):
            out.append(value)
    return out


def assert_tp_sharded_params_saved_sharded(model, sharded_state_dict: dict) -> int:
    """Every parameter marked ``tensor_model_parallel`` must be saved as shards of a global tensor
    tp times larger (a parameter saved as replicated would make the checkpoint depend on the TP
    size). Returns the number of parameters checked."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    by_data: dict[int, list[ShardedTensor]] = {}
    for st in sharded_tensors(sharded_state_dict):
        by_data.setdefault(st.data.untyped_storage().data_ptr(), []).append(st)
    checked = 0
    for name, param in model.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            continue
        entries = by_data.get(param.untyped_storage().data_ptr(), [])
        assert entries, f"{name}: TP-sharded parameter missing from the sharded state dict"
        # A parameter may be saved as several pieces (fused sections, swiglu halves); together this
        # rank's pieces must be 1/tp of the global tensors they belong to.
        local = sum(math.prod(st.local_shape) for st in entries)
        glob = sum(math.prod(shape) for shape in {st.key: st.global_shape for st in entries}.values())
        assert glob == local * tp, (
            f"{name} saved as {sorted({st.key for st in entries})}: {local} local elements of {glob} global; "
            f"replicated across {tp} TP ranks instead of sharded"
        )
        checked += 1
    return checked


def all_reduce_tied_embedding_grads(model) -> None:
    """Pipeline-parallel tied embeddings: sum the first stage's embedding gradient and the last
    stage's output-layer gradient (Megatron's finalize_model_grads does this in training)."""
    group = parallel_state.get_embedding_group()
    weight = model.shared_embedding_or_output_weight()
    dist.all_reduce(weight.grad, group=group)
