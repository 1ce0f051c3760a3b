"""Shared by the Hugging Face and converter tests: a tiny TNL in HF form, prompts and generation settings, a
SentencePiece model, weight readers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_tnllm import tokenizer as tnl_tokenizer
from megatron_tnllm.configs import get_preset
from megatron_tnllm.convert.layout import hf_config_from_tnl
from megatron_tnllm.hf import TransnormerForCausalLM
from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD

# tnl-tiny (4 layers, D 256, 4 heads, LRPE on layer 0, embeddings scaled by 16) with a 1000-piece vocabulary,
# which Megatron pads to 1024 at TP 2.
TINY = get_preset("tnl-tiny").replace(vocab_size=1000)
SHAKESPEARE = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt.gz"


def tiny_model(seed: int = 0, **overrides) -> TransnormerForCausalLM:
    """A randomly initialised TNL (fp32, eval mode) of shape TINY (TNLConfig ``overrides`` allowed)."""
    torch.manual_seed(seed)
    return TransnormerForCausalLM(hf_config_from_tnl(TINY.replace(**overrides))).eval()


def small_checkpoints(root: Path, seed: int) -> Path:
    """``root``/hf: a 2-layer tiny TNL (LRPE on layer 0) initialised from ``seed``, as HF saves it; ``root``/megatron:
    its conversion. Returns ``root``."""
    from megatron_tnllm.convert import hf_to_megatron  # the converter, only for the tests that convert

    tiny_model(seed=seed, num_layers=2, lrpe_layers=(0,)).save_pretrained(root / "hf")
    hf_to_megatron(root / "hf", root / "megatron", progress=False)
    return root


# tnl-tiny-hybrid (softmax attention on layers 1 and 3) with the same vocabulary.
HYBRID = get_preset("tnl-tiny-hybrid").replace(vocab_size=1000)


def hybrid_config(tnl=HYBRID):
    """The HF config of a hybrid TNLConfig (its softmax layers as ``softmax_attention_layers``)."""
    config = hf_config_from_tnl(tnl)
    config.softmax_attention_layers = list(tnl.softmax_layers)
    return config


def tiny_hybrid_model(seed: int = 0) -> TransnormerForCausalLM:
    """A randomly initialised hybrid (fp32, eval mode) of shape HYBRID."""
    torch.manual_seed(seed)
    return TransnormerForCausalLM(hybrid_config()).eval()


# generate() settings of the cached-against-recomputed generation checks: greedy logits returned, no early stop.
GEN = dict(max_new_tokens=8, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


def prompts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Random token ids [n] for each n of ``lengths`` in 3..vocab (no pad, BOS or EOS id), TINY's and HYBRID's
    vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY.vocab_size, (n,), generator=g) for n in lengths]


def incremental_forward(
    model: TransnormerForCausalLM, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(logits [1, n, V] of ``tokens`` [1, n > 31] run in pieces with the cache: 25 tokens, a 6-token chunk on top
    of the cache, then one token at a time; the logits of one full forward without a cache; the cache)."""
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        out = model(tokens[:, :25], use_cache=True)
        pieces = [out.logits]
        cache = getattr(out, CACHE_FIELD)
        pieces.append(model(tokens[:, 25:31], cache=cache, use_cache=True).logits)
        for t in range(31, tokens.shape[1]):
            pieces.append(model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(pieces, dim=1), full, cache


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory (safetensors, sharded or not)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        tensors.update(load_file(directory / name))
    return tensors


def train_sentencepiece(directory: Path, vocab_size: int = 1000) -> Path:
    """A TNL-style BPE SentencePiece model trained on the first 300 kB of Tiny Shakespeare."""
    directory.mkdir(parents=True, exist_ok=True)
    text = gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()[:300_000]
    return tnl_tokenizer.train_sentencepiece(text, directory / "tokenizer", vocab_size)


def tree_snapshot(directory: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under ``directory`` (to show that a directory was left untouched)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
