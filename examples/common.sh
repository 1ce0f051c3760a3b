# Shared by the pretrain_tnl_*.sh and *.sbatch launchers: turns the layout variables they set into a Megatron-LM
# pretrain_gpt.py command (tag core_v0.19.0) and runs it with torchrun, on one node or under SLURM.
#
# Needs:    MEGATRON_LM      a Megatron-LM checkout at core_v0.19.0
#           DATA_PREFIX      indexed dataset prefix (examples/prepare_data.sh writes OUT/text_text_document),
#                            unless MOCK_DATA=1 (Megatron's random tokens, for throughput runs)
#           TOKENIZER_MODEL  SentencePiece model (examples/prepare_data.sh writes OUT/tokenizer.model)
# Optional: CKPT_DIR (default runs/$PRESET), TRAIN_ITERS, LR, SAVE_INTERVAL, LOG_INTERVAL, GPUS_PER_NODE,
#           NNODES (default: SLURM's node count, else 1), MASTER_PORT (default 29500), PYTHON; any of the
#           layout variables (TP PP SP CP MBS GBS SEQ RECOMPUTE DISTOPT) to override the launcher's choice (CP,
#           context parallelism, defaults to 1); extra pretrain_gpt.py arguments after the script name.
# The launcher sets PRESET, TP, PP, SP (0/1), MBS, GBS, SEQ, RECOMPUTE (none/full), DISTOPT (0/1).

set -euo pipefail
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.19.0}"
if (( ${MOCK_DATA:-0} )); then
    data=(--mock-data)
else
    : "${DATA_PREFIX:?set DATA_PREFIX to an indexed dataset prefix (see examples/prepare_data.sh), or MOCK_DATA=1}"
    [[ -f $DATA_PREFIX.bin && -f $DATA_PREFIX.idx ]] || { echo "no $DATA_PREFIX.bin/.idx (DATA_PREFIX)" >&2; exit 1; }
    data=(--data-path "$DATA_PREFIX" --split 99,1,0)
fi
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece model file}"
[[ -f $MEGATRON_LM/pretrain_gpt.py ]] || { echo "no pretrain_gpt.py in MEGATRON_LM=$MEGATRON_LM" >&2; exit 1; }
[[ -f $TOKENIZER_MODEL ]] || { echo "TOKENIZER_MODEL=$TOKENIZER_MODEL not found" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-${NNODES:-1}}
WORLD=$((GPUS_PER_NODE * NNODES))
CP=${CP:-1}
DP=$((WORLD / (TP * PP * CP)))
(( DP * TP * PP * CP == WORLD )) || { echo "$WORLD GPUs do not split into TP=$TP x PP=$PP x CP=$CP" >&2; exit 1; }
CKPT_DIR=${CKPT_DIR:-runs/$PRESET}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

plan=(--preset "$PRESET" --tp "$TP" --pp "$PP" --dp "$DP" --cp "$CP" --mbs "$MBS" --gbs "$GBS" --seq "$SEQ" --recompute "$RECOMPUTE"
      --vocab-size "$("$PYTHON" -c "import sentencepiece as s; from megatron_tnllm.convert.layout import padded_vocab_size as p
print(p(s.SentencePieceProcessor(model_file='$TOKENIZER_MODEL').vocab_size(), 128, $TP))")")
(( SP )) && plan+=(--sp)
(( DISTOPT )) || plan+=(--no-distributed-optimizer)
"$PYTHON" "$here/../tools/plan_memory.py" "${plan[@]}"

read -r -a model_args <<< "$("$PYTHON" -c "from megatron_tnllm.configs import get_preset; print(' '.join(get_preset('$PRESET').to_megatron_args()))")"
args=(
    "${model_args[@]}"
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --bf16 --no-gradient-accumulation-fusion
    --lr "${LR:-3e-4}" --min-lr "$(${PYTHON} -c "print(${LR:-3e-4} / 10)")" --lr-decay-style cosine
    --lr-warmup-fraction 0.01 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --train-iters "${TRAIN_ITERS:-100000}"
    "${data[@]}"
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "${SAVE_INTERVAL:-1000}" --ckpt-format torch_dist
    --log-interval "${LOG_INTERVAL:-10}" --log-throughput --eval-interval 1000 --eval-iters 10
)
(( SP )) && args+=(--sequence-parallel)
(( DISTOPT )) && args+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
[[ $RECOMPUTE == full ]] && args+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP communication overlap relies on in-order kernels
launch=(--nproc-per-node "$GPUS_PER_NODE" --master-port "${MASTER_PORT:-29500}")
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    launch+=(--nnodes "$NNODES" --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head:${MASTER_PORT:-29500}")
    exec srun --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run "${launch[@]}" "$MEGATRON_LM/pretrain_gpt.py" "${args[@]}" "$@"
fi
exec "$PYTHON" -m torch.distributed.run "${launch[@]}" "$MEGATRON_LM/pretrain_gpt.py" "${args[@]}" "$@"
