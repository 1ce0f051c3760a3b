"""megatron_tnllm.tokenizer: TNL's special ids, exact round trips, the model path it returns; one-line errors for
bad text or vocabulary sizes, and nothing left behind."""

import gzip
import os
import re
import signal

import pytest
import sentencepiece as spm

from megatron_tnllm.signals import Interrupted
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.v2.model", "tok.v2.vocab"]  # no training lines


@pytest.mark.parametrize(
    ("text", "vocab_size", "message"),
    [
        ("", 100, "no text to train a tokenizer on"),
        ("\n  \n\t\n", 100, "no text to train a tokenizer on"),
        ("caf\udce9 au lait\n", 100, "the text is not valid UTF-8: surrogates not allowed at character 3"),
        ("hello world\n", "8192", "vocab_size='8192': expected a positive integer"),
        ("hello world\n", 0, "vocab_size=0: expected a positive integer"),
        ("hello world\n", -5, "vocab_size=-5: expected a positive integer"),
        ("hello world\n", 8192, "cannot train a 8192-piece vocabulary on this text: Vocabulary size too high (8192)"),
    ],
)
def test_bad_text_or_vocabulary_is_one_line_and_leaves_nothing(tmp_path, text, vocab_size, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        train_sentencepiece(text, tmp_path / "tok", vocab_size=vocab_size)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # no training lines, no temporary directory, no half model


def test_trained_files_appear_only_when_complete(tmp_path, monkeypatch):
    """While SentencePiece writes, the model prefix holds nothing: its files are renamed into place at the end."""
    seen = []
    train = spm.SentencePieceTrainer.train

    def watching(**kwargs):
        train(**kwargs)
        seen.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")))

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", watching)
    path = train_sentencepiece(gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()[:20_000], tmp_path / "tok", 400)
    assert seen == [[]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model", "tok.vocab"] and path == tmp_path / "tok.model"


def test_sigterm_during_training_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM while SentencePiece trains raises Interrupted after removing the temporary directory (Python's
    default for SIGTERM would end the process and leave it behind)."""
    train = spm.SentencePieceTrainer.train

    def terminated(**kwargs):
        train(**kwargs)  # the files are written into the temporary directory, then the signal arrives
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", terminated)
    with pytest.raises(Interrupted, match="SIGTERM"):
        train_sentencepiece(gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()[:20_000], tmp_path / "tok", 400)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
