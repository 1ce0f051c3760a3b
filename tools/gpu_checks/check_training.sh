#!/usr/bin/env bash
# The training checks of docs/training.md, on a machine with 2 GPUs, through the README's user path
# (examples/prepare_data.sh, examples/pretrain_tnl_385m.sh, i.e. stock pretrain_gpt.py --spec ...).
#
#   MEGATRON_LM=third_party/Megatron-LM tools/gpu_checks/check_training.sh OUT_DIR STEP
#
# STEP "convergence" (GPUS GPUs, default 1; data parallel with the distributed optimizer): tnl-385m, 200 iterations
#   on Tiny Shakespeare with deterministic settings, checkpoints at 100 and 200; then resume from iteration 100 to
#   120 in a new process and compare the losses (logs NGPUgpu.log and NGPUgpu_resume100.log).
# STEP "layouts" (GPUs 0, 1): the first 20 iterations on 1 GPU, at TP=2, TP=2 + SP, PP=2 and DP=2 with the
#   distributed optimizer, all starting from one initial checkpoint (a random tnl-385m converted with
#   megatron_tnllm.convert and loaded with --finetune: Megatron would otherwise draw other initial weights per
#   TP rank and pipeline stage).
# STEP "reshard" (GPUs 0, 1): the TP=2 run's checkpoint at iteration 20 (made first if missing) resumed at PP=2
#   to iteration 30, compared with the TP=2 run's own iterations 21-30.
# All runs: micro-batch 4, global batch 8, sequence 2048, bf16, seed 1234, --deterministic-mode, the distributed
# optimizer (Megatron-LM with patches/ applied: tools/gpu_checks/offline_gpu_setup.sh).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR convergence|layouts|reshard}
step=${2:?usage: $0 OUT_DIR convergence|layouts|reshard}
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
export PYTHON=${PYTHON:-python3} LOG_INTERVAL=1 MBS=4 GBS=8 SEQ=2048 TRAIN_ITERS=200 LR=3e-4
work=${WORK_DIR:-/tmp/tnl_runs}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out" "$work"
source "$here/tools/gpu_checks/layout_runs.sh"
ensure_data
compare=("$PYTHON" "$here/tools/megatron_log.py" --compare)
# layouts sum in other orders: allow one bf16 rounding (2^-8) of relative loss difference
BF16_TOL=3.9e-3
run() {  # run NAME GPUS [VAR=VALUE ...] -- [pretrain_gpt.py args]: tnl-385m, seeded and deterministic
    local name=$1 gpus=$2
    shift 2
    layout_run "$name" "$gpus" pretrain_tnl_385m.sh "$@" --seed 1234 --deterministic-mode
}

case $step in
convergence)
    name=${GPUS:-1}gpu
    run "$name" "${GPUS:-1}" SAVE_INTERVAL=100 --
    run "${name}_resume100" "${GPUS:-1}" -- --load "$work/$name" --ckpt-step 100 --save "$work/${name}_resume100" \
        --exit-interval 120
    # 1e-6, not 0: the resumed run's iteration 102 is recovered from Megatron's averaged log line (see
    # tools/megatron_log.py), exact to the 7 printed digits
    "${compare[@]}" "$out/$name.log" "$out/${name}_resume100.log" --iters 101-120 --tol 1e-6
    ;;
layouts|reshard)
    if [[ ! -f $work/init/latest_checkpointed_iteration.txt ]]; then
        "$PYTHON" - "$work/init_hf" "$TOKENIZER_MODEL" <<'PY'
import sys
import sentencepiece as spm
import torch
from megatron_tnllm.configs import get_preset
from megatron_tnllm.convert.layout import hf_config_from_tnl
from megatron_tnllm.hf import TransnormerForCausalLM

torch.manual_seed(1234)
vocab = spm.SentencePieceProcessor(model_file=sys.argv[2]).vocab_size()
TransnormerForCausalLM(hf_config_from_tnl(get_preset("tnl-385m").replace(vocab_size=vocab))).save_pretrained(sys.argv[1])
PY
        "$PYTHON" -m megatron_tnllm.convert hf-to-megatron "$work/init_hf" "$work/init" --no-progress --dtype bf16 \
            --tensor-model-parallel-size 2 > "$out/init.log" 2>&1 || { echo "initial checkpoint failed" >&2; exit 1; }
    fi
    init=(--load "$work/init" --finetune)
    # The TP=2 checkpoint is resumed at PP=2: the distributed optimizer's default checkpoint format
    # (dp_reshardable) reshards only across data-parallel ranks, the fully reshardable one across TP and PP too.
    tp2=(TP=2 SP=0 SAVE_INTERVAL=20 -- "${init[@]}" --exit-interval 30 --dist-ckpt-optim-fully-reshardable)
    if [[ $step == reshard ]]; then
        [[ -f $work/tp2/latest_checkpointed_iteration.txt && -f $out/tp2.log ]] || run tp2 2 "${tp2[@]}"
        run tp2_to_pp2 2 PP=2 -- --load "$work/tp2" --ckpt-step 20 --save "$work/tp2_to_pp2" --exit-interval 30
        "${compare[@]}" "$out/tp2.log" "$out/tp2_to_pp2.log" --iters 21-30 --tol "$BF16_TOL"
        exit
    fi
    run 1gpu20 1 -- "${init[@]}" --exit-interval 20
    run tp2 2 "${tp2[@]}"
    run tp2_sp 2 TP=2 SP=1 -- "${init[@]}" --exit-interval 20
    run pp2 2 PP=2 -- "${init[@]}" --exit-interval 20
    run dp2_distopt 2 -- "${init[@]}" --exit-interval 20
    "${compare[@]}" "$out/1gpu20.log" "$out/tp2.log" "$out/tp2_sp.log" "$out/pp2.log" "$out/dp2_distopt.log" --iters 1-20 \
        --tol "$BF16_TOL"
    ;;
*) echo "unknown step $step (convergence|layouts|reshard)" >&2; exit 2 ;;
esac
