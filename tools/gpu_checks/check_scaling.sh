#!/usr/bin/env bash
# The scaling checks of docs/scaling.md on one node, through the README's launchers (stock pretrain_gpt.py).
#
#   MEGATRON_LM=third_party/Megatron-LM [GPUS=8] tools/gpu_checks/check_scaling.sh OUT_DIR 7b|weak|13b|cp
#
# STEP "7b" (8 GPUs): tnl-7b + SP at TP=8, TP=4 x PP=2 and TP=2 x PP=2 x DP=2 (distributed optimizer), micro-batch
#   1, global batch 16 x 4096 tokens, 20 iterations each from one initial checkpoint (the TP=8 run's weights
#   after one iteration, saved without optimizer state and loaded with --finetune; Megatron would otherwise
#   draw other weights per layout): tokens/s/GPU, peak memory, the 20 losses against TP=8's.
# STEP "weak" (1, 2, 4, ... GPUS GPUs): tnl-1b with data parallelism only, micro-batch 8 x 2048, 2 micro-batches
#   per GPU, mock data, 12 iterations: tokens/s/GPU and its ratio to 1 GPU.
# STEP "13b" (8 GPUs): tnl-13b at TP=8 + SP (examples/pretrain_tnl_13b.sbatch's layout on one node, DP=1), global
#   batch 8, 5 iterations: Megatron's peak allocated beside tools/plan_memory.py's estimate (printed first in
#   the log).
# STEP "cp" (GPUS GPUs, 2 or more): tnl-1b at CP=GPUS, mock data, full recompute, one sequence per step from
#   32k tokens doubling to 1M until a run fails (the longest that fits); then the first 20 losses at 16k of CP=GPUS
#   against one GPU, both from one initial checkpoint.
# STEP "vpp" (GPUS GPUs, 4 or 8): tnl-1b at PP=4 x DP=GPUS/4, 8 micro-batches of 2 x 2048 per step and DP rank,
#   20 iterations from one initial checkpoint with 1F1B and with the interleaved schedule (VPP=2, 2 layers a
#   chunk): the losses of VPP=2 against 1F1B's, tokens/s/GPU of both beside tools/plan_step.py's prediction.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR 7b|weak|13b|cp|vpp}
step=${2:?usage: $0 OUT_DIR 7b|weak|13b|cp|vpp}
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
export PYTHON=${PYTHON:-python3} LOG_INTERVAL=1 TRAIN_ITERS=200 LR=3e-4
gpus=${GPUS:-8}
[[ $gpus =~ ^[1-9][0-9]{0,2}$ ]] || { printf '%s: GPUS=%q: expected a positive integer\n' "${0##*/}" "$gpus" >&2; exit 2; }
work=${WORK_DIR:-/tmp/tnl_runs}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out" "$work"
# absolute paths: the multi-node launchers (*.sbatch) find examples/common.sh from the repository root
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd) MEGATRON_LM=$(cd "$MEGATRON_LM" && pwd)
cd "$here" || exit 1
source "$here/tools/gpu_checks/layout_runs.sh"
ensure_data
compare=("$PYTHON" "$here/tools/megatron_log.py" --compare)
BF16_TOL=3.9e-3  # one bf16 rounding (2^-8) of relative loss difference, as in tools/gpu_checks/check_training.sh
seeded=(--seed 1234 --deterministic-mode)

tokens_per_gpu() {  # tokens_per_gpu LOG TOKENS_PER_STEP GPUS: tokens/s/GPU from the median step time
    "$PYTHON" -c 'import json, sys; s = json.loads(sys.argv[1]); print(round(int(sys.argv[2]) / (s["median_ms"] / 1e3) / int(sys.argv[3])))' \
        "$("$PYTHON" "$here/tools/megatron_log.py" "$1")" "$2" "$3"
}

case $step in
7b)
    common=(MBS=1 GBS=16 SEQ=4096 SP=1)
    layout_run init7b 8 pretrain_tnl_7b.sh TP=8 DISTOPT=0 "${common[@]}" -- "${seeded[@]}" --exit-interval 1 \
        --no-save-optim --no-save-rng
    init=(--load "$work/init7b" --finetune --exit-interval 20 --no-save-optim --no-save-rng "${seeded[@]}")
    layout_run tp8 8 pretrain_tnl_7b.sh TP=8 "${common[@]}" -- "${init[@]}"
    layout_run tp4_pp2 8 pretrain_tnl_7b.sh TP=4 PP=2 "${common[@]}" -- "${init[@]}"
    layout_run tp2_pp2_dp2 8 pretrain_tnl_7b.sh TP=2 PP=2 DISTOPT=1 "${common[@]}" -- "${init[@]}"
    for name in tp8 tp4_pp2 tp2_pp2_dp2; do
        echo "$name: $(tokens_per_gpu "$out/$name.log" $((16 * 4096)) 8) tokens/s/GPU"
    done
    "${compare[@]}" "$out/tp8.log" "$out/tp4_pp2.log" "$out/tp2_pp2_dp2.log" --iters 1-20 --tol "$BF16_TOL"
    ;;
