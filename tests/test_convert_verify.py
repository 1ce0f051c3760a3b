"""Wrong results never look right: --verify fails above its tolerance against the source as the user gave it,
vocabulary changes are reported and never go below the tokenizer, and a moved checkpoint keeps its tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_tnllm.convert import ConversionError, hf_to_megatron, megatron_format, megatron_to_hf
from megatron_tnllm.convert import convert as convert_module
from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.convert.verify import TOLERANCE
from tests.hf_helpers import hf_tensors, tiny_model, train_sentencepiece

LAYERS = dict(num_layers=2, lrpe_layers=(0,))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """HF (vocabulary 1000, a 900-piece tokenizer) and its Megatron conversion."""
    root = tmp_path_factory.mktemp("verify")
    tiny_model(seed=7, **LAYERS).save_pretrained(root / "hf")
    shutil.copyfile(train_sentencepiece(root / "sp", 900), root / "hf" / "tokenizer.model")
    hf_to_megatron(root / "hf", root / "megatron", progress=False)
    return root


def _scale_second_layer(original):
    def scaled(group, tensors, *args):
        out = original(group, tensors, *args)
        return {k: v * 1.5 if k.endswith("out_proj.weight") and group == 2 else v for k, v in out.items()}

    return scaled


def test_verify_fails_when_a_layer_is_converted_wrongly(checkpoints, tmp_path, monkeypatch, capsys):
    target = tmp_path / "megatron"
    monkeypatch.setattr(convert_module, "to_megatron", _scale_second_layer(convert_module.to_megatron))
    assert convert(["hf-to-megatron", str(checkpoints / "hf"), str(target), "--verify", "--no-progress"]) == 3
    assert "error: --verify failed: max |logit difference|" in capsys.readouterr().err
    assert not target.exists() and not list(tmp_path.glob(".megatron.*"))
    argv = ["hf-to-megatron", str(checkpoints / "hf"), str(target), "--verify", "--dtype", "bf16", "--no-progress"]
    assert convert(argv) == 3 and "tolerance 1e-02" in capsys.readouterr().err
    monkeypatch.setattr(megatron_format, "from_megatron", _scale_second_layer(megatron_format.from_megatron))
    assert convert(["megatron-to-hf", str(checkpoints / "megatron"), str(tmp_path / "hf"), "--verify"]) == 3
    assert not (tmp_path / "hf").exists()


def test_verify_compares_against_the_source_embedding_scale(checkpoints, tmp_path, capsys):
    """--no-scale-embedding on a checkpoint whose --spec scales embeddings: the export is another model."""
    argv = ["megatron-to-hf", str(checkpoints / "megatron"), str(tmp_path / "hf"), "--no-progress"]
    assert convert([*argv, "--no-scale-embedding", "--verify"]) == 3
    err = capsys.readouterr().err
    assert "--no-scale-embedding overrides the embedding scale" in err and "--verify failed" in err
    assert convert([*argv, "--verify"]) == 0
    assert "relative 0.00e+00" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_verify_accepts_rounding_to_a_narrower_dtype(checkpoints, tmp_path, dtype, capsys):
    out = tmp_path / "megatron"
    result = hf_to_megatron(checkpoints / "hf", out, dtype=dtype, verify=True, progress=False)
    limit = TOLERANCE[{"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]]
    print(f"\n{dtype}: relative logit difference {result.relative_logit_difference:.2e} (tolerance {limit:.0e})")
    assert 0 < result.relative_logit_difference < limit / 3


def test_vocabulary_is_kept_from_the_args_and_changes_are_reported(checkpoints, tmp_path, capsys):
    """HF vocabulary 1000 with a 900-piece tokenizer: 1000 rows come back, with a note; no silent strip."""
    result = megatron_to_hf(checkpoints / "megatron", tmp_path / "back", verify=True, progress=False)
    err = capsys.readouterr().err
    assert result.vocab_size == 1000 and hf_tensors(tmp_path / "back")["model.embed_tokens.weight"].shape[0] == 1000
    assert "keeping 1000 of the 1024 embedding rows" in err and "its tokenizer 900 pieces" in err
    # Asking for another vocabulary is reported, and --verify compares against the source's 1000.
    argv = ["megatron-to-hf", str(checkpoints / "megatron"), str(tmp_path / "other"), "--no-progress"]
    assert convert([*argv, "--vocab-size", "950", "--verify"]) == 3
    err = capsys.readouterr().err
    assert "--vocab-size 950 differs from the vocabulary size 1000" in err
    assert "vocabulary of 950, the Megatron model's args 1000" in err
    # Never below the tokenizer.
    assert convert([*argv, "--vocab-size", "899"]) == 2
    assert "vocabulary size 899 is below the 900 pieces of the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_hf_vocabulary_below_its_tokenizer_is_refused(checkpoints, tmp_path):
    small = tmp_path / "hf"
    tiny_model(seed=7, vocab_size=800, **LAYERS).save_pretrained(small)
    shutil.copyfile(checkpoints / "hf" / "tokenizer.model", small / "tokenizer.model")
    with pytest.raises(ConversionError, match="has vocab_size 800, below the 900 pieces of its tokenizer.model"):
        hf_to_megatron(small, tmp_path / "out", progress=False)


def test_padding_is_reported(checkpoints, tmp_path, capsys):
    hf_to_megatron(checkpoints / "hf", tmp_path / "out", tensor_parallel=2, progress=False)
    assert "padding the vocabulary from 1000 to 1024 embedding rows with zeros (a multiple of 256)" in (
        capsys.readouterr().err
    )


def test_moved_checkpoint_finds_its_tokenizer_in_the_root(checkpoints, tmp_path, capsys):
    hf_to_megatron(checkpoints / "hf", tmp_path / "written", progress=False)
    moved = (tmp_path / "written").rename(tmp_path / "moved")  # the args name written/tokenizer.model
    megatron_to_hf(moved, tmp_path / "hf", progress=False)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (checkpoints / "hf" / "tokenizer.model").read_bytes()
    assert (
        f"the args' tokenizer model {tmp_path / 'written' / 'tokenizer.model'} does not exist; "
        f"using {moved / 'tokenizer.model'}" in capsys.readouterr().err
    )
    # Without any tokenizer.model the export says so, and keeps the args' vocabulary.
    (moved / "tokenizer.model").unlink()
    result = megatron_to_hf(moved, tmp_path / "bare", progress=False)
    assert not (tmp_path / "bare" / "tokenizer.model").exists() and result.vocab_size == 1000
    assert "no tokenizer model found (args: " in capsys.readouterr().err
