"""The decode step's products (``ops.skinny_linear``: x W^T, plus a residual, and SGLU's gated product) against
their fp64 PyTorch references.

The Triton cases run on the CPU under Triton's interpreter in a subprocess (``test_interpreter_suite``) at small
shapes that reach every masked edge (a row count that is not a tile multiple and more rows than one tile, a ragged
K and N, row-strided operands), and on a CUDA GPU at the products of a tnl-1b decode step with every kernel output
poisoned with NaN first (skipped without CUDA). The PyTorch references and the argument checks run in the normal
process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_tnllm.ops.skinny_linear import skinny_glu, skinny_glu_torch, skinny_linear, skinny_linear_torch
from tests.testing import rel_err
from tests.triton_targets import (  # poisoned_outputs: autouse in this module
    DEVICE,
    INTERPRET,
    INTERPRETER_ONLY,
    cases,
    poisoned_outputs,  # noqa: F401
    run_interpreter_suite,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# against fp64 of the same inputs: fp32 accumulates in fp32 (no tf32; K up to 5632 sums: 1.3e-6 measured on an
# H200), 16-bit outputs: one or two roundings
TOL = {F32: 5e-6, F16: 2e-3, BF16: 1e-2}

if not INTERPRET:

    def test_interpreter_suite():
        run_interpreter_suite(__file__, timeout_s=600)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


SHAPES_INTERPRET = [  # (M, N, K): one row; ragged K and N; two row tiles of 32; more rows than one tile of 64
    (1, 48, 64, F32),
    (3, 40, 200, F32),
    (20, 100, 96, F16),
    (70, 33, 130, F32),
]
SHAPES_GPU = [  # tnl-1b decode step at batch 1 and 64: qkvu, out, l1/l2, l3, LM head; fp32 (the most shared memory)
    *(
        (m, n, k, BF16)
        for m in (1, 64)
        for n, k in ((8192, 2048), (2048, 2048), (5632, 2048), (2048, 5632), (64000, 2048))
    ),
    (16, 704, 256, F32),
    (64, 2048, 5632, F32),
]


@pytest.mark.parametrize(("M", "N", "K", "dtype"), cases(SHAPES_INTERPRET, SHAPES_GPU))
def test_skinny_products_match_fp64(M, N, K, dtype):
    """x W^T, residual + x W^T and (x W1^T) * (x W2^T) against the fp64 references of the same inputs."""
    x = randn(M, K, dtype=dtype, seed=1)
    w1, w2 = (randn(N, K, dtype=dtype, seed=s, scale=K**-0.5) for s in (2, 3))
    r = randn(M, N, dtype=dtype, seed=4)
    x64, w1_64, w2_64, r64 = (t.double() for t in (x, w1, w2, r))
    with torch.no_grad():
        got = {
            "linear": skinny_linear(x, w1, backend="triton"),
            "residual": skinny_linear(x, w1, r, backend="triton"),
            "glu": skinny_glu(x, w1, w2, backend="triton"),
        }
    want = {
        "linear": skinny_linear_torch(x64, w1_64),
        "residual": skinny_linear_torch(x64, w1_64, r64),
        "glu": skinny_glu_torch(x64, w1_64, w2_64),
    }
    for name, y in got.items():
        assert y.shape == (M, N) and y.dtype == dtype, name
        assert torch.isfinite(y).all(), name
        assert rel_err(y, want[name]) < TOL[dtype], (name, rel_err(y, want[name]))


@pytest.mark.parametrize("dtype", cases([F32], [BF16]))
def test_skinny_products_take_strided_and_batched_operands(dtype):
    """x [b, 1, K] as a decode step passes it, a weight that is a row-strided slice of a wider matrix, a residual
    view, and an empty batch."""
    K, N = 96, 80
    x = randn(3, 1, 2 * K, dtype=dtype, seed=5)[..., :K]  # row stride 2K
    wide = randn(N, K + 16, dtype=dtype, seed=6, scale=K**-0.5)
    w = wide[:, 8 : 8 + K]  # rows K + 16 apart
    r = randn(3, 1, N, dtype=dtype, seed=7)
    with torch.no_grad():
        y = skinny_linear(x, w, r, backend="triton")
        empty = skinny_linear(x[:0], w, r[:0], backend="triton")
    want = skinny_linear_torch(x.double(), w.double(), r.double())
    assert y.shape == (3, 1, N) and rel_err(y, want) < TOL[dtype]
    assert empty.shape == (0, 1, N)


def test_references_are_the_eager_layers_op_for_op():
    """The CPU path is the Hugging Face layers' former code, bit for bit: F.linear, then the add or the product."""
    x, w1, w2, r = (torch.randn(*s, dtype=torch.bfloat16) for s in ((4, 32), (24, 32), (24, 32), (4, 24)))
    assert torch.equal(skinny_linear(x, w1, r), r + F.linear(x, w1))
    assert torch.equal(skinny_glu(x, w1, w2), F.linear(x, w1) * F.linear(x, w2))


