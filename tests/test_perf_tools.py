"""The performance tools on a CPU: tools/bench/profile_step.py's kernel attribution on a GPU-format trace, and
tools/bench/bench_training.sh's value checks and summary against a stand-in pretrain_gpt.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing import pythonpath

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _x(name, ts, dur, cat, tid=1, pid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid, "pid": pid, "args": args}


def test_profile_attributes_kernels_by_launching_operators():
    """Kernels get their category from their name and the ranges around their launch; idle is the span that no
    kernel covers (two overlapping kernels count once)."""
    prof = _load("profile_step")
    host = [
        _x(prof.STEP_RANGE, 0, 1000, "user_annotation"),
        _x("aten::mm", 10, 20, "cpu_op"),
        _x("cudaLaunchKernel", 12, 5, "cuda_runtime", correlation=1),
        _x("LightningAttentionFunction", 40, 30, "cpu_op"),
        _x("cuLaunchKernelEx", 45, 5, "cuda_driver", correlation=2),
        _x("_VocabParallelCrossEntropy", 80, 30, "cpu_op"),
        _x("aten::exp", 85, 10, "cpu_op"),
        _x("cudaLaunchKernel", 87, 5, "cuda_runtime", correlation=3),
        _x(prof.OPTIMIZER_RANGE, 200, 300, "user_annotation"),
        _x("aten::_foreach_mul_", 210, 20, "cpu_op"),
        _x("cudaLaunchKernel", 215, 5, "cuda_runtime", correlation=4),
        _x("aten::add", 600, 10, "cpu_op"),
        _x("cudaLaunchKernel", 602, 5, "cuda_runtime", correlation=5),
        _x("cudaLaunchKernel", 606, 2, "cuda_runtime", correlation=6),
        _x("cudaLaunchKernel", 1500, 2, "cuda_runtime", correlation=7),  # after the step: left out
    ]
    gpu = [
        _x("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 100, 100, "kernel", tid=7, pid=0, correlation=1),
        _x("_fwd_sweep_kernel", 200, 50, "kernel", tid=7, pid=0, correlation=2),
        _x("void at::native::vectorized_elementwise_kernel<exp>", 250, 10, "kernel", tid=7, pid=0, correlation=3),
        _x("multi_tensor_apply_kernel", 300, 40, "kernel", tid=7, pid=0, correlation=4),
        _x("elementwise_kernel<add>", 400, 20, "kernel", tid=7, pid=0, correlation=5),
        _x("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 410, 30, "kernel", tid=8, pid=0, correlation=6),
        _x("late_kernel", 2000, 10, "kernel", tid=7, pid=0, correlation=7),
    ]
    items, span, busy = prof.work_items({"traceEvents": host + gpu}, on_gpu=True)
    got = {i["name"][:12]: i["category"] for i in items}
    assert got == {
        "nvjet_tst_12": "gemm",
        "_fwd_sweep_k": "lightning_attention",
        "void at::nat": "cross_entropy",
        "multi_tensor": "optimizer",
        "elementwise_": "norm_elementwise",
        "ncclDevKerne": "communication",
    }
    assert (span, busy) == (340, 100 + 50 + 10 + 40 + 40)  # 400-440 covered once by two kernels
    result = prof.breakdown(items, span, busy)
    assert result["categories"]["idle"]["ms"] == pytest.approx(0.1)
    assert result["categories"]["gemm"]["percent"] == pytest.approx(100 * 100 / 340, abs=0.01)


@pytest.fixture
def patched(patched_megatron) -> dict:
    """The environment that makes bench_training.sh's Megatron the patched one."""
    return {"PYTHONPATH": pythonpath(patched_megatron)}


def _bench_training(tmp_path, env: dict, *args: str) -> subprocess.CompletedProcess:
    megatron = tmp_path / "megatron"
    megatron.mkdir(exist_ok=True)
    (megatron / "pretrain_gpt.py").write_text(
        "import os, sys\n"
        "a = sys.argv\n"
        "it, gbs = int(a[a.index('--train-iters') + 1]), int(a[a.index('--global-batch-size') + 1])\n"
        "if os.environ.get('RANK', '0') == '0':\n"
        "    print('argv:', ' '.join(a[1:]))\n"
        "    for i in range(1, it + 1):\n"
        "        print(f' iteration {i:8d}/{it:8d} | elapsed time per iteration (ms): 1000.0 | "
        "throughput per GPU (TFLOP/s/GPU): 400.0 | global batch size: {gbs:5d} | lm loss: 1.0E+01 |')\n"
        "    print('memory (MB) | allocated: 1 | max allocated: 46080.0 | reserved: 1')\n"
    )
    full = {**os.environ, "MEGATRON_LM": str(megatron), "PYTHON": sys.executable, "PORT": "29761", **env}
    return subprocess.run(
        ["bash", str(TOOLS / "bench_training.sh"), str(tmp_path / "out"), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["a[$(touch pwned)]"], "SEQ a\\[\\$\\(touch\\ pwned\\)\\]: expected a positive integer"),
        ({"GPU": "$(touch pwned)"}, ["2048"], "GPU=\\$\\(touch\\ pwned\\): expected one GPU index"),
        ({"ITERS": "3"}, ["2048"], "ITERS=3: expected an integer >= 4"),
        (
            {"MODELS": "tnl llama"},
            ["2048"],
            "MODELS entry llama: expected tnl, gpt, hybrid, tnlcp2, hybridcp2 or tnl7b",
        ),
        ({"MODELS": "hybridcp2"}, ["2050"], "SEQ 2050: expected a multiple of 4 for tnlcp2 / hybridcp2"),
        ({"EXTRA_ARGS": "--cross-entropy-loss-fusion --save=/tmp"}, ["2048"], "EXTRA_ARGS entry --save=/tmp: expected"),
        ({"EXTRA_ARGS": "--cross-entropy-fusion-impl te"}, ["2048"], "--cross-entropy-fusion-impl takes native or tnl"),
        ({"EXTRA_ARGS": "--cross-entropy-loss-fusion\n--save"}, ["2048"], "expected flags on one line"),
        ({"GRAD_ACCUM_FUSION": "yes"}, ["2048"], "GRAD_ACCUM_FUSION=yes: expected 0 or 1"),
    ],
)
def test_bench_training_takes_values_not_code(tmp_path, monkeypatch, env, args, message):
    monkeypatch.chdir(tmp_path)
    done = _bench_training(tmp_path, env, *args)
    assert done.returncode == 1 and message in done.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_bench_training_summary(tmp_path, patched):
    """One tnl-1b run at 2048 against the stand-in: 64k tokens per step in 1 s, TNL's own FLOPs per token."""
    done = _bench_training(tmp_path, {"MODELS": "tnl", "ITERS": "5", **patched}, "2048")
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "out" / "summary.md").read_text().splitlines()
    # 3 x 2,062,680,064 FLOP per token (megatron_tnllm.flops, LRPE on layer 0) x 65,536 tokens in 1 s:
    # 405.5 TFLOP/s, 41.0% of 989; 46080 MiB
    assert rows[2] == "| tnl | 2048 | 1 | 1000.0 | 65,536 | 406 | 41.0% | 45.0 |"
    assert "--no-gradient-accumulation-fusion" not in (tmp_path / "out" / "tnl_2048.log").read_text()  # fused


