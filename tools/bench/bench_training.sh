#!/usr/bin/env bash
# Training throughput of tnl-1b against a GPT of the same shape (16 layers, width 2048, FFN 5632 SwiGLU, RoPE,
# softmax attention through torch SDPA's flash kernel: tools/bench/gpt_sdpa_spec.py), both on Megatron-Core through
# Megatron-LM's pretrain_gpt.py, one GPU, bf16, mock data, vocab 64000, at sequence lengths 2k, 8k, 32k, 64k;
# the hybrid tnl-1b (softmax attention on layers 7 and 15) the same way; both with context parallelism over two
# GPUs; and tnl-7b at its launcher's layout (TP=2 + sequence parallel, micro-batch 1 x 4096) on two GPUs.
#
#   MEGATRON_LM=third_party/Megatron-LM [GPU=0] [GPUS=0,1] [ITERS=8] [MODELS="tnl gpt"] [PORT=29500] \
#       [PEAK_TFLOPS=989] [GRAD_ACCUM_FUSION=1] [EXTRA_ARGS="--cross-entropy-loss-fusion"] \
#       tools/bench/bench_training.sh OUT_DIR [SEQ ...]
#
# MODELS: any of tnl (tnl-1b on GPU), gpt (the GPT on GPU), hybrid (tnl-1b-hybrid on GPU), tnlcp2 and hybridcp2
# (tnl-1b and tnl-1b-hybrid with --context-parallel-size 2 on GPUS), tnl7b (tnl-7b, TP=2 + SP on GPUS, sequence
# 4096 whatever the SEQ list). Each one-GPU run: 64k tokens per step (micro-batch of min(16k, seq) tokens); each CP=2
# run: micro-batch 1, 64k tokens per GPU per step (128k per step, at least one sequence); ITERS steps;
# OUT_DIR/<model>_<seq>.log. Runs with more than 32k tokens of a sequence per GPU (the one-GPU 64k runs, CP=2 above
# 64k) use full activation recompute (without it the 64k runs do not fit 141 GB at vocab 64000). EXTRA_ARGS: more
# pretrain_gpt.py flags for every run, only from --cross-entropy-loss-fusion and --cross-entropy-fusion-impl native or
# tnl (megatron_tnllm.ops.cross_entropy; needs patches/core_v0.19.0-tnl-cross-entropy.patch). GRAD_ACCUM_FUSION (1,
# the default, for every model): Megatron's gradient-accumulation fusion, which without apex needs
# patches/core_v0.19.0-wgrad-accum-fusion.patch (checked before the first run); 0: --no-gradient-accumulation-fusion.
# At the end OUT_DIR/summary.md holds one row per run: median step time over the steps after the third, tokens/s,
# model TFLOP/s per GPU (TNL and hybrids: megatron_tnllm.flops with the preset's softmax layers, counted the same
# with or without the FLOP patch; GPT: Megatron's own formula from its log) and MFU = TFLOP/s / PEAK_TFLOPS
# (default 989, the H200's dense bf16 peak), peak memory.
#
# Every variable and argument is a value: each is checked (integers, GPU lists, model names) before any arithmetic
# or command line uses it, and reaches Python only as an argument.
set -uo pipefail
die() { echo "${0##*/}: $*" >&2; exit 1; }
is_int() { [[ $1 =~ ^[0-9]{1,9}$ ]] && (( 10#$1 >= $2 )); }

out=${1:?usage: $0 OUT_DIR [SEQ ...]}
shift
seqs=("$@")
(( ${#seqs[@]} )) || seqs=(2048 8192 32768 65536)
for s in "${seqs[@]}"; do is_int "$s" 1 || die "$(printf 'SEQ %q' "$s"): expected a positive integer"; done
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at core_v0.19.0}"
[[ -f $MEGATRON_LM/pretrain_gpt.py ]] || die "no pretrain_gpt.py in MEGATRON_LM=$MEGATRON_LM"
GPU=${GPU:-0} GPUS=${GPUS:-0,1} ITERS=${ITERS:-8} PORT=${PORT:-29500} MODELS=${MODELS:-tnl gpt} PEAK_TFLOPS=${PEAK_TFLOPS:-989}
EXTRA_ARGS=${EXTRA_ARGS:-} GRAD_ACCUM_FUSION=${GRAD_ACCUM_FUSION:-1}
[[ $GRAD_ACCUM_FUSION =~ ^[01]$ ]] || die "$(printf 'GRAD_ACCUM_FUSION=%q' "$GRAD_ACCUM_FUSION"): expected 0 or 1"
[[ $GPU =~ ^[0-9]{1,3}$ ]] || die "$(printf 'GPU=%q' "$GPU"): expected one GPU index"
[[ $GPUS =~ ^[0-9]{1,3},[0-9]{1,3}$ ]] || die "$(printf 'GPUS=%q' "$GPUS"): expected two GPU indices such as 0,1"
is_int "$ITERS" 4 || die "$(printf 'ITERS=%q' "$ITERS"): expected an integer >= 4 (the first 3 steps are warm-up)"
is_int "$PORT" 1 && (( 10#$PORT <= 65535 )) || die "$(printf 'PORT=%q' "$PORT"): expected a port number"
[[ $PEAK_TFLOPS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$(printf 'PEAK_TFLOPS=%q' "$PEAK_TFLOPS"): expected a number"
read -r -a models <<< "$MODELS"
for m in "${models[@]}"; do
    [[ $m =~ ^(tnl|gpt|hybrid|tnlcp2|hybridcp2|tnl7b)$ ]] \
        || die "$(printf 'MODELS entry %q' "$m"): expected tnl, gpt, hybrid, tnlcp2, hybridcp2 or tnl7b"
done
if [[ " ${models[*]} " == *cp2\ * ]]; then  # Megatron splits a sequence into 2 x CP zig-zag chunks
    for s in "${seqs[@]}"; do
        (( 10#$s % 4 == 0 )) || die "SEQ $s: expected a multiple of 4 for tnlcp2 / hybridcp2 (2 x CP=2 chunks)"
    done
fi
[[ $EXTRA_ARGS != *$'\n'* ]] || die "$(printf 'EXTRA_ARGS=%q' "$EXTRA_ARGS"): expected flags on one line"
read -r -a user_args <<< "$EXTRA_ARGS"
for ((i = 0; i < ${#user_args[@]}; i++)); do
    case ${user_args[i]} in
        --cross-entropy-loss-fusion) ;;
        --cross-entropy-fusion-impl)
            [[ ${user_args[i + 1]:-} =~ ^(native|tnl)$ ]] \
                || die "$(printf 'EXTRA_ARGS %q' "$EXTRA_ARGS"): --cross-entropy-fusion-impl takes native or tnl"
            i=$((i + 1)) ;;
        *) die "$(printf 'EXTRA_ARGS entry %q' "${user_args[i]}"): expected --cross-entropy-loss-fusion" \
               "or --cross-entropy-fusion-impl native|tnl" ;;
    esac
done
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fusion_args=(--no-gradient-accumulation-fusion) needs=()
(( GRAD_ACCUM_FUSION )) && fusion_args=() needs+=(wgrad-accum-fusion)
[[ " ${user_args[*]} " == *" --cross-entropy-fusion-impl tnl "* ]] && needs+=(cross-entropy)
if (( ${#needs[@]} )); then  # looked up in the Megatron of MEGATRON_LM, which pretrain_gpt.py imports
    (cd "$MEGATRON_LM" && "$PYTHON" -m megatron_tnllm.megatron_patches "${needs[@]}") >&2 \
        || die "or run without them: GRAD_ACCUM_FUSION=0, no --cross-entropy-fusion-impl tnl (as needed above)"
fi
mkdir -p "$out"
grep -qs "megatron_tnllm.flops" "$MEGATRON_LM/megatron/training/training.py" \
    || echo "note: the TNL FLOP patch is not applied; the TNL logs show Megatron's softmax FLOPs (summary.md does not)"

shape=(--num-layers 16 --hidden-size 2048 --num-attention-heads 16 --kv-channels 128 --ffn-hidden-size 5632
       --disable-bias-linear --normalization RMSNorm --norm-epsilon 1e-6 --hidden-dropout 0 --attention-dropout 0
       --transformer-impl local --no-create-attention-mask-in-dataloader --no-bias-dropout-fusion)
preset_args() { "$PYTHON" -c 'import sys; from megatron_tnllm.configs import get_preset; print(" ".join(get_preset(sys.argv[1]).to_megatron_args()))' "$1"; }
read -r -a tnl <<< "$(preset_args tnl-1b)"
read -r -a tnl7b <<< "$(preset_args tnl-7b)"
read -r -a hybrid <<< "$(preset_args tnl-1b-hybrid)"
gpt=("${shape[@]}" --swiglu --position-embedding-type rope --no-rope-fusion --no-persist-layer-norm --spec gpt_sdpa_spec gpt_sdpa_layer)
runs=()  # model preset seq gbs gpus log, six words per run, for the summary
recompute=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

# run MODEL PRESET SEQ MBS GBS DEVICES NPROC EXTRA...: one pretrain_gpt.py run, its log and a one-line summary
run() {
    local model=$1 preset=$2 seq=$3 mbs=$4 gbs=$5 devices=$6 nproc=$7
    shift 7
    local log="$out/${model}_${seq}.log" margs
    case $model in
        tnl) margs=("${tnl[@]}") ;;
        gpt) margs=("${gpt[@]}") ;;
        tnl7b) margs=("${tnl7b[@]}" --tensor-model-parallel-size 2 --sequence-parallel) ;;
        hybrid) margs=("${hybrid[@]}") ;;
        tnlcp2) margs=("${tnl[@]}" --context-parallel-size 2) ;;
        hybridcp2) margs=("${hybrid[@]}" --context-parallel-size 2) ;;
    esac
    echo "== $model seq $seq: micro-batch $mbs, global batch $gbs, GPUs $devices $*"
    CUDA_VISIBLE_DEVICES=$devices PYTHONPATH="$here:${PYTHONPATH:-}" CUDA_DEVICE_MAX_CONNECTIONS=1 \
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$nproc" --master-port "$PORT" "$MEGATRON_LM/pretrain_gpt.py" \
        "${margs[@]}" --seq-length "$seq" --max-position-embeddings "$seq" \
        --micro-batch-size "$mbs" --global-batch-size "$gbs" --train-iters "$ITERS" \
        --bf16 "${fusion_args[@]}" --lr 1e-4 --min-lr 1e-5 --lr-decay-style constant \
        --mock-data --tokenizer-type NullTokenizer --vocab-size 64000 --split 100,0,0 --eval-iters 0 --eval-interval 1000 \
        --log-interval 1 --log-throughput --use-distributed-optimizer "${user_args[@]}" "$@" > "$log" 2>&1
    echo "   exit $?"
    runs+=("$model" "$preset" "$seq" "$gbs" "$nproc" "$log")
}

for seq in "${seqs[@]}"; do
    seq=$((10#$seq))
    mbs=$(( seq >= 16384 ? 1 : 16384 / seq ))
    gbs=$(( 65536 / seq > mbs ? 65536 / seq : mbs ))
    extra=()
    (( seq > 32768 )) && extra=("${recompute[@]}")
    cp_gbs=$(( 131072 / seq > 1 ? 131072 / seq : 1 ))  # micro-batch 1: 64k tokens per GPU over CP=2
    cp_extra=()
    (( seq > 65536 )) && cp_extra=("${recompute[@]}")
    for model in "${models[@]}"; do
        case $model in
            tnl|gpt) run "$model" tnl-1b "$seq" "$mbs" "$gbs" "$GPU" 1 "${extra[@]}" ;;
            hybrid) run hybrid tnl-1b-hybrid "$seq" "$mbs" "$gbs" "$GPU" 1 "${extra[@]}" ;;
            tnlcp2) run tnlcp2 tnl-1b "$seq" 1 "$cp_gbs" "$GPUS" 2 "${cp_extra[@]}" ;;
            hybridcp2) run hybridcp2 tnl-1b-hybrid "$seq" 1 "$cp_gbs" "$GPUS" 2 "${cp_extra[@]}" ;;
        esac
    done
done
for model in "${models[@]}"; do
    [[ $model == tnl7b ]] && run tnl7b tnl-7b 4096 1 16 "$GPUS" 2
done

"$PYTHON" - "$out/summary.md" "$PEAK_TFLOPS" "${runs[@]}" <<'EOF'
"""summary.md: one row per run (arguments: path, peak TFLOP/s, then model preset seq gbs gpus log per run)."""
import sys
from pathlib import Path

from megatron_tnllm.configs import get_preset
from megatron_tnllm.flops import tnl_forward_flops_per_token
from megatron_tnllm.megatron_log import summary

path, peak, rest = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
rows = ["| model | seq | GPUs | ms/step | tokens/s | TFLOP/s/GPU | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|"]
for i in range(0, len(rest), 6):
    model, preset, seq, gbs, gpus, log = rest[i : i + 6]
    s = summary(Path(log))
    if "median_ms" not in s:
        rows.append(f"| {model} | {seq} | {gpus} | failed: see {log} | | | | |")
        continue
    tokens, seconds = int(gbs) * int(seq), s["median_ms"] / 1e3
    if model != "gpt":  # TNL and the hybrids (their softmax layers' scores and values grow with seq)
        p = get_preset(preset)
        flops = 3 * tokens * tnl_forward_flops_per_token(
            p.num_layers, p.hidden_size, p.num_heads, p.glu_size, 64000, len(p.lrpe_layers),
            num_softmax_layers=len(p.softmax_layers), seq_length=int(seq),
        )
        tflops = flops / seconds / int(gpus) / 1e12
    else:
        tflops = s.get("median_tflops", float("nan"))
    peak_gib = (s["max_allocated_mb"] or float("nan")) / 1024
    rows.append(
        f"| {model} | {seq} | {gpus} | {s['median_ms']:.1f} | {tokens / seconds:,.0f} | {tflops:.0f} | "
        f"{100 * tflops / peak:.1f}% | {peak_gib:.1f} |"
    )
path.write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
