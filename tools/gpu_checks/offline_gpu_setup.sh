#!/usr/bin/env bash
# Prepare an offline GPU machine (no package registry; torch with CUDA already installed) for the training checks:
# source it from the repository root with a wheel folder .whl/ and a Megatron-LM checkout at core_v0.19.0 in
# $MEGATRON_LM (a git-ignored copy such as third_party/Megatron-LM).
#
#   MEGATRON_LM=third_party/Megatron-LM source tools/gpu_checks/offline_gpu_setup.sh
#
# .whl/ holds megatron-core 0.19.2, psutil and einops, and for the kernel benchmarks optionally fla-core 0.6.0 and
# lightning-attn 0.0.5; download them where a registry is reachable with
#
#   pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl \
#       megatron-core==0.19.2 psutil einops fla-core==0.6.0 lightning-attn==0.0.5
#
# Installs the wheels into /tmp/site and puts it and this repository on PYTHONPATH, applies patches/ to the checkout
# (the TNL FLOP count in the training log; the distributed optimizer's resume without Transformer Engine; the
# one-pass cross-entropy; gradient-accumulation fusion without apex), and
# makes sure Megatron's C++ dataset helpers can be built there (otherwise it uses the compiled ones of the
# megatron-core wheel by running pretrain_gpt.py from a folder holding only the checkout's scripts).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHON=python3
repo=$PWD
apply_patches() {  # apply_patches DIR: each patch once (git apply, else GNU patch)
    local patch
    for patch in "$repo"/patches/*.patch; do
        if command -v git >/dev/null; then
            # Inside another git work tree (this repository), git apply would silently skip every path outside
            # the current directory: stop its repository search above DIR.
            (cd "$1" && export GIT_CEILING_DIRECTORIES=$(cd .. && pwd) && {
                git apply --unidiff-zero --reverse --check "$patch" 2>/dev/null || git apply --unidiff-zero "$patch"
            }) || { echo "cannot apply $patch in $1" >&2; return 1; }
        else
            patch -d "$1" -p1 -N -s < "$patch" || { echo "cannot apply $patch in $1" >&2; return 1; }
        fi
    done
    local file
    for file in $(sed -n 's#^+++ b/##p' "$repo"/patches/*.patch | sort -u); do  # each patched file has its marks
        grep -q megatron-tnllm "$1/$file" || { echo "patches/ not applied to $1/$file" >&2; return 1; }
    done
}
if [[ -d $MEGATRON_LM/megatron ]]; then  # a checkout (not the scripts-only folder of an earlier run)
    apply_patches "$MEGATRON_LM" || return 1
    if ! make -s -C "$MEGATRON_LM/megatron/core/datasets" >/dev/null 2>&1 \
            || ! (cd "$MEGATRON_LM" && python3 -c "from megatron.core.datasets import helpers_cpp") 2>/dev/null; then
        scripts=/tmp/megatron_scripts
        mkdir -p "$scripts/tools"
        cp "$MEGATRON_LM"/{pretrain_gpt.py,gpt_builders.py,model_provider.py} "$scripts/"
        cp "$MEGATRON_LM/tools/preprocess_data.py" "$scripts/tools/"
        echo "offline_gpu_setup: C++ helpers not buildable here; using the megatron-core wheel with $MEGATRON_LM's scripts"
        export MEGATRON_LM=$scripts
    else  # every tool imports the patched checkout, as pretrain_gpt.py does from its own folder
        export PYTHONPATH=$(cd "$MEGATRON_LM" && pwd):$PYTHONPATH
    fi
fi
if [[ ! -d $MEGATRON_LM/megatron ]]; then  # scripts only: the wheel's megatron runs them
    apply_patches /tmp/site || return 1
fi
python3 -c "import torch, megatron.core, megatron_tnllm; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
