"""Exported Hugging Face directories load anywhere, and the tokenizer encodes exactly as SentencePiece does.

The export is made by the converter (hf -> megatron -> hf, sharded safetensors) and loaded in a subprocess in
which ``megatron`` and ``megatron_tnllm`` cannot be imported, through AutoConfig / AutoModelForCausalLM /
AutoTokenizer with trust_remote_code: the environment of someone who has only torch and transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import sentencepiece as spm
import torch

from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.hf import TransnormerForCausalLM
from tests.hf_helpers import TINY, tiny_model, train_sentencepiece

TEXTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "  leading spaces, inner   runs and a trailing one ",
    "unicode: héllo wörld — ☃ 日本語 🙂 ﬁ",
    "tabs\tand\r\nCRLF\n\n\nblank lines",
    "text that spells <s> and </s> and <unk>",
    "",
    " ",
    "1234567890 !@#$%^&*()_+-=[]{};':\",./<>?",
]

# Runs in a fresh interpreter: megatron and megatron_tnllm are made unimportable before anything else.
CLEAN_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Unavailable(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("megatron", "megatron_tnllm"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Unavailable())
    for name in ("megatron", "megatron_tnllm"):
        try:
            __import__(name)
            raise SystemExit(f"{name} is importable")
        except ModuleNotFoundError:
            pass

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    export, out = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.load(f"{out}/tokens.pt")
    with torch.no_grad():
        logits = model(tokens).logits
    greedy = model.generate(tokens[:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    recomputed = model.generate(tokens[:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    texts = json.load(open(f"{out}/texts.json"))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.add_bos_token]
    result = dict(module=type(model).__module__, config_type=config.model_type, logits=logits, greedy=greedy,
                  recomputed=recomputed, ids=ids, decoded=[tokenizer.decode(i) for i in ids], special=special)
    torch.save(result, f"{out}/result.pt")
    """
)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer_model):
    """(model, export directory) made by the converter, in several safetensors shards."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(seed=5)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    assert convert(["hf-to-megatron", str(root / "hf"), str(root / "megatron"), "--no-progress"]) == 0
    args = ["--max-shard-size", "4MB", "--no-progress"]
    assert convert(["megatron-to-hf", str(root / "megatron"), str(root / "export"), *args]) == 0
    return model, root / "export"


def test_export_directory_contents(export):
    _, directory = export
    shards = sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    others = [
        "model.safetensors.index.json", "config.json", "generation_config.json", "configuration_transnormer.py",
        "modeling_transnormer.py", "tokenization_transnormer.py", "tokenizer.model", "tokenizer_config.json",
    ]  # fmt: skip
    assert sorted(p.name for p in directory.iterdir()) == sorted(shards + others)
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_transnormer.TransnormerForCausalLM"
    assert config["model_type"] == "transnormer" and config["architectures"] == ["TransnormerForCausalLM"]
    modeling = (directory / "modeling_transnormer.py").read_text()
    assert "from megatron_tnllm.layers" not in modeling and "def lightning_attention_chunked" in modeling
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["auto_map"]["AutoTokenizer"][0] == (
        "tokenization_transnormer.TransnormerTokenizer"
    )


def test_export_loads_with_only_torch_and_transformers(export, tmp_path, tokenizer_model):
    model, directory = export
    tokens = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", CLEAN_RUN, str(directory), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["module"].startswith("transformers_modules") and result["config_type"] == "transnormer"
    with torch.no_grad():
        expected = model(tokens).logits
    assert torch.equal(result["logits"], expected)  # the same PyTorch code path, inlined
    assert torch.equal(result["greedy"], result["recomputed"])
    assert torch.equal(
        result["greedy"], model.generate(tokens[:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    )
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert result["ids"] == [sp.encode(t) for t in TEXTS]
    assert result["decoded"] == [sp.decode(sp.encode(t)) for t in TEXTS]
    assert result["special"] == [1, 2, 0, False]


def test_tokenizer_ids_equal_sentencepiece_and_megatron(export, tokenizer_model):
    """The export's tokenizer, the SentencePiece model and Megatron's tokenizer (built from the converted
    checkpoint's args, as pretrain_gpt.py does) give the same ids."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from transformers import AutoTokenizer

    _, directory = export
    args = load_common_state_dict(str(directory.parent / "megatron" / "iter_0000000"))["args"]
    assert (args.tokenizer_type, args.tokenizer_model) == (
        "SentencePieceTokenizer", str(directory.parent / "megatron" / "tokenizer.model"),
    )  # fmt: skip
    megatron_tokenizer = build_tokenizer(args)
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    for text in TEXTS:
        ids = sp.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert megatron_tokenizer.tokenize(text) == ids, text
        assert hf_tokenizer.decode(ids) == sp.decode(ids)
    batch = hf_tokenizer(TEXTS[:2], padding=True, padding_side="left")
    assert batch["input_ids"][1][: len(batch["input_ids"][0]) - len(sp.encode(TEXTS[1]))] == [0] * (
        len(batch["input_ids"][0]) - len(sp.encode(TEXTS[1]))
    )


def test_export_loads_into_package_class(export):
    model, directory = export
    loaded = TransnormerForCausalLM.from_pretrained(directory).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
