"""SentencePiece tokenizers with TNL's special ids, for data preparation, the demo and tests.

The released TNL models use Baichuan-7B's SentencePiece model (vocab 64000: unk 0, bos 1, eos 2, pad 0,
no BOS added). ``train_sentencepiece`` trains a BPE model with the same ids on your own text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

from megatron_tnllm.signals import sigterm_raises


def train_sentencepiece(text: str, model_prefix: Path, vocab_size: int, num_threads: int = 2) -> Path:
    """Trains BPE on the non-empty lines of ``text``; returns ``{model_prefix}.model``.

    unk 0, bos 1, eos 2, no pad piece (TNL pads with 0); byte fallback, so any text encodes; "\\n" is a piece
    and normalisation is the identity, so decoding returns the text exactly.

    Raises ValueError (one line) for a ``vocab_size`` that is not a positive integer, text with no non-blank line
    or with characters UTF-8 cannot encode, and a vocabulary the text cannot fill. SentencePiece works in a
    temporary directory beside ``model_prefix``, removed whatever happens; ``.vocab`` and then ``.model`` are
    renamed into place only when training succeeded, so a ``.model`` that exists is complete. SIGTERM raises
    :class:`megatron_tnllm.signals.Interrupted` after the same clean-up.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r}: expected a positive integer")
    lines = "\n".join(line for line in text.splitlines() if line.strip())
    if not lines:
        raise ValueError("no text to train a tokenizer on: every line is empty or blank")
    try:
        data = lines.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid UTF-8: {e.reason} at character {e.start}") from None
    model_prefix = Path(model_prefix)
    with sigterm_raises():  # SIGTERM, like an error or SIGINT, removes the temporary directory
        return _train_in_staging(data, model_prefix, vocab_size, num_threads)


def _train_in_staging(data: bytes, model_prefix: Path, vocab_size: int, num_threads: int) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{model_prefix.name}.tmp-", dir=model_prefix.parent))
    try:
        (staging / "train.txt").write_bytes(data)
        try:
            spm.SentencePieceTrainer.train(
                input=str(staging / "train.txt"), model_prefix=str(staging / "spm"), vocab_size=vocab_size,
                model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                byte_fallback=True, user_defined_symbols=["\n"], normalization_rule_name="identity",
                remove_extra_whitespaces=False, num_threads=num_threads, minloglevel=2,
            )  # fmt: skip
        except RuntimeError as e:  # "INTERNAL: file(line) [check] message"
            reason = str(e).split("] ", 1)[-1].strip() or str(e)
            raise ValueError(
                f"SentencePiece cannot train a {vocab_size}-piece vocabulary on this text: {reason}"
            ) from None
        for suffix in (".vocab", ".model"):  # SentencePiece appends the suffix, even after a dot
            os.replace(staging / f"spm{suffix}", model_prefix.with_name(model_prefix.name + suffix))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_prefix.with_name(model_prefix.name + ".model")
