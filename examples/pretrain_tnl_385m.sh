#!/usr/bin/env bash
# Pretrain tnl-385m with Megatron-LM's pretrain_gpt.py (core_v0.19.0) on one node of 8 GPUs:
#   MEGATRON_LM=... DATA_PREFIX=... TOKENIZER_MODEL=... bash examples/pretrain_tnl_385m.sh [pretrain_gpt.py args]
# Layout: TP=1 PP=1, DP=8, distributed optimizer, micro-batch 8, global batch 512 x 2048 tokens, no recompute.
# Memory (tools/plan_memory.py, vocab 64000): 34 GiB per GPU, of which 18 activations and 10 logits; weights, fp32
# grads and Adam are 3 GiB. Fits H100 80GB and H200 141GB with room: a 0.4B model needs no sharding, pure DP is fastest.
: "${PRESET:=tnl-385m}" "${TP:=1}" "${PP:=1}" "${SP:=0}" "${MBS:=8}" "${GBS:=512}" "${SEQ:=2048}" "${RECOMPUTE:=none}" "${DISTOPT:=1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
