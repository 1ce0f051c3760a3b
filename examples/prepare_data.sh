#!/usr/bin/env bash
# Prepare training data for pretrain_gpt.py: a SentencePiece tokenizer and Megatron's indexed dataset.
#
#   examples/prepare_data.sh MEGATRON_LM_DIR OUT_DIR [TEXT_FILE(.gz)] [VOCAB_SIZE]
#
# Trains a BPE SentencePiece model on TEXT_FILE (UTF-8; default: examples/data/tinyshakespeare.txt.gz) with TNL's
# special ids (unk 0, bos 1, eos 2), writes one JSON document per blank-line-separated paragraph, and runs
# Megatron-LM's tools/preprocess_data.py. Outputs OUT_DIR/tokenizer.{model,vocab} and
# OUT_DIR/text_text_document.{bin,idx}; train with --tokenizer-type SentencePieceTokenizer
# --tokenizer-model OUT_DIR/tokenizer.model --data-path OUT_DIR/text_text_document. To use an existing tokenizer
# (e.g. the released TNL one, vocab 64000), put it at OUT_DIR/tokenizer.model first: it is then kept.
#
# Everything is written in a temporary directory inside OUT_DIR and moved into place at the end; an error, SIGINT
# or SIGTERM removes it, so a failed run leaves OUT_DIR as it was. Bad input (a missing, empty or non-UTF-8 text,
# a vocabulary size that is not a positive integer or too large for the text) stops with one line.
set -euo pipefail
die() { echo "${0##*/}: $*" >&2; exit 1; }
usage="usage: ${0##*/} MEGATRON_LM_DIR OUT_DIR [TEXT_FILE] [VOCAB_SIZE]"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
megatron=${1:?$usage}
out=${2:?$usage}
text=${3:-$here/data/tinyshakespeare.txt.gz}
vocab=${4:-8192}
[[ $vocab =~ ^[0-9]{1,9}$ ]] && (( 10#$vocab > 0 )) \
    || die "$(printf 'VOCAB_SIZE=%q' "$vocab"): expected a positive integer"
python=$(command -v "${PYTHON:-python3}") || die "no ${PYTHON:-python3}"
[[ $python == /* ]] || python=$PWD/$python
[[ -f $megatron/tools/preprocess_data.py ]] \
    || die "$megatron has no tools/preprocess_data.py (want a Megatron-LM checkout at core_v0.19.0)"
[[ -f $text ]] || die "text file $text not found"
text=$(realpath "$text")
mkdir -p "$out"
out=$(cd "$out" && pwd)  # preprocess_data.py runs from the Megatron-LM checkout

work=$(mktemp -d "$out/.prepare_data.tmp-XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tokenizer=$out/tokenizer.model
[[ -f $tokenizer ]] || tokenizer=$work/tokenizer.model

"$python" - "${0##*/}" "$text" "$work" "$tokenizer" "$vocab" <<'PY' || exit 1
import gzip
import json
import sys
from pathlib import Path

import sentencepiece as spm

from megatron_tnllm.tokenizer import train_sentencepiece

script = sys.argv[1]
text_file, work, tokenizer = (Path(a) for a in sys.argv[2:5])
vocab = int(sys.argv[5])
opener = gzip.open if text_file.suffix == ".gz" else open
try:
    with opener(text_file, "rt", encoding="utf-8") as f:
        text = f.read()
except UnicodeDecodeError as e:
    sys.exit(f"{script}: {text_file} is not UTF-8 text ({e.reason} at byte {e.start})")
except (OSError, EOFError) as e:  # a corrupt or truncated .gz
    sys.exit(f"{script}: cannot read {text_file} ({e})")
docs = [d.strip() for d in text.split("\n\n") if d.strip()]
if not docs:
    sys.exit(f"{script}: {text_file} holds no text (empty or blank)")
with open(work / "text.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
if tokenizer.parent == work:
    try:
        train_sentencepiece(text, work / "tokenizer", vocab, num_threads=4)
    except ValueError as e:
        sys.exit(f"{script}: {text_file}: {e}")
else:
    try:
        spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError):
        sys.exit(f"{script}: {tokenizer} is not a SentencePiece model (remove it to train one)")
print(f"{len(docs)} documents")
PY

(cd "$megatron" && "$python" tools/preprocess_data.py --input "$work/text.jsonl" --output-prefix "$work/text" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$tokenizer" --append-eod --keep-newlines \
    --workers 4) || die "tools/preprocess_data.py failed (its output is above); nothing was written to $out"
# the tokenizer first, the dataset's index last: a dataset in OUT_DIR always has its tokenizer and its data
[[ $tokenizer == "$work"/* ]] && mv "$work/tokenizer.vocab" "$work/tokenizer.model" "$out/"
mv "$work/text_text_document.bin" "$out/"
mv "$work/text_text_document.idx" "$out/"
echo "tokenizer $out/tokenizer.model"
ls -la "$out"/text_text_document.*
