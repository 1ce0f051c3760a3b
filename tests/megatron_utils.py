"""Helpers for the Megatron tests: a fixed batch, loss and gradients, dist-checkpoint save/load,
and the checks on sharded state dicts. Everything here runs inside the gloo workers."""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

BATCH, SEQ = 2, 64


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
