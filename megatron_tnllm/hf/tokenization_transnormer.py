"""A SentencePiece tokenizer for TransNormerLLM that encodes exactly as the SentencePiece model does.

Self-contained (imports only sentencepiece and transformers): exported Hugging Face directories carry this file
as is, next to ``tokenizer.model``. The released models use Baichuan-7B's SentencePiece model (vocab 64000)
with unk 0, bos 1, eos 2, pad 0 and no BOS added; ``megatron --tokenizer-type SentencePieceTokenizer`` encodes
with the same ``SentencePieceProcessor.encode``, so both sides see the same ids.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class TransnormerTokenizer(PreTrainedTokenizer):
    """``encode(text)`` returns ``SentencePieceProcessor.encode(text)`` (plus BOS/EOS only when asked).

    Text that spells a special token ("<s>") is encoded as text, as SentencePiece does
    (``split_special_tokens=True``). The pad token defaults to the piece of id 0 (TNL pads with 0).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ) -> None:
        if not vocab_file or not os.path.isfile(vocab_file):
            # Fail at load: transformers passes None when the directory has no tokenizer.model, and an empty
            # SentencePieceProcessor would only fail at the first encode.
            raise ValueError(
                f"TransnormerTokenizer: SentencePiece model {vocab_file or 'tokenizer.model'} not found; expected "
                f"tokenizer.model in {kwargs.get('name_or_path') or 'the tokenizer directory'}"
            )
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

        def piece(index: int) -> str | None:
            return self.sp_model.id_to_piece(index) if 0 <= index < self.sp_model.get_piece_size() else None

        super().__init__(
            unk_token=unk_token or piece(self.sp_model.unk_id()),
            bos_token=bos_token or piece(self.sp_model.bos_id()),
            eos_token=eos_token or piece(self.sp_model.eos_id()),
            pad_token=pad_token or piece(self.sp_model.pad_id()) or piece(0),
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["sp_model"] = None  # not picklable; reloaded from vocab_file
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__ = state
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp_model.decode(ids)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)
