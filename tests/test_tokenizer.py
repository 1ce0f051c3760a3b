"""megatron_tnllm.tokenizer: TNL's special ids, exact round trips, and the model path it returns."""

import gzip

import sentencepiece as spm

from megatron_tnllm.tokenizer import train_sentencepiece
from tests.hf_helpers import SHAKESPEARE


def test_trained_tokenizer_has_tnl_ids_and_round_trips(tmp_path):
    text = gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()[:60_000]
    path = train_sentencepiece(text, tmp_path / "tok.v2", vocab_size=600)  # a dot in the prefix is kept
    assert path == tmp_path / "tok.v2.model" and path.is_file()
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size()) == (0, 1, 2, -1, 600)
    sample = "ROMEO:\nBut soft, what light\tthrough yonder  window — breaks? 🌙\n\n"
    assert sp.decode(sp.encode(sample)) == sample  # identity normalisation and byte fallback
    assert not list(tmp_path.glob("*_train.txt"))  # the training lines are removed
