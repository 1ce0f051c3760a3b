"""Gradient-accumulation fusion without apex: megatron_tnllm.ops.wgrad_accum against an fp64 oracle, and
Megatron's linear layers with patches/core_v0.19.0-wgrad-accum-fusion.patch giving the main gradients of the
unfused path (tnl-tiny at TP=2 + sequence parallel, Megatron DDP, two micro-batches; CPU, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tnllm.ops import wgrad_accum
from tests.distributed import run_distributed
from tests.testing import rel_err


def operands(t: int, n: int, k: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(device, dtype)
    dy = torch.randn(t, n, generator=g).to(device, dtype)
    main = torch.randn(n, k, generator=g).to(device)  # an earlier micro-batch's gradient, fp32
    return x, dy, main


def oracle(x: torch.Tensor, dy: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    return main.double() + dy.double().t() @ x.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_accumulation_matches_oracle(dtype):
    x, dy, main = operands(96, 40, 56, dtype)
    want = oracle(x, dy, main)
    wgrad_accum.wgrad_gemm_accum_fp32(x, dy, main)
    assert main.dtype == torch.float32
    err = rel_err(main, want)
    assert err < 1e-6, err  # the product of the rounded operands in fp32: no bf16 rounding of the gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_oracle(dtype):
    x, dy, main = operands(33, 17, 9, dtype, seed=1)
    want = oracle(x, dy, main)
    wgrad_accum.wgrad_accum_reference(x, dy, main)
    assert rel_err(main, want) < 1e-6


def test_fp16_accumulation_into_model_dtype():
    x, dy, main = operands(64, 24, 32, torch.bfloat16, seed=2)
    main = main.bfloat16()
    want = oracle(x, dy, main)
    wgrad_accum.wgrad_gemm_accum_fp16(x, dy, main)
    assert main.dtype == torch.bfloat16
    assert rel_err(main, want) < 2**-7  # one bf16 rounding of the sum


def test_rejects_bad_input():
    x, dy, main = operands(8, 4, 6, torch.float32)
    with pytest.raises(ValueError, match=r"expected \[t, k\], \[t, n\] and \[n, k\]"):
        wgrad_accum.wgrad_gemm_accum_fp32(x, dy, main.t().contiguous())
    with pytest.raises(ValueError, match="expected 2-D"):
        wgrad_accum.wgrad_gemm_accum_fp32(x[None], dy, main)
    with pytest.raises(ValueError, match="main_grad of dtype torch.bfloat16"):
        wgrad_accum.wgrad_gemm_accum_fp32(x, dy, main.bfloat16())
    with pytest.raises(ValueError, match="expected one dtype"):
        wgrad_accum.wgrad_gemm_accum_fp32(x, dy.double(), main)
    with pytest.raises(ValueError, match="main_grad of dtype torch.float32"):
        wgrad_accum.wgrad_gemm_accum_fp16(x, dy, main)
    with pytest.raises(ValueError, match="expected the same dtype"):
        wgrad_accum.wgrad_gemm_accum_fp16(x.half(), dy.half(), main.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch's mixed-precision addmm is CUDA-only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp32_accumulation_matches_oracle(dtype):
    """The cuBLAS path at a tnl-1b layer's shape (16k tokens): fp32 accumulation within fp32 GEMM error of the fp64
    oracle, well below the unfused path's (the gradient rounded to the operands' dtype, then added); a second call
    accumulates."""
    x, dy, main = operands(16384, 2048, 5632, dtype, device="cuda")
    unfused = main + (dy.t() @ x).float()
    want = oracle(x, dy, main)
    wgrad_accum.wgrad_gemm_accum_fp32(x, dy, main)
    fused_err, unfused_err = rel_err(main, want), rel_err(unfused, want)
    assert fused_err < 5e-5 and fused_err < unfused_err / 4, (fused_err, unfused_err)
    wgrad_accum.wgrad_gemm_accum_fp32(x, dy, main)
    assert rel_err(main, want + dy.double().t() @ x.double()) < 5e-5


def _main_grads(fusion: bool) -> dict[str, torch.Tensor]:
    """Main gradients of tnl-tiny after two micro-batches (Megatron DDP, fp32 buffers), with or without fusion."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_tnllm.configs import get_preset
    from megatron_tnllm.models import build_model
    from tests.megatron_utils import fixed_batch, loss_of

    torch.manual_seed(0)
    module = build_model(
        "tnl-tiny", use_cpu_initialization=True, sequence_parallel=True, gradient_accumulation_fusion=fusion
    )
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)
    for seed in (1, 2):
        loss_of(model, fixed_batch(get_preset("tnl-tiny").vocab_size, seed=seed)).backward()
    model.finish_grad_sync()
    return {name: p.main_grad.clone() for name, p in model.module.named_parameters()}


def _fusion_worker(rank: int, world: int, out: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    from tests.cpu_shims import apply_ddp_cpu_shims

    assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda is wgrad_accum, layers.__file__
    apply_ddp_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.save({"unfused": _main_grads(False), "fused": _main_grads(True)}, out / f"rank{rank}.pt")


def test_patched_layers_give_the_unfused_main_grads(patched_megatron, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(patched_megatron))  # spawned workers start with this sys.path
    run_distributed(_fusion_worker, 2, tmp_path)
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads["fused"].keys() == grads["unfused"].keys()
        checked = 0
        for name, want in grads["unfused"].items():
            assert want.abs().max() > 0, f"{name}: no gradient"
            err = rel_err(grads["fused"][name], want)
            assert err < 1e-6, f"rank {rank} {name}: fused main_grad off by {err:.1e}"
            checked += 1
        assert checked >= 10, checked


def test_bench_wgrad_smoke(tmp_path):
    """tools/bench/bench_wgrad.py on the CPU (tnl-tiny's weights): every case timed, both errors at fp32 level."""
    bench = Path(__file__).resolve().parents[1] / "tools" / "bench"
    done = subprocess.run(
        [sys.executable, str(bench / "bench_wgrad.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=bench,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_wgrad.json").read_text())["rows"]
    assert [r["weight"] for r in rows] == ["qkvu", "out", "fc1", "fc2", "lm_head"]
    for r in rows:
        assert all(t > 0 for t in r["ms"].values()) and max(r["err"].values()) < 1e-6, r
    assert "saves" in (tmp_path / "bench_wgrad.md").read_text()
