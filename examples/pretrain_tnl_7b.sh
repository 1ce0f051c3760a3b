#!/usr/bin/env bash
# Pretrain tnl-7b with Megatron-LM's pretrain_gpt.py (core_v0.19.0) on one node of 8 GPUs:
#   MEGATRON_LM=... DATA_PREFIX=... TOKENIZER_MODEL=... bash examples/pretrain_tnl_7b.sh [pretrain_gpt.py args]
# Layout: TP=2 + sequence parallel, PP=1, DP=4, distributed optimizer, micro-batch 1, global batch 512 x 4096 tokens,
# no recompute.
# Memory (tools/plan_memory.py): 45 GiB per GPU: 19 weights + fp32 grads (6.8B / TP2), 10 Adam (over DP=4),
# 11 activations (SP splits them by 2). TP=1 would need 38 GiB of weights + grads alone; TP=2 inside an NVLink node
# costs little and fits H100 80GB with headroom for longer sequences.
: "${PRESET:=tnl-7b}" "${TP:=2}" "${PP:=1}" "${SP:=1}" "${MBS:=1}" "${GBS:=512}" "${SEQ:=4096}" "${RECOMPUTE:=none}" "${DISTOPT:=1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
