"""Every bad input gets an error naming the bad value and what was expected, and leaves no output behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_tnllm.convert import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.convert.hf_format import HFCheckpoint
from megatron_tnllm.convert.megatron_format import (
    TRACKER,
    merge_dcp_parts,
    save_dcp_part,
    tnl_from_args,
    write_checkpoint_metadata,
)
from megatron_tnllm.hf import TransnormerForCausalLM
from tests.hf_helpers import TINY, tiny_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A sharded HF directory and its Megatron conversion, both pristine (tests copy them before damaging)."""
    root = tmp_path_factory.mktemp("good")
    tiny_model(seed=2).save_pretrained(root / "hf", max_shard_size="4MB")
    hf_to_megatron(root / "hf", root / "megatron", progress=False)
    return root


def _copy(checkpoints: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints / name, tmp_path / name))


def _assert_fails(convert_fn, source: Path, target: Path, match: str, **kwargs) -> None:
    with pytest.raises(ConversionError, match=match):
        convert_fn(source, target, progress=False, **kwargs)
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}.*")), "a temporary directory was left behind"


def _shards(hf_dir: Path) -> list[Path]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    return [hf_dir / name for name in sorted(set(index["weight_map"].values()))]


def test_missing_shard(checkpoints, tmp_path):
    hf = _copy(checkpoints, "hf", tmp_path)
    shard = _shards(hf)[1]
    shard.unlink()
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", f"shard {shard.name} listed in .*index.json is missing")


def test_truncated_safetensors_shard(checkpoints, tmp_path):
    hf = _copy(checkpoints, "hf", tmp_path)
    shard = _shards(hf)[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    _assert_fails(
        hf_to_megatron, hf, tmp_path / "out", rf"{shard.name} is truncated: .* {size} bytes, the file has {size - 1000}"
    )


def test_truncated_bin(checkpoints, tmp_path):
    hf = tmp_path / "bin"
    hf.mkdir()
    shutil.copyfile(checkpoints / "hf" / "config.json", hf / "config.json")
    torch.save(tiny_model(seed=2).state_dict(), hf / "pytorch_model.bin")
    data = (hf / "pytorch_model.bin").read_bytes()
    (hf / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", "cannot read .*pytorch_model.bin .*truncated")


def test_config_does_not_match_weights(checkpoints, tmp_path):
    hf = _copy(checkpoints, "hf", tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "glu_dim": 512}))
    _assert_fails(
        hf_to_megatron, hf, tmp_path / "out",
        r"model.layers.0.channel_mixer.l1.weight has shape \[704, 256\] .* glu_dim=512.* implies \[512, 256\]",
    )  # fmt: skip
    (hf / "config.json").write_text(json.dumps({**config, "decoder_layers": 3, "linear_use_lrpe_list": [1, 0, 0]}))
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", "holds tensors that a TNL .*decoder_layers=3.*model.layers.3")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "llama"}, "model_type 'llama'; expected 'transnormer'"),
        ({"linear_act_fun": "relu"}, "linear_act_fun='relu' is not supported; expected 'swish'"),
        ({"hidden_dim": 512}, "hidden_dim=512 is not supported; expected decoder_embed_dim"),
    ],
)
def test_wrong_model_type_or_architecture(checkpoints, tmp_path, change, match):
    hf = _copy(checkpoints, "hf", tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", match)


def test_not_a_megatron_checkpoint(checkpoints, tmp_path):
    _assert_fails(megatron_to_hf, checkpoints / "hf", tmp_path / "out", "is not a Megatron checkpoint: no latest_")


def test_megatron_gpt_checkpoint_is_refused(checkpoints, tmp_path):
    """A Megatron checkpoint of another model (GPT attention keys)."""
    root = tmp_path / "gpt"
    iteration = root / "iter_0000000"
    iteration.mkdir(parents=True)
    part = iteration / "part"
    tensors = {
        "embedding.word_embeddings.weight": torch.zeros(64, 8),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(24, 8),
    }
    save_dcp_part(part, tensors, {})
    merge_dcp_parts([part], iteration)
    write_checkpoint_metadata(root, 0)
    _assert_fails(
        megatron_to_hf, root, tmp_path / "out",
        "is not a TransNormerLLM checkpoint: it has no decoder.layers.0.self_attention.qkvu_proj.weight.query "
        r"\(it has decoder.layers.0.self_attention.linear_qkv.weight\)",
    )  # fmt: skip


def test_missing_and_truncated_megatron_files(checkpoints, tmp_path):
    megatron = _copy(checkpoints, "megatron", tmp_path)
    data = sorted((megatron / "iter_0000000").glob("*.distcp"))
    size = data[2].stat().st_size
    with open(data[2], "r+b") as f:
        f.truncate(size // 2)
    _assert_fails(megatron_to_hf, megatron, tmp_path / "out", rf"{data[2].name} is truncated: .*needs {size} bytes")
    data[2].unlink()
    _assert_fails(megatron_to_hf, megatron, tmp_path / "out", rf"{data[2].name} is missing; .*\.metadata stores")
    (megatron / TRACKER).write_text("5")
    _assert_fails(megatron_to_hf, megatron, tmp_path / "out", r"iter_0000005 is missing \(named by .*latest_")


def test_megatron_vocab_larger_than_embedding(checkpoints, tmp_path):
    _assert_fails(
        megatron_to_hf, checkpoints / "megatron", tmp_path / "out",
        r"vocabulary size 5000 exceeds the checkpoint's embedding rows \(1024\)", vocab_size=5000,
    )  # fmt: skip


def test_refuses_to_overwrite_without_force(checkpoints, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    code = convert(["megatron-to-hf", str(checkpoints / "megatron"), str(target), "--no-progress"])
    assert code == 2 and "already exists; pass --force to replace it" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "precious"
    assert convert(["megatron-to-hf", str(checkpoints / "megatron"), str(target), "--force", "--no-progress"]) == 0
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_failure_midway_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    read_tensor = HFCheckpoint.read

    def failing_read(self, name):
        if name.startswith("model.layers.2."):
            raise OSError("disk read error")
        return read_tensor(self, name)

    monkeypatch.setattr(HFCheckpoint, "read", failing_read)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk read error"):
        hf_to_megatron(checkpoints / "hf", target, progress=False)
    assert not target.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_sizes_and_layouts(checkpoints, tmp_path):
    _assert_fails(megatron_to_hf, checkpoints / "megatron", tmp_path / "out", "cannot read size '5 apples'",
                  max_shard_size="5 apples")  # fmt: skip
    _assert_fails(hf_to_megatron, checkpoints / "hf", tmp_path / "out", "TP 3 x PP 1 x VPP 1 does not divide 4 heads",
                  tensor_parallel=3)  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hf-to-megatron", "--tensor-model-parallel-size", "0"], "-model-parallel-size: 0 is below 1"),
        (["hf-to-megatron", "--tensor-model-parallel-size", "-8"], "-model-parallel-size: -8 is below 1"),
        (["hf-to-megatron", "--pipeline-model-parallel-size", "0"], "-model-parallel-size: 0 is below 1"),
        (["hf-to-megatron", "--iteration", "-1"], "--iteration: -1 is below 0"),
        (["hf-to-megatron", "--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by: 0 is below 1"),
        (["hf-to-megatron", "--seq-length", "-5"], "--seq-length: -5 is below 1"),
        (["hf-to-megatron", "--padded-vocab-size", "0"], "--padded-vocab-size: 0 is below 1"),
        (["hf-to-megatron", "--tensor-model-parallel-size", "two"], "'two' is not an integer"),
        (["megatron-to-hf", "--iteration", "-1"], "--iteration: -1 is below 0"),
        (["megatron-to-hf", "--vocab-size", "0"], "--vocab-size: 0 is below 1"),
    ],
)
def test_nonsense_numbers_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        convert([argv[0], str(tmp_path / "src"), str(tmp_path / "out"), *argv[1:]])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(tensor_parallel=0), "--tensor-model-parallel-size is 0; expected an integer >= 1"),
        (dict(pipeline_parallel=-2), "--pipeline-model-parallel-size is -2; expected an integer >= 1"),
        (dict(iteration=-1), "--iteration is -1; expected an integer >= 0"),
        (dict(make_vocab_size_divisible_by=0), "--make-vocab-size-divisible-by is 0; expected an integer >= 1"),
        (dict(seq_length=-1), "--seq-length is -1; expected an integer >= 1"),
    ],
)
def test_nonsense_numbers_are_refused_by_the_api(checkpoints, tmp_path, option, match):
    _assert_fails(hf_to_megatron, checkpoints / "hf", tmp_path / "out", match, **option)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", r"config.json is not valid JSON"),
        (b"[1, 2]", r"config.json holds a JSON list; expected an object"),
        (b'{"model_type": "transnormer", "decoder_layers": "four"}', r"config.json does not describe a TransNormerLLM"),
    ],
)
def test_invalid_config_json_names_the_file(checkpoints, tmp_path, content, match):
    hf = _copy(checkpoints, "hf", tmp_path)
    (hf / "config.json").write_bytes(content)
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", match)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"{broken", "has an invalid safetensors header \\(not JSON"),
        (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}', "has an invalid safetensors header entry 'x'"),
        (b"[]", "has an invalid safetensors header: a JSON list"),
    ],
)
def test_invalid_safetensors_header_names_the_file(checkpoints, tmp_path, header, match):
    hf = _copy(checkpoints, "hf", tmp_path)
    shard = _shards(hf)[0]
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    _assert_fails(hf_to_megatron, hf, tmp_path / "out", f"{shard.name} {match}")


