#!/usr/bin/env bash
# Training throughput of tnl-1b against a GPT of the same shape (16 layers, width 2048, FFN 5632 SwiGLU, RoPE,
# softmax attention through torch SDPA's flash kernel: tools/gpt_sdpa_spec.py), both on Megatron-Core through
# Megatron-LM's pretrain_gpt.py, one GPU, bf16, mock data, vocab 64000, at sequence lengths 2k, 8k, 32k, 64k.
#
#   MEGATRON_LM=third_party/Megatron-LM [GPU=0] [ITERS=8] [MODELS="tnl gpt"] [PORT=29500] tools/bench_training.sh OUT_DIR [SEQ ...]
#
# Each run: 64k tokens per step (micro-batch of min(16k, seq) tokens), ITERS steps; OUT_DIR/<model>_<seq>.log.
# The 64k runs use full activation recompute for both models (without it neither fits 141 GB at vocab 64000).
# Summarise with: python tools/megatron_log.py OUT_DIR/*.log
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [SEQ ...]}
shift
seqs=("$@")
(( ${#seqs[@]} )) || seqs=(2048 8192 32768 65536)
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"

shape=(--num-layers 16 --hidden-size 2048 --num-attention-heads 16 --kv-channels 128 --ffn-hidden-size 5632
       --disable-bias-linear --normalization RMSNorm --norm-epsilon 1e-6 --hidden-dropout 0 --attention-dropout 0
       --transformer-impl local --no-create-attention-mask-in-dataloader --no-bias-dropout-fusion)
read -r -a tnl <<< "$("$PYTHON" -c "from megatron_tnllm.configs import get_preset; print(' '.join(get_preset('tnl-1b').to_megatron_args()))")"
gpt=("${shape[@]}" --swiglu --position-embedding-type rope --no-rope-fusion --no-persist-layer-norm --spec gpt_sdpa_spec gpt_sdpa_layer)

for seq in "${seqs[@]}"; do
    mbs=$(( seq >= 16384 ? 1 : 16384 / seq ))
    gbs=$(( 65536 / seq > mbs ? 65536 / seq : mbs ))
    extra=()
    (( seq > 32768 )) && extra=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
    for model in ${MODELS:-tnl gpt}; do
        if [[ $model == tnl ]]; then margs=("${tnl[@]}"); else margs=("${gpt[@]}"); fi
        echo "== $model seq $seq: micro-batch $mbs, global batch $gbs ${extra[*]}"
        CUDA_VISIBLE_DEVICES=${GPU:-0} PYTHONPATH="$here:${PYTHONPATH:-}" CUDA_DEVICE_MAX_CONNECTIONS=1 \
        "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port "${PORT:-29500}" "$MEGATRON_LM/pretrain_gpt.py" \
            "${margs[@]}" --seq-length "$seq" --max-position-embeddings "$seq" \
            --micro-batch-size "$mbs" --global-batch-size "$gbs" --train-iters "${ITERS:-8}" \
            --bf16 --no-gradient-accumulation-fusion --lr 1e-4 --min-lr 1e-5 --lr-decay-style constant \
            --mock-data --tokenizer-type NullTokenizer --vocab-size 64000 --split 100,0,0 --eval-iters 0 --eval-interval 1000 \
            --log-interval 1 --log-throughput --use-distributed-optimizer "${extra[@]}" \
            > "$out/${model}_${seq}.log" 2>&1
        echo "   exit $? $("$PYTHON" "$here/megatron_log.py" "$out/${model}_${seq}.log")"
    done
done
