#!/usr/bin/env bash
# Pretrain tnl-1b with Megatron-LM's pretrain_gpt.py (core_v0.19.0) on one node of 8 GPUs:
#   MEGATRON_LM=... DATA_PREFIX=... TOKENIZER_MODEL=... bash examples/pretrain_tnl_1b.sh [pretrain_gpt.py args]
# Layout: TP=1 PP=1, DP=8, distributed optimizer, micro-batch 8, global batch 512 x 2048 tokens, no recompute.
# Memory (tools/plan_memory.py): 44 GiB per GPU (24 activations, 10 logits, 7 weights + fp32 grads + Adam/8).
# Fits H100 80GB and H200: the 1B weights need no model parallelism, so DP keeps every GPU busy without communication
# inside a layer.
: "${PRESET:=tnl-1b}" "${TP:=1}" "${PP:=1}" "${SP:=0}" "${MBS:=8}" "${GBS:=512}" "${SEQ:=2048}" "${RECOMPUTE:=none}" "${DISTOPT:=1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
