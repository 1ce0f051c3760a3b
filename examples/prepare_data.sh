#!/usr/bin/env bash
# Prepare training data for pretrain_gpt.py: a SentencePiece tokenizer and Megatron's indexed dataset.
#
#   examples/prepare_data.sh MEGATRON_LM_DIR OUT_DIR [TEXT_FILE(.gz)] [VOCAB_SIZE]
#
# Trains a BPE SentencePiece model on TEXT_FILE (default: examples/data/tinyshakespeare.txt.gz) with TNL's
# special ids (unk 0, bos 1, eos 2), writes one JSON document per blank-line-separated paragraph, and runs
# Megatron-LM's tools/preprocess_data.py. Outputs OUT_DIR/tokenizer.model and OUT_DIR/text_text_document.{bin,idx};
# train with --tokenizer-type SentencePieceTokenizer --tokenizer-model OUT_DIR/tokenizer.model
# --data-path OUT_DIR/text_text_document. To use an existing tokenizer (e.g. the released TNL one, vocab 64000),
# put it at OUT_DIR/tokenizer.model first: it is then kept.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
megatron=${1:?usage: $0 MEGATRON_LM_DIR OUT_DIR [TEXT_FILE] [VOCAB_SIZE]}
out=${2:?usage: $0 MEGATRON_LM_DIR OUT_DIR [TEXT_FILE] [VOCAB_SIZE]}
text=$(realpath "${3:-$here/data/tinyshakespeare.txt.gz}")
vocab=${4:-8192}
python=$(command -v "${PYTHON:-python3}") || { echo "$0: no ${PYTHON:-python3}" >&2; exit 1; }
[[ $python == /* ]] || python=$PWD/$python
[[ -f $megatron/tools/preprocess_data.py ]] || { echo "$0: $megatron has no tools/preprocess_data.py (want a Megatron-LM checkout at core_v0.19.0)" >&2; exit 1; }
[[ -f $text ]] || { echo "$0: text file $text not found" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)  # preprocess_data.py runs from the Megatron-LM checkout

"$python" - "$text" "$out" "$vocab" <<'PY'
import gzip, json, sys
from pathlib import Path
from megatron_tnllm.tokenizer import train_sentencepiece

text_file, out, vocab = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
opener = gzip.open if text_file.suffix == ".gz" else open
text = opener(text_file, "rt", encoding="utf-8").read()
docs = [d.strip() for d in text.split("\n\n") if d.strip()]
with open(out / "text.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
if not (out / "tokenizer.model").exists():
    train_sentencepiece(text, out / "tokenizer", vocab, num_threads=4)
print(f"{len(docs)} documents; tokenizer {out / 'tokenizer.model'}")
PY

(cd "$megatron" && "$python" tools/preprocess_data.py --input "$out/text.jsonl" --output-prefix "$out/text" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$out/tokenizer.model" --append-eod --keep-newlines \
    --workers 4)
ls -la "$out"/text_text_document.*
