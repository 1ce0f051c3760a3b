# Shared by the pretrain_tnl_*.sh and *.sbatch launchers: turns the layout variables they set into a Megatron-LM
# pretrain_gpt.py command (tag core_v0.19.0) and runs it with torchrun, on one node or under SLURM.
#
# Needs:    MEGATRON_LM      a Megatron-LM checkout at core_v0.19.0
#           DATA_PREFIX      indexed dataset prefix (examples/prepare_data.sh writes OUT/text_text_document),
#                            unless MOCK_DATA=1 (Megatron's random tokens, for throughput runs)
#           TOKENIZER_MODEL  SentencePiece model (examples/prepare_data.sh writes OUT/tokenizer.model)
# Optional: CKPT_DIR (default runs/$PRESET), TRAIN_ITERS, LR, SAVE_INTERVAL, LOG_INTERVAL, GPUS_PER_NODE,
#           NNODES (default: SLURM's node count, else 1; more than 1 only under SLURM), MASTER_PORT (default 29500),
#           CROSS_ENTROPY (tnl, the default: megatron_tnllm's one-pass loss, which needs the patch
#           patches/core_v0.19.0-tnl-cross-entropy.patch; megatron: Megatron's own),
#           GRAD_ACCUM_FUSION (1, the default: weight gradients added into the fp32 main gradients inside the
#           GEMM, which without apex needs patches/core_v0.19.0-wgrad-accum-fusion.patch; 0: off),
#           PYTHON; any of the layout variables (TP PP VPP SP CP MBS GBS SEQ RECOMPUTE DISTOPT) to override the
#           launcher's choice (CP, context parallelism, defaults to 1; VPP, virtual pipeline stages per pipeline
#           rank for Megatron's interleaved 1F1B schedule, defaults to 1); extra pretrain_gpt.py arguments after
#           the script name.
# The launcher sets PRESET, TP, PP, SP (0/1), MBS, GBS, SEQ, RECOMPUTE (none/full), DISTOPT (0/1).
#
# Every variable is a value, never code: each is checked (integers, 0/1 flags, the learning rate as a decimal
# number, files) before any arithmetic, and reaches Python only as an argument. A bad one stops the launch with
# one line naming it, before the memory planner or torchrun runs.

set -euo pipefail
die() { echo "${0##*/}: $*" >&2; exit 1; }