def test_bench_training_needs_the_patches_it_uses(tmp_path):
    """Against the unpatched megatron-core, GRAD_ACCUM_FUSION=1 (the default) and megatron_tnllm's loss stop the
    script before any run, naming both patches; GRAD_ACCUM_FUSION=0 runs unfused."""
    env = {"MODELS": "tnl", "ITERS": "4", "EXTRA_ARGS": "--cross-entropy-loss-fusion --cross-entropy-fusion-impl tnl"}
    done = _bench_training(tmp_path, env, "2048")
    assert done.returncode == 1 and not (tmp_path / "out").exists(), done.stderr
    for patch in ("wgrad-accum-fusion", "tnl-cross-entropy"):
        assert f"patches/core_v0.19.0-{patch}.patch" in done.stderr
    done = _bench_training(tmp_path, {"MODELS": "tnl", "ITERS": "4", "GRAD_ACCUM_FUSION": "0"}, "2048")
    assert done.returncode == 0, done.stderr
    assert "--no-gradient-accumulation-fusion" in (tmp_path / "out" / "tnl_2048.log").read_text()


def _hybrid_flops_per_token(seq: int) -> int:
    """tnl-1b-hybrid: tnl-1b's 2,062,680,064 forward FLOPs per token, and on each of its 2 softmax layers 2 seq D for
    the causal scores and values, less the gate's 2 D^2 and the lightning attention's H (C 2 dh + 4 dh^2)."""
    D = 2048
    return 2_062_680_064 + 2 * (2 * seq * D - 2 * D * D - (2 * 64 * D + 4 * D * 128))


def test_bench_training_hybrid_and_context_parallel_runs(tmp_path, patched):
    """hybrid on one GPU (micro-batch 2 x 8192, 8 of them) and tnlcp2 / hybridcp2 on two (micro-batch 1, 16 of
    them: 64k tokens per GPU) against the stand-in, with EXTRA_ARGS; their FLOPs count the softmax layers."""
    env = {"MODELS": "hybrid tnlcp2 hybridcp2", "ITERS": "4", "EXTRA_ARGS": "--cross-entropy-loss-fusion", **patched}
    done = _bench_training(tmp_path, env, "8192")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"

    def argv(model):
        line = next(x for x in (out / f"{model}_8192.log").read_text().splitlines() if x.startswith("argv:"))
        return line.split()[1:]

    hybrid = argv("hybrid")
    assert hybrid[hybrid.index("--spec") + 2] == "tnl_1b_hybrid" and "--context-parallel-size" not in hybrid
    assert (
        hybrid[hybrid.index("--micro-batch-size") + 1] == "2" and hybrid[hybrid.index("--global-batch-size") + 1] == "8"
    )
    for model, spec in (("tnlcp2", "tnl_1b"), ("hybridcp2", "tnl_1b_hybrid")):
        a = argv(model)
        assert a[a.index("--spec") + 2] == spec and a[a.index("--context-parallel-size") + 1] == "2"
        assert a[a.index("--micro-batch-size") + 1] == "1" and a[a.index("--global-batch-size") + 1] == "16"
        assert "--cross-entropy-loss-fusion" in a and "--recompute-granularity" not in a
    rows = (out / "summary.md").read_text().splitlines()
    flops = 3 * _hybrid_flops_per_token(8192)
    tnl = 3 * 2_062_680_064
    assert (
        rows[2] == f"| hybrid | 8192 | 1 | 1000.0 | 65,536 | {flops * 65536 / 1e12:.0f} | "
        f"{100 * flops * 65536 / 1e12 / 989:.1f}% | 45.0 |"
    )
    assert (
        rows[3] == f"| tnlcp2 | 8192 | 2 | 1000.0 | 131,072 | {tnl * 131072 / 2e12:.0f} | "
        f"{100 * tnl * 131072 / 2e12 / 989:.1f}% | 45.0 |"
    )
    assert (
        rows[4] == f"| hybridcp2 | 8192 | 2 | 1000.0 | 131,072 | {flops * 131072 / 2e12:.0f} | "
        f"{100 * flops * 131072 / 2e12 / 989:.1f}% | 45.0 |"
    )