weak)
    for ((n = 1; n <= gpus; n *= 2)); do
        layout_run weak_dp$n "$n" pretrain_tnl_1b.sh TP=1 PP=1 MBS=8 GBS=$((16 * n)) SEQ=2048 MOCK_DATA=1 -- \
            --exit-interval 12 --no-save-optim --no-save-rng
        tps=$(tokens_per_gpu "$out/weak_dp$n.log" $((16 * n * 2048)) "$n")
        (( n == 1 )) && base=$tps
        echo "DP=$n: $tps tokens/s/GPU, efficiency $("$PYTHON" -c 'import sys; print(f"{int(sys.argv[1]) / int(sys.argv[2]):.3f}")' "$tps" "$base")"
    done
    ;;
13b)
    layout_run tp8_13b 8 pretrain_tnl_13b.sbatch TP=8 SP=1 MBS=2 GBS=8 SEQ=4096 -- --exit-interval 5 --no-save-optim \
        --no-save-rng
    grep -m1 -A8 "^tnl-13b: TP=8" "$out/tp8_13b.log"
    ;;
cp)
    (( gpus >= 2 )) || { echo "the cp step needs GPUS >= 2" >&2; exit 2; }
    longest=none
    for ((seq = 32768; seq <= 1048576; seq *= 2)); do
        layout_run cp${gpus}_$seq "$gpus" pretrain_tnl_1b.sh TP=1 CP="$gpus" MBS=1 GBS=1 SEQ=$seq RECOMPUTE=full \
            MOCK_DATA=1 -- --exit-interval 6 --no-save-optim --no-save-rng
        grep -q "iteration *6/" "$out/cp${gpus}_$seq.log" || break
        longest=$seq
        echo "seq $seq: $(tokens_per_gpu "$out/cp${gpus}_$seq.log" "$seq" "$gpus") tokens/s/GPU"
    done
    echo "longest sequence run at CP=$gpus (32k doubling to 1M): $longest"
    short=(MBS=1 GBS=1 SEQ=16384)
    layout_run init1b 1 pretrain_tnl_1b.sh DISTOPT=0 "${short[@]}" -- "${seeded[@]}" --exit-interval 1 --no-save-optim \
        --no-save-rng
    init=(--load "$work/init1b" --finetune --exit-interval 20 --no-save-optim --no-save-rng "${seeded[@]}")
    layout_run cp1_16k 1 pretrain_tnl_1b.sh "${short[@]}" -- "${init[@]}"
    layout_run cp${gpus}_16k "$gpus" pretrain_tnl_1b.sh CP="$gpus" "${short[@]}" -- "${init[@]}"
    "${compare[@]}" "$out/cp1_16k.log" "$out/cp${gpus}_16k.log" --iters 1-20 --tol "$BF16_TOL"
    ;;
vpp)
    (( gpus == 4 || gpus == 8 )) || { echo "the vpp step needs GPUS=4 or 8" >&2; exit 2; }
    dp=$((gpus / 4)) gbs=$((16 * gpus / 4))
    layout_run init1b_vpp 1 pretrain_tnl_1b.sh DISTOPT=0 MBS=2 GBS=16 SEQ=2048 -- "${seeded[@]}" --exit-interval 1 \
        --no-save-optim --no-save-rng
    init=(--load "$work/init1b_vpp" --finetune --exit-interval 20 --no-save-optim --no-save-rng "${seeded[@]}")
    for vpp in 1 2; do
        layout_run pp4_vpp$vpp "$gpus" pretrain_tnl_1b.sh PP=4 VPP=$vpp MBS=2 GBS=$gbs SEQ=2048 -- "${init[@]}"
        echo "PP=4 VPP=$vpp DP=$dp: $(tokens_per_gpu "$out/pp4_vpp$vpp.log" $((gbs * 2048)) "$gpus") tokens/s/GPU," \
            "predicted: $("$PYTHON" "$here/tools/plan_step.py" --preset tnl-1b --vocab-size 8192 --pp 4 --vpp $vpp \
            --dp $dp --mbs 2 --gbs $gbs --seq 2048 --no-distributed-optimizer | sed -n 1p)"
    done
    "${compare[@]}" "$out/pp4_vpp1.log" "$out/pp4_vpp2.log" --iters 1-20 --tol "$BF16_TOL"
    ;;
*) echo "unknown step $step (7b|weak|13b|cp|vpp)" >&2; exit 2 ;;
esac