# check_int NAME MIN [MAX]: NAME holds a decimal integer in MIN..MAX, rewritten without leading zeros (bash
# arithmetic would read 010 as octal). The regex runs before any arithmetic: bash evaluates `$(...)` and array
# subscripts inside a value used in (( )), so an unchecked value is code.
check_int() {
    local value=${!1-} what="an integer from $2 to ${3:-999999999}"
    (( $2 == 1 )) && [[ -z ${3:-} ]] && what="a positive integer"
    [[ $value =~ ^[0-9]{1,9}$ ]] && (( 10#$value >= $2 && 10#$value <= ${3:-999999999} )) \
        || die "$(printf '%s=%q' "$1" "$value"): expected $what"
    printf -v "$1" '%d' "$((10#$value))"
}

: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.19.0}"
: "${PRESET:?set PRESET (the launchers do)}"
: "${MOCK_DATA:=0}" "${GPUS_PER_NODE:=8}" "${NNODES:=1}" "${MASTER_PORT:=29500}" "${CP:=1}" "${VPP:=1}"
: "${CROSS_ENTROPY:=tnl}" "${GRAD_ACCUM_FUSION:=1}"
: "${TRAIN_ITERS:=100000}" "${SAVE_INTERVAL:=1000}" "${LOG_INTERVAL:=10}" "${LR:=3e-4}"
for flag in MOCK_DATA SP DISTOPT GRAD_ACCUM_FUSION; do check_int "$flag" 0 1; done
for positive in GPUS_PER_NODE NNODES TP PP CP VPP MBS GBS SEQ TRAIN_ITERS SAVE_INTERVAL LOG_INTERVAL; do
    check_int "$positive" 1
done
check_int MASTER_PORT 1 65535
[[ ${RECOMPUTE-} == none || ${RECOMPUTE-} == full ]] || die "$(printf 'RECOMPUTE=%q' "${RECOMPUTE-}"): expected none or full"
[[ $CROSS_ENTROPY == tnl || $CROSS_ENTROPY == megatron ]] \
    || die "$(printf 'CROSS_ENTROPY=%q' "$CROSS_ENTROPY"): expected tnl or megatron"
for arg in "$@"; do  # Megatron-LM refuses loss fusion in deterministic mode; say so before anything runs
    if [[ $arg == --deterministic-mode && $CROSS_ENTROPY == tnl ]]; then
        die "--deterministic-mode needs CROSS_ENTROPY=megatron (Megatron-LM refuses --cross-entropy-loss-fusion with it)"
    fi
done
# a decimal number; Python checks it is positive and finite and divides it by 10 for --min-lr
[[ $LR =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    || die "$(printf 'LR=%q' "$LR"): expected a positive decimal number such as 3e-4"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    [[ $SLURM_JOB_ID =~ ^[0-9]+$ ]] || die "$(printf 'SLURM_JOB_ID=%q' "$SLURM_JOB_ID"): expected a job number"
    : "${SLURM_JOB_NODELIST:?SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not}"
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "scontrol cannot expand SLURM_JOB_NODELIST"
    head=${hosts%%$'\n'*}
    [[ $head =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] \
        || die "$(printf '%q' "$head"): not a host name (first of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST)"
    if [[ -n ${SLURM_NNODES:-} ]]; then
        check_int SLURM_NNODES 1
        NNODES=$SLURM_NNODES
    fi
elif (( NNODES > 1 )); then
    die "NNODES=$NNODES: more than one node needs SLURM (run an .sbatch launcher with sbatch)"
fi

if (( MOCK_DATA )); then
    data=(--mock-data)
else
    : "${DATA_PREFIX:?set DATA_PREFIX to an indexed dataset prefix (see examples/prepare_data.sh), or MOCK_DATA=1}"
    [[ -f $DATA_PREFIX.bin && -f $DATA_PREFIX.idx ]] || die "no $DATA_PREFIX.bin/.idx (DATA_PREFIX)"
    data=(--data-path "$DATA_PREFIX" --split 99,1,0)
fi
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece model file}"
[[ -f $MEGATRON_LM/pretrain_gpt.py ]] || die "no pretrain_gpt.py in MEGATRON_LM=$MEGATRON_LM"
[[ -f $TOKENIZER_MODEL ]] || die "TOKENIZER_MODEL=$TOKENIZER_MODEL not found"

WORLD=$((GPUS_PER_NODE * NNODES))
DP=$((WORLD / (TP * PP * CP)))
(( DP * TP * PP * CP == WORLD )) || die "$WORLD GPUs do not split into TP=$TP x PP=$PP x CP=$CP"
(( GBS % (MBS * DP) == 0 )) || die "GBS=$GBS is not a multiple of MBS x DP = $MBS x $DP"
MICROBATCHES=$((GBS / (MBS * DP)))
if (( VPP > 1 )); then
    (( PP >= 2 )) || die "VPP=$VPP needs pipeline parallelism (PP=$PP; want PP >= 2)"
    # Megatron's interleaved schedule runs micro-batches in groups of PP and refuses a partial group
    (( MICROBATCHES % PP == 0 )) \
        || die "VPP=$VPP: $MICROBATCHES micro-batches a step (GBS / (MBS x DP)) are not a multiple of PP=$PP"
fi
CKPT_DIR=${CKPT_DIR:-runs/$PRESET}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# From Python, one per line: the padded vocabulary, --min-lr, then the preset's pretrain_gpt.py arguments. The
# values arrive as argv; the program is a fixed text. It checks what needs the preset or Python before importing
# torch (through the converter's vocabulary padding), so that a refusal is quick.
python_out=$("$PYTHON" - "${0##*/}" "$PRESET" "$TOKENIZER_MODEL" "$TP" "$PP" "$VPP" "$LR" <<'PY'
import math
import sys

import sentencepiece as spm

from megatron_tnllm.configs import get_preset

script, preset, tokenizer, tp, pp, vpp, lr = sys.argv[1:]
try:
    config = get_preset(preset)
except KeyError as e:
    sys.exit(f"{script}: PRESET={preset!r}: {e.args[0]}")
if config.num_layers % (int(pp) * int(vpp)):
    stages = f"PP={pp} x VPP={vpp} pipeline stages"
    sys.exit(f"{script}: {config.name}'s {config.num_layers} layers do not split into {stages}")
if not (math.isfinite(float(lr)) and float(lr) > 0):
    sys.exit(f"{script}: LR={lr}: expected a positive finite number")
try:
    vocab = spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()
except (OSError, RuntimeError) as e:
    sys.exit(f"{script}: TOKENIZER_MODEL={tokenizer!r}: not a SentencePiece model ({str(e).strip().splitlines()[-1]})")

from megatron_tnllm.configs import padded_vocab_size

print(padded_vocab_size(vocab, 128, int(tp)), float(lr) / 10, *config.to_megatron_args(), sep="\n")
PY
) || exit 1
mapfile -t model_args <<< "$python_out"
vocab=${model_args[0]} min_lr=${model_args[1]}
model_args=("${model_args[@]:2}")

# What the run turns on or relies on from patches/, looked up in the Megatron of MEGATRON_LM (python -m finds it
# there, as pretrain_gpt.py imports it) before anything starts; each can be turned off instead.
needs=()
[[ $CROSS_ENTROPY == tnl ]] && needs+=(cross-entropy)                # off: CROSS_ENTROPY=megatron
(( GRAD_ACCUM_FUSION )) && needs+=(wgrad-accum-fusion)              # off: GRAD_ACCUM_FUSION=0
(( DISTOPT )) && needs+=(distrib-optimizer-resume)                  # off: DISTOPT=0
if (( ${#needs[@]} )); then
    (cd "$MEGATRON_LM" && "$PYTHON" -m megatron_tnllm.megatron_patches "${needs[@]}") >&2 \
        || die "or run without them: CROSS_ENTROPY=megatron, GRAD_ACCUM_FUSION=0, DISTOPT=0 (as needed above)"
fi

plan=(--preset "$PRESET" --tp "$TP" --pp "$PP" --vpp "$VPP" --dp "$DP" --cp "$CP" --mbs "$MBS" --gbs "$GBS"
      --seq "$SEQ" --recompute "$RECOMPUTE" --vocab-size "$vocab" --cross-entropy "$CROSS_ENTROPY")
(( SP )) && plan+=(--sp)
(( DISTOPT )) || plan+=(--no-distributed-optimizer)
"$PYTHON" "$here/../tools/plan_memory.py" "${plan[@]}"
# A run killed while Megatron rewrote its checkpoint tracker could not start again: name the newest complete one
"$PYTHON" -m megatron_tnllm.checkpoint_tracker "$CKPT_DIR" || exit 1

args=(
    "${model_args[@]}"
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --bf16
    --lr "$LR" --min-lr "$min_lr" --lr-decay-style cosine
    --lr-warmup-fraction 0.01 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --train-iters "$TRAIN_ITERS"
    "${data[@]}"
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist
    --log-interval "$LOG_INTERVAL" --log-throughput --eval-interval 1000 --eval-iters 10
)
(( VPP > 1 )) && args+=(--num-virtual-stages-per-pipeline-rank "$VPP")
(( SP )) && args+=(--sequence-parallel)
(( DISTOPT )) && args+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
(( GRAD_ACCUM_FUSION )) || args+=(--no-gradient-accumulation-fusion)
# megatron_tnllm's cross-entropy (patches/core_v0.19.0-tnl-cross-entropy.patch): one pass over the logits each way
[[ $CROSS_ENTROPY == tnl ]] && args+=(--cross-entropy-loss-fusion --cross-entropy-fusion-impl tnl)
[[ $RECOMPUTE == full ]] && args+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP communication overlap relies on in-order kernels
launch=(--nproc-per-node "$GPUS_PER_NODE" --master-port "$MASTER_PORT")
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    launch+=(--nnodes "$NNODES" --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head:$MASTER_PORT")
    exec srun --ntasks-per-node=1 \
        "$PYTHON" -m torch.distributed.run "${launch[@]}" "$MEGATRON_LM/pretrain_gpt.py" "${args[@]}" "$@"
fi
exec "$PYTHON" -m torch.distributed.run "${launch[@]}" "$MEGATRON_LM/pretrain_gpt.py" "${args[@]}" "$@"
