# Sourced by check_training.sh, check_scaling.sh and check_faults.sh (this folder): one launcher run with its own
# log.
#
#   layout_run NAME GPUS LAUNCHER [VAR=VALUE ...] -- [pretrain_gpt.py args]
#
# Runs examples/LAUNCHER on GPUs 0..GPUS-1 with the layout variables given (TP=2 SP=1 ...), checkpoints in
# $work/NAME, output in $out/NAME.log, and prints the log's summary (tools/megatron_log.py). Needs $here (the
# repository root), $out, $work and $PYTHON. CKPT=DIR among the variables checkpoints in $work/DIR instead (a
# restart of another run); layout_start is the same in the background (its pid in $layout_pid).
layout_run() {
    layout_start "$@"
    wait "$layout_pid"
    echo "   exit $? $("$PYTHON" "$here/tools/megatron_log.py" "$out/$1.log")"
}

layout_start() {
    local name=$1 gpus=$2 launcher=$3 ckpt=$1
    [[ $gpus =~ ^[1-9][0-9]{0,2}$ ]] || { printf 'layout_run %s: GPUS=%q: expected a positive integer\n' "$name" "$gpus" >&2; return 2; }
    shift 3
    local vars=()
    while [[ $1 != -- ]]; do
        if [[ $1 == CKPT=* ]]; then ckpt=${1#CKPT=}; else vars+=("$1"); fi
        shift
    done
    shift
    echo "== $name: $gpus GPU(s) ${vars[*]} $*"
    env GPUS_PER_NODE="$gpus" CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))" CKPT_DIR="$work/$ckpt" "${vars[@]}" \
        bash "$here/examples/$launcher" "$@" > "$out/$name.log" 2>&1 &
    layout_pid=$!
}

children() {  # children PID: the ids of its child processes
    if command -v ps >/dev/null; then ps -o pid= --ppid "$1"; else cat /proc/"$1"/task/*/children 2>/dev/null; fi
}

# kill_run PID: SIGKILL for PID and every process below it, as a machine failure would. torchrun starts each
# worker in its own session, so a process group does not reach them: stop the tree until it stops growing (a
# stopped process cannot fork), then kill all of it at once.
kill_run() {
    local pids=() seen=0 pid i
    while :; do
        pids=("$1")
        for ((i = 0; i < ${#pids[@]}; i++)); do
            for pid in $(children "${pids[i]}"); do pids+=("$pid"); done
        done
        kill -STOP "${pids[@]}" 2>/dev/null
        (( ${#pids[@]} == seen )) && break
        seen=${#pids[@]}
    done
    kill -KILL "${pids[@]}" 2>/dev/null
    wait "$1" 2>/dev/null
}

# The Tiny Shakespeare data of examples/prepare_data.sh in ${DATA_DIR:-/tmp/tnl_data}, made once.
# the checks run --deterministic-mode, which Megatron-LM refuses with --cross-entropy-loss-fusion (the launchers'
# default CROSS_ENTROPY=tnl): Megatron's own loss
export CROSS_ENTROPY=${CROSS_ENTROPY:-megatron}
export DATA_PREFIX=${DATA_DIR:-/tmp/tnl_data}/text_text_document TOKENIZER_MODEL=${DATA_DIR:-/tmp/tnl_data}/tokenizer.model
ensure_data() {
    [[ -f $DATA_PREFIX.bin ]] && return
    bash "$here/examples/prepare_data.sh" "$MEGATRON_LM" "$(dirname "$DATA_PREFIX")" > "$out/prepare_data.log" 2>&1 \
        || { echo "data preparation failed: $out/prepare_data.log" >&2; exit 1; }
}
