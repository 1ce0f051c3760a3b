# Sourced by tools/check_training.sh and tools/check_scaling.sh: one launcher run with its own log.
#
#   layout_run NAME GPUS LAUNCHER [VAR=VALUE ...] -- [pretrain_gpt.py args]
#
# Runs examples/LAUNCHER on GPUs 0..GPUS-1 with the layout variables given (TP=2 SP=1 ...), checkpoints in
# $work/NAME, output in $out/NAME.log, and prints the log's summary (tools/megatron_log.py). Needs $here (the
# repository root), $out, $work and $PYTHON.
layout_run() {
    local name=$1 gpus=$2 launcher=$3
    shift 3
    local vars=()
    while [[ $1 != -- ]]; do vars+=("$1"); shift; done
    shift
    echo "== $name: $gpus GPU(s) ${vars[*]} $*"
    env GPUS_PER_NODE="$gpus" CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))" CKPT_DIR="$work/$name" "${vars[@]}" \
        bash "$here/examples/$launcher" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? $("$PYTHON" "$here/tools/megatron_log.py" "$out/$name.log")"
}

# The Tiny Shakespeare data of examples/prepare_data.sh in ${DATA_DIR:-/tmp/tnl_data}, made once.
export DATA_PREFIX=${DATA_DIR:-/tmp/tnl_data}/text_text_document TOKENIZER_MODEL=${DATA_DIR:-/tmp/tnl_data}/tokenizer.model
ensure_data() {
    [[ -f $DATA_PREFIX.bin ]] && return
    bash "$here/examples/prepare_data.sh" "$MEGATRON_LM" "$(dirname "$DATA_PREFIX")" > "$out/prepare_data.log" 2>&1 \
        || { echo "data preparation failed: $out/prepare_data.log" >&2; exit 1; }
}
