"""Interleaved (virtual) pipeline: PP=2 x VPP=2 against TP=1 on the loss and every gradient, and its checkpoint
loaded at PP=1.

tnl-tiny with LRPE on global layers 0 and 2 (so the second chunk of the first stage owns an LRPE parameter) and
its embedding scale on global layer 0. Each of the two ranks builds model chunks vp_stage=0 and 1 (rank 0: layers
0 and 2, rank 1: layers 1 and 3) and runs one micro-batch through them in pipeline order, sending activations and
gradients between the ranks by hand (Megatron's schedules are CUDA-only).
"""

import json

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_tnllm.configs import get_preset
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.megatron_utils import (
    BATCH,
    SEQ,
    fixed_batch,
    grads_into_params,
    load_checkpoint,
    load_chunks,
    loss_of,
    save_reference,
)
from tests.testing import rel_err

PRESET = get_preset("tnl-tiny").replace(lrpe_layers=(0, 2))
GRAD_TOL = 1e-5


def tiny(vp_stage=None):
    return build_model(PRESET, vp_stage=vp_stage, use_cpu_initialization=True)


def _reference_worker(rank, world, out):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model = tiny()
    save_reference(model, PRESET.vocab_size, out)


def _vpp_worker(rank, world, out):
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    chunks = [tiny(vp_stage=v) for v in range(2)]
    layers = [[layer.layer_number for layer in c.decoder.layers] for c in chunks]
    assert layers == ([[1], [3]] if rank == 0 else [[2], [4]]), layers  # 1-based global layer numbers
    lrpe = [[layer.self_attention.use_lrpe for layer in c.decoder.layers] for c in chunks]
    assert lrpe == ([[True], [True]] if rank == 0 else [[False], [False]]), lrpe
    scales = [[layer.embedding_scale for layer in c.decoder.layers] for c in chunks]
    assert scales == ([[PRESET.embedding_scale], [1.0]] if rank == 0 else [[1.0], [1.0]]), scales
    load_chunks(chunks, out / "weights")
    batch = fixed_batch(PRESET.vocab_size)
    shape = (SEQ, BATCH, PRESET.hidden_size)
    other = 1 - rank
    # Pipeline order (chunk, rank): (0, 0) -> (0, 1) -> (1, 0) -> (1, 1); backward the reverse.
    inputs, outputs = [], []
    for v, c in enumerate(chunks):
        if rank == 0 and v == 0:
            hidden = c(batch[0], batch[1], None)
            inputs.append(None)
        else:
            received = torch.empty(shape)
            dist.recv(received, other)
            received.requires_grad_()
            c.set_input_tensor(received)
            inputs.append(received)
            hidden = loss_of(c, batch) if (rank, v) == (1, 1) else c(batch[0], batch[1], None)
        if (rank, v) != (1, 1):
            dist.send(hidden.detach().contiguous(), other)
        outputs.append(hidden)
    for v in (1, 0):
        if (rank, v) == (1, 1):
            outputs[v].backward()
            loss = outputs[v].item()
        else:
            grad = torch.empty(shape)
            dist.recv(grad, other)
            outputs[v].backward(grad)
        if inputs[v] is not None:
            dist.send(inputs[v].grad, other)
    # Tied embedding (first chunk of rank 0) and output layer (last chunk of rank 1): Megatron sums their grads.
    first_or_last = chunks[0] if rank == 0 else chunks[1]
    dist.all_reduce(first_or_last.shared_embedding_or_output_weight().grad, group=parallel_state.get_embedding_group())

    worst, count = 0.0, 0
    expected = [tiny(vp_stage=v) for v in range(2)]
    load_chunks(expected, out / "grads")
    for v, (c, e_chunk) in enumerate(zip(chunks, expected, strict=True)):
        for (name, p), (_, e) in zip(c.named_parameters(), e_chunk.named_parameters(), strict=True):
            err = rel_err(p.grad, e.data)
            assert err <= GRAD_TOL, f"PP=2 x VPP=2 rank {rank} chunk {v}: gradient of {name} off by {err:.2e}"
            worst, count = max(worst, err), count + 1
    if rank == 1:
        ref_loss = json.loads((out / "loss.json").read_text())
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), f"PP=2 x VPP=2 loss {loss} vs TP=1 {ref_loss}"
        print(f"\nPP=2 x VPP=2 (manual): loss {loss:.6f} (TP=1 {ref_loss:.6f}); max gradient rel err {worst:.1e}")
    assert count == len(list(chunks[0].parameters())) + len(list(chunks[1].parameters()))

    # The chunks' gradients as one torch_dist checkpoint (pretrain_gpt.py saves chunk v under "model{v}"; the
    # tensors' keys are global layer numbers).
    for c in chunks:
        grads_into_params(c)
    (out / "vpp_grads").mkdir(exist_ok=True)
    dist_checkpointing.save({f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}, str(out / "vpp_grads"))


def _load_at_pp1(rank, world, out):
    parallel_state.initialize_model_parallel()
    torch.manual_seed(3)
    model, expected = tiny(), tiny()
    load_checkpoint(model, out / "vpp_grads")
    load_checkpoint(expected, out / "grads")
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        assert rel_err(p.data, e.data) <= GRAD_TOL, f"PP=2 x VPP=2 checkpoint at PP=1: {name}"


def test_interleaved_pipeline_matches_tp1_and_its_checkpoint_loads_at_pp1(tmp_path):
    run_distributed(_reference_worker, 1, tmp_path)
    run_distributed(_vpp_worker, 2, tmp_path)
    run_distributed(_load_at_pp1, 1, tmp_path)
