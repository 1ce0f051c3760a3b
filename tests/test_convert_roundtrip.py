"""hf -> megatron -> (Megatron at TP 2 x PP 2: load, run, save) -> hf, on tnl-tiny (LRPE, scaled embeddings).

The Megatron side runs in 4 gloo workers: they load the converted torch_dist checkpoint through Megatron-LM's
own ``load_checkpoint`` (what ``pretrain_gpt.py --load`` calls), compute logits with a manual two-stage pipeline,
and save the model again as a training run at TP 2 x PP 2 would, in torch_dist and in the legacy torch format.
Both are converted back and must equal the original weights bit for bit.
"""

from __future__ import annotations

import json
import shutil
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.convert.megatron_format import TRACKER, megatron_args
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.hf_helpers import TINY, hf_tensors, tiny_model, train_sentencepiece
from tests.testing import rel_err

TP, PP, PADDED_VOCAB = 2, 2, 1024
SAVED_ITERATION = 7


def _args(tokenizer_model):
    return megatron_args(
        TINY, tensor_parallel=TP, pipeline_parallel=PP, padded_vocab=PADDED_VOCAB, make_vocab_size_divisible_by=128,
        dtype=torch.float32, tokenizer_model=tokenizer_model,
    )  # fmt: skip


def _load_like_pretrain_gpt(model, load_dir, args) -> int:
    """Megatron-LM's load_checkpoint (megatron/training/checkpointing.py) for a plain ``--load DIR``: the converted
    args say that no optimizer or RNG state was saved, so none is looked for."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.training import checkpointing, global_vars

    args.load, args.finetune, args.no_load_optim, args.no_load_rng = str(load_dir), False, False, False
    args.global_batch_size, args.micro_batch_size = 1, 1
    global_vars.set_args(args)
    init_num_microbatches_calculator(0, None, 1, 1, 1)
    read_metadata = checkpointing.read_metadata

    def read_metadata_cpu(tracker):  # it all-reduces the iteration on a CUDA tensor; one value here anyway
        with mock.patch.object(torch.distributed, "is_initialized", lambda: False):
            return read_metadata(tracker)

    try:
        with mock.patch.object(checkpointing, "read_metadata", read_metadata_cpu):
            iteration, _ = checkpointing.load_checkpoint([model], None, None, strict=True)
    finally:
        destroy_num_microbatches_calculator()
        global_vars.set_args(None)
    return iteration


def _pipeline_logits(model, tokens) -> torch.Tensor | None:
    """Logits [b, s, V] on the last stage (gathered over TP), None on the first."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            hidden = model(tokens, positions, None)
            dist.send(hidden.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], TINY.hidden_size)
        dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        local = model(tokens, positions, None)  # [b, s, V / tp]
    pieces = [torch.empty_like(local) for _ in range(TP)]
    dist.all_gather(pieces, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def _worker(rank, world, root, tokens):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    torch.manual_seed(100 + rank)  # a different init everywhere; the checkpoint must overwrite all of it
    model = build_model(TINY, vocab_size=PADDED_VOCAB, use_cpu_initialization=True)
    args = _args(root / "megatron" / "tokenizer.model")
    assert _load_like_pretrain_gpt(model, root / "megatron", args) == 0
    logits = _pipeline_logits(model, tokens)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, root / "megatron_logits.pt")

    # Save as a TP 2 x PP 2 training run would: torch_dist (the default) ...
    common = {"args": args, "checkpoint_version": 3.0, "iteration": SAVED_ITERATION}
    directory = root / "trained" / f"iter_{SAVED_ITERATION:07d}"
    if rank == 0:
        directory.mkdir(parents=True)
        (root / "trained" / TRACKER).write_text(str(SAVED_ITERATION))
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), **common}, str(directory))
    # ... and the legacy torch format (one file per rank, per-rank tensors).
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    legacy = root / "legacy" / f"iter_{SAVED_ITERATION:07d}" / f"mp_rank_{tp:02d}_{pp:03d}"
    legacy.mkdir(parents=True)
    torch.save({"model": model.state_dict_for_save_checkpoint(), **common}, legacy / "model_optim_rng.pt")
    if rank == 0:
        (root / "legacy" / TRACKER).write_text(str(SAVED_ITERATION))


def test_hf_megatron_tp2_pp2_roundtrip(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    model = tiny_model(seed=3)
    model.save_pretrained(hf_dir)
    tokenizer = train_sentencepiece(tmp_path / "sp")
    shutil.copyfile(tokenizer, hf_dir / "tokenizer.model")
    tokens = torch.randint(0, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits

    args = ["--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP), "--no-progress"]
    assert convert(["hf-to-megatron", str(hf_dir), str(tmp_path / "megatron"), *args, "--verify"]) == 0
    assert "max |logit difference| 0.000e+00" in capsys.readouterr().out
    run_distributed(_worker, TP * PP, tmp_path, tokens)

    logits = torch.load(tmp_path / "megatron_logits.pt")
    assert logits.shape == (2, 48, PADDED_VOCAB)
    err = rel_err(logits[..., : TINY.vocab_size], expected)
    print(f"\nHF vs Megatron (TP 2 x PP 2) logits: relative error {err:.2e}, "
          f"max abs {(logits[..., :TINY.vocab_size] - expected).abs().max().item():.2e}")  # fmt: skip
    assert err <= 1e-5
    assert logits[..., TINY.vocab_size :].abs().max() == 0  # padding rows are zero

    original = hf_tensors(hf_dir)
    for source in ("trained", "legacy"):
        out = tmp_path / f"back_{source}"
        assert convert(["megatron-to-hf", str(tmp_path / source), str(out), "--no-progress"]) == 0
        back = hf_tensors(out)
        assert sorted(back) == sorted(k for k in original if k != "lm_head.weight")
        for name, tensor in back.items():
            assert torch.equal(tensor, original[name]), f"{source}: {name} differs after the round trip"
        assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    print(f"round trip hf -> megatron -> TP2xPP2 -> torch_dist / torch -> hf: {len(back)} tensors bitwise equal")


def test_released_bin_layout_converts(tmp_path):
    """OpenNLPLab's layout: sharded pytorch_model-*.bin with an index, lm_head stored, Metaseq's decoder.version."""
    model = tiny_model(seed=4)
    released = tmp_path / "released"
    released.mkdir()
    state = {**model.state_dict(), "decoder.version": torch.tensor([3.0])}
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, shard_names in shards.items():
        torch.save({n: state[n].clone() for n in shard_names}, released / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (released / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**model.config.to_dict(), "torch_dtype": "bfloat16", "transformers_version": "4.32.0"}
    (released / "config.json").write_text(json.dumps(config))

    assert (
        convert(["hf-to-megatron", str(released), str(tmp_path / "megatron"), "--dtype", "bf16", "--no-progress"]) == 0
    )
    assert (
        convert(["megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "back"), "--no-progress", "--verify"])
        == 0
    )
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(n for n in names if n not in ("lm_head.weight", "decoder.version"))
    for name, tensor in back.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
