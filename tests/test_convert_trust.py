"""No code from a checkpoint runs: every pickle in a Megatron checkpoint is read with an allow-list, and whatever
needs more is refused with an error naming the file and the global (the crafted objects below would create a
file if they were ever unpickled without restriction)."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_tnllm.convert import ConversionError, megatron_to_hf
from megatron_tnllm.convert.layout import to_megatron
from megatron_tnllm.convert.megatron_format import (
    TRACKER,
    megatron_args,
    merge_dcp_parts,
    save_dcp_part,
    write_checkpoint_metadata,
)
from megatron_tnllm.convert.safe_load import (
    SafeFileSystemReader,
    common_state_key,
    read_dcp_metadata,
    read_dcp_objects,
    safe_torch_load,
)
from tests.hf_helpers import TINY, hf_tensors, small_checkpoints

SMALL = TINY.replace(num_layers=2, lrpe_layers=(0,))


class RunsCode:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return small_checkpoints(tmp_path_factory.mktemp("trust"), seed=6)


def _legacy_checkpoint(hf_dir: Path, root: Path, **extra) -> Path:
    """A legacy ``torch``-format checkpoint at TP = PP = 1 as pretrain_gpt.py saves it (args, RNG states with numpy
    arrays, optimizer and scheduler state), with ``extra`` entries added."""
    tensors = hf_tensors(hf_dir)
    model = {}
    for group in range(SMALL.num_layers + 1):
        names = [n for n in tensors if (n.startswith(f"model.layers.{group - 1}.") if group else "embed" in n)]
        for key, value in to_megatron(group, {n: tensors[n] for n in names}, 1024).items():
            base, _, section = key.rpartition(".")
            if section in ("query", "key", "value", "gate"):  # a rank's file holds qkvu fused
                model[base] = torch.cat([model.get(base, value.new_empty(0, value.shape[1])), value])
            else:
                model[key] = value
        if group:
            model[f"decoder.layers.{group - 1}.self_attention.out_proj._extra_state"] = None
    args = megatron_args(
        SMALL, tensor_parallel=1, pipeline_parallel=1, padded_vocab=1024, make_vocab_size_divisible_by=128,
        dtype=torch.float32, tokenizer_model=None,
    )  # fmt: skip
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 5,
        "model": model,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(5.0)}}, "param_groups": []},
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 5},
        "rng_state": [
            {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "rng_tracker_states": {},
            }
        ],
        **extra,
    }
    directory = root / "iter_0000005" / "mp_rank_00"
    directory.mkdir(parents=True)
    torch.save(state, directory / "model_optim_rng.pt")
    (root / TRACKER).write_text("5")
    return root


def test_legacy_checkpoint_with_megatron_state_loads_weights_only(checkpoints, tmp_path):
    legacy = _legacy_checkpoint(checkpoints / "hf", tmp_path / "legacy")
    megatron_to_hf(legacy, tmp_path / "back", progress=False)
    back, original = hf_tensors(tmp_path / "back"), hf_tensors(checkpoints / "hf")
    assert back.keys() <= original.keys() and all(torch.equal(t, original[n]) for n, t in back.items())


def test_legacy_checkpoint_that_runs_code_is_refused(checkpoints, tmp_path):
    sentinel = tmp_path / "code_ran"
    legacy = _legacy_checkpoint(checkpoints / "hf", tmp_path / "legacy", payload=RunsCode(sentinel))
    with pytest.raises(ConversionError, match=r"model_optim_rng.pt needs posix.system, which is not a type"):
        megatron_to_hf(legacy, tmp_path / "out", progress=False)
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def _write_metadata(path: Path, metadata: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def test_torch_dist_metadata_that_runs_code_is_refused(checkpoints, tmp_path):
    megatron = Path(shutil.copytree(checkpoints / "megatron", tmp_path / "megatron"))
    sentinel = tmp_path / "code_ran"
    _write_metadata(megatron / "iter_0000000" / ".metadata", RunsCode(sentinel))
    with pytest.raises(ConversionError, match=r"\.metadata names posix.system, which a torch_dist \.metadata does not"):
        megatron_to_hf(megatron, tmp_path / "out", progress=False)
    assert not sentinel.exists()


@pytest.mark.parametrize("key", ["common", "extra_state"])
def test_torch_dist_objects_that_run_code_are_refused(tmp_path, key):
    """The common state (args) and every other object, such as a layer's _extra_state, which Megatron's own loader
    (used by --verify) would unpickle without restriction."""
    sentinel = tmp_path / "code_ran"
    small_checkpoints(tmp_path, seed=6)
    iteration = tmp_path / "megatron" / "iter_0000000"
    objects = {common_state_key(): RunsCode(sentinel)} if key == "common" else {}
    if key == "extra_state":
        objects["decoder.layers.0.mlp.linear_fc2._extra_state/shard_0_1"] = RunsCode(sentinel)
    # Rewrite the checkpoint with the crafted object in place of the original one.
    crafted = tmp_path / "crafted" / "iter_0000000"
    crafted.mkdir(parents=True)
    metadata = read_dcp_metadata(iteration)
    keys = [k for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")]
    tensors = {k: torch.empty(tuple(metadata.state_dict_metadata[k].size)) for k in keys}
    dcp.load(tensors, storage_reader=SafeFileSystemReader(iteration), no_dist=True)
    original = read_dcp_objects(iteration, metadata)
    if key == "common":
        original.pop(common_state_key())
    save_dcp_part(crafted / "part", tensors, {**{k: v[0] for k, v in original.items()}, **objects})
    merge_dcp_parts([crafted / "part"], crafted)
    write_checkpoint_metadata(tmp_path / "crafted", 0)
    with pytest.raises(ConversionError, match=r"entry '.*' needs posix.system, which is not a type Megatron"):
        megatron_to_hf(tmp_path / "crafted", tmp_path / "out", progress=False)
    assert not sentinel.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a pickle"])
def test_empty_or_truncated_metadata_is_a_one_line_error(checkpoints, tmp_path, damage):
    megatron = Path(shutil.copytree(checkpoints / "megatron", tmp_path / "megatron"))
    path = megatron / "iter_0000000" / ".metadata"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not a pickle": b"hello world"}[damage])
    match = "is empty; the torch_dist checkpoint is incomplete" if damage == "empty" else "is truncated or damaged"
    with pytest.raises(ConversionError, match=match) as error:
        megatron_to_hf(megatron, tmp_path / "out", progress=False)
    assert "\n" not in str(error.value)


def test_args_that_are_not_a_namespace_are_refused(checkpoints, tmp_path):
    legacy = _legacy_checkpoint(checkpoints / "hf", tmp_path / "legacy")
    path = legacy / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["args"] = vars(state["args"])
    torch.save(state, path)
    with pytest.raises(ConversionError, match="the args are a dict; expected an argparse.Namespace"):
        megatron_to_hf(legacy, tmp_path / "out", progress=False)


def test_namespace_round_trips_through_the_allow_list():
    """The allow-list is Megatron-Core's own: a Namespace with Megatron's enums unpickles weights-only."""
    from megatron.core.transformer.enums import AttnBackend

    buffer = io.BytesIO()
    torch.save({"args": argparse.Namespace(attention_backend=AttnBackend.auto, params_dtype=torch.bfloat16)}, buffer)
    loaded = safe_torch_load(buffer.getvalue(), "memory")
    assert loaded["args"].attention_backend == AttnBackend.auto and loaded["args"].params_dtype == torch.bfloat16
