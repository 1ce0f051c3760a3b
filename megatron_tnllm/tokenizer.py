"""SentencePiece tokenizers with TNL's special ids, for data preparation, the demo and tests.

The released TNL models use Baichuan-7B's SentencePiece model (vocab 64000: unk 0, bos 1, eos 2, pad 0,
no BOS added). ``train_sentencepiece`` trains a BPE model with the same ids on your own text.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


def train_sentencepiece(text: str, model_prefix: Path, vocab_size: int, num_threads: int = 2) -> Path:
    """Trains BPE on the non-empty lines of ``text``; returns ``{model_prefix}.model``.

    unk 0, bos 1, eos 2, no pad piece (TNL pads with 0); byte fallback, so any text encodes; "\\n" is a piece
    and normalisation is the identity, so decoding returns the text exactly.
    """
    model_prefix = Path(model_prefix)
    lines = model_prefix.with_name(model_prefix.name + "_train.txt")
    lines.write_text("\n".join(line for line in text.splitlines() if line.strip()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(lines), model_prefix=str(model_prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=num_threads, minloglevel=2,
    )  # fmt: skip
    lines.unlink()
    return model_prefix.with_name(model_prefix.name + ".model")  # SentencePiece appends, even after a dot
