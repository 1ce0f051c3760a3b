"""Virtual-pipeline checkpoints: hf -> megatron (args for PP 2 x VPP 2) -> Megatron at PP 2 x VPP 2 (two chunks per
stage: load, save as torch_dist and as legacy torch with model0/model1) -> hf, bit for bit."""

from __future__ import annotations

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_tnllm.convert import hf_to_megatron, megatron_to_hf
from megatron_tnllm.convert.megatron_format import TRACKER, megatron_args
from megatron_tnllm.convert.safe_load import read_common_state, read_dcp_metadata
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.hf_helpers import TINY, hf_tensors, tiny_model

PP, VPP, PADDED_VOCAB, ITERATION = 2, 2, 1024, 3


def _worker(rank, world, root):
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=PP, virtual_pipeline_model_parallel_size=VPP)
    torch.manual_seed(10 + rank)  # a different init everywhere: the checkpoint must overwrite all of it
    chunks = [build_model(TINY, vp_stage=v, vocab_size=PADDED_VOCAB, use_cpu_initialization=True) for v in range(VPP)]
    loaded = dist_checkpointing.load(
        {f"model{v}": chunk.sharded_state_dict() for v, chunk in enumerate(chunks)},
        str(root / "megatron" / "iter_0000000"),
    )
    for v, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{v}"])
    args = megatron_args(
        TINY, tensor_parallel=1, pipeline_parallel=PP, padded_vocab=PADDED_VOCAB, make_vocab_size_divisible_by=128,
        dtype=torch.float32, tokenizer_model=None, virtual_stages=VPP,
    )  # fmt: skip
    common = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
    directory = root / "trained" / f"iter_{ITERATION:07d}"
    if rank == 0:
        directory.mkdir(parents=True)
        (root / "trained" / TRACKER).write_text(str(ITERATION))
    torch.distributed.barrier()
    dist_checkpointing.save(
        {**{f"model{v}": chunk.sharded_state_dict() for v, chunk in enumerate(chunks)}, **common}, str(directory)
    )
    pp = parallel_state.get_pipeline_model_parallel_rank()
    legacy = root / "legacy" / f"iter_{ITERATION:07d}" / f"mp_rank_00_{pp:03d}"
    legacy.mkdir(parents=True)
    models = {f"model{v}": chunk.state_dict_for_save_checkpoint() for v, chunk in enumerate(chunks)}
    torch.save({**models, **common}, legacy / "model_optim_rng.pt")
    if rank == 0:
        (root / "legacy" / TRACKER).write_text(str(ITERATION))


def test_virtual_pipeline_checkpoints_round_trip_bitwise(tmp_path):
    tiny_model(seed=9).save_pretrained(tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", pipeline_parallel=PP, virtual_stages=VPP, progress=False)
    iteration = tmp_path / "megatron" / "iter_0000000"
    args = read_common_state(iteration, read_dcp_metadata(iteration))["args"]
    assert (args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size) == (PP, VPP)
    assert args.num_virtual_stages_per_pipeline_rank == VPP
    run_distributed(_worker, PP, tmp_path)

    original = hf_tensors(tmp_path / "hf")
    for source in ("trained", "legacy"):
        megatron_to_hf(tmp_path / source, tmp_path / f"back_{source}", progress=False)
        back = hf_tensors(tmp_path / f"back_{source}")
        assert sorted(back) == sorted(k for k in original if k != "lm_head.weight")
        for name, tensor in back.items():
            assert torch.equal(tensor, original[name]), f"{source}: {name} differs after the round trip"