def test_bad_arguments_are_refused_with_the_values():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"K = x's last dim 8.*\(4, 7\)"):
        skinny_linear(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"one shape for both"):
        skinny_glu(x, w, torch.randn(5, 8))
    with pytest.raises(TypeError, match="share a dtype"):
        skinny_linear(x, w.double())
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 4\); got \(2, 5\)"):
        skinny_linear(x, w, torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="forward only"):
        skinny_linear(x, w.requires_grad_())


@INTERPRETER_ONLY
def test_hf_decode_step_through_the_kernels(monkeypatch):
    """A tiny model's decode steps (static buffers, the step a CUDA graph records) with the products through the
    kernels equal the same steps through nn.Linear to fp32 rounding: the residuals, SGLU and the LM head are wired
    to the right operands."""
    import functools

    from megatron_tnllm.hf import modeling_transnormer as modeling
    from megatron_tnllm.hf.modeling_transnormer import CACHE_FIELD
    from tests.hf_helpers import TINY, tiny_model

    model = tiny_model(seed=3, num_layers=2)
    model.decode_mode = "static"
    tokens = torch.randint(3, TINY.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))

    def decode() -> torch.Tensor:
        model.decode_graphs.clear()
        with torch.no_grad():
            cache = getattr(model(tokens[:, :6], use_cache=True), CACHE_FIELD)
            steps = [model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(6, 9)]
        return torch.cat(steps, dim=1)

    monkeypatch.setattr(modeling, "SKINNY_ROWS", 0)
    expected = decode()
    calls = []

    def counted(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args, backend="triton")

        return functools.wraps(fn)(run)

    monkeypatch.setattr(modeling, "SKINNY_ROWS", 64)
    monkeypatch.setattr(modeling, "skinny_linear", counted(skinny_linear))
    monkeypatch.setattr(modeling, "skinny_glu", counted(skinny_glu))
    got = decode()
    # the prefill (18 rows) and 3 steps, each: qkvu, out + residual, glu, l3 + residual per layer, the LM head
    assert calls.count("skinny_linear") == 4 * (2 * 3 + 1) and calls.count("skinny_glu") == 4 * 2
    assert rel_err(got, expected) < 1e-5


@INTERPRETER_ONLY
def test_bench_skinny_smoke(tmp_path, monkeypatch):
    """tools/bench/bench_skinny.py --smoke (CPU, interpreter) writes its table, so the GPU run fails on no typo."""
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    import bench_skinny

    monkeypatch.setattr(sys, "argv", ["bench_skinny.py", "--smoke", "--out", str(tmp_path)])
    bench_skinny.main()
    rows = json.loads((tmp_path / "bench_skinny.json").read_text())["results"]
    ops = ("qkvu", "out+res", "glu", "l3+res", "lm_head")
    assert {(r["op"], r["rows"], r["case"]) for r in rows} == {
        (op, m, case) for op in ops for m in (1, 20) for case in ("cublas", "ours")
    }
    assert all(r["err"] < 1e-6 for r in rows)  # fp32 on the CPU: both against fp64
    md = (tmp_path / "bench_skinny.md").read_text()
    assert "| tnl-tiny | 20 | glu | 704 x 256 |" in md