def test_hybrid_layouts_that_no_spec_builds_are_refused_in_one_line(tmp_path):
    """Softmax layers that no --spec NAME builds (pretrain_gpt.py could not resume them), and a checkpoint whose
    softmax tensors disagree with its --spec, are refused by name."""
    config = tiny_model().config
    config.softmax_attention_layers = [1]  # tnl-tiny's hybrid spec has them on [1, 3]
    torch.manual_seed(0)
    TransnormerForCausalLM(config).save_pretrained(tmp_path / "hybrid")
    _assert_fails(
        hf_to_megatron, tmp_path / "hybrid", tmp_path / "out",
        r"no spec of megatron_tnllm.specs builds softmax attention on layers \[1\] of this 4-layer model "
        r"\(LRPE on layers \[0\]\); expected softmax_attention_layers \[1, 3\]$",
    )  # fmt: skip
    args = SimpleNamespace(
        spec=["megatron_tnllm.specs", "tnl_tiny_hybrid"], num_layers=4, hidden_size=TINY.hidden_size,
        num_attention_heads=TINY.num_heads, ffn_hidden_size=TINY.glu_size, layernorm_epsilon=1e-6, seq_length=64,
    )  # fmt: skip
    mismatch = r"tnl_tiny_hybrid builds softmax attention on layers \[1, 3\], but .* on layers \[3\]; expected the same"
    with pytest.raises(ConversionError, match=mismatch):
        tnl_from_args(args, tmp_path, (0,), 1000, True, softmax_layers=(3,))
