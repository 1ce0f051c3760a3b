"""Every checkpoint this project writes converts: the CPU demo's (examples/demo.py) included."""

from __future__ import annotations

import torch

from megatron_tnllm.convert import megatron_to_hf
from megatron_tnllm.convert.megatron_format import save_megatron_checkpoint
from megatron_tnllm.convert.verify import _single_process_megatron
from megatron_tnllm.models import build_model
from tests.cpu_shims import apply_cpu_shims
from tests.hf_helpers import TINY, hf_tensors, train_sentencepiece


def test_demo_checkpoint_converts_and_verifies(tmp_path, capsys):
    """examples/demo.py saves with save_megatron_checkpoint: unpadded vocabulary, the tokenizer beside it."""
    apply_cpu_shims()
    tnl = TINY.replace(num_layers=2, lrpe_layers=(0,))
    tokenizer = train_sentencepiece(tmp_path / "sp")
    torch.manual_seed(0)
    with _single_process_megatron():
        model = build_model(tnl, use_cpu_initialization=True)
        save_megatron_checkpoint(model, tnl, tmp_path / "checkpoint", 400, padded_vocab=tnl.vocab_size,
                                 tokenizer_model=tokenizer)  # fmt: skip
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = megatron_to_hf(tmp_path / "checkpoint", tmp_path / "hf", verify=True, progress=False)
    assert result.relative_logit_difference == 0 and result.vocab_size == tnl.vocab_size
    exported = hf_tensors(tmp_path / "hf")
    assert torch.equal(exported["model.embed_tokens.weight"], weights["embedding.word_embeddings.weight"])
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
