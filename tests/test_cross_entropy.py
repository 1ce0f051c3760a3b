"""The vocabulary-parallel cross-entropy (``ops.cross_entropy``) against the fp64 oracle and against Megatron's
own ``vocab_parallel_cross_entropy``: the loss and the logits' gradient, one rank and the vocabulary split over two
gloo ranks; the Triton kernels under the interpreter (subprocess, small shapes) and on a CUDA GPU at tnl-1b's
per-GPU shape (8 x 2048 tokens, vocabulary 64000), outputs poisoned with NaN first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_tnllm.ops.cross_entropy import cross_entropy_torch, vocab_parallel_cross_entropy
from tests.distributed import run_distributed
from tests.testing import rel_err
from tests.triton_targets import (  # poisoned_outputs: autouse in this module
    DEVICE,
    INTERPRET,
    INTERPRETER_ONLY,
    cases,
    poisoned_outputs,  # noqa: F401
    run_interpreter_suite,
)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def batch(s: int, b: int, vocab: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple:
    """(logits [s, b, vocab] with a spread like a trained head's, target [s, b], dloss [s, b])."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, vocab, generator=g, dtype=F64) * 3).to(dtype)
    target = torch.randint(0, vocab, (s, b), generator=g)
    dloss = torch.rand(s, b, generator=g, dtype=F64) + 0.5
    return logits.to(device), target.to(device), dloss.to(device)


def loss_and_grad(fn, logits: torch.Tensor, target: torch.Tensor, dloss: torch.Tensor) -> tuple:
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, target)
    loss.backward(dloss.to(loss.dtype))
    return loss.detach(), leaf.grad


def oracle(logits: torch.Tensor, target: torch.Tensor, dloss: torch.Tensor) -> tuple:
    """Loss and gradient in fp64 of the logits as given (bf16 ones rounded already)."""
    return loss_and_grad(cross_entropy_torch, logits.double().cpu(), target.cpu(), dloss.double().cpu())


if not INTERPRET:

    def test_interpreter_suite():
        run_interpreter_suite(__file__, timeout_s=600)

    def test_torch_path_matches_oracle_fp64():
        logits, target, dloss = batch(7, 3, 50, F64, seed=0)
        loss, grad = loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t), logits, target, dloss)
        ref_loss, ref_grad = oracle(logits, target, dloss)
        assert loss.dtype == F64 and loss.shape == (7, 3)
        assert rel_err(loss, ref_loss) < 1e-14 and rel_err(grad, ref_grad) < 1e-14

    def test_rejects_bad_input():
        logits, target, _ = batch(4, 2, 10, F32, seed=1)
        with pytest.raises(ValueError, match=r"target shape \(4,\) must equal .* \(4, 2\)"):
            vocab_parallel_cross_entropy(logits, target[:, 0])
        with pytest.raises(TypeError, match="integer token ids; got torch.float32"):
            vocab_parallel_cross_entropy(logits, target.float())
        with pytest.raises(TypeError, match="floating tensor"):
            vocab_parallel_cross_entropy(target, target[..., 0])

    def _two_ranks(rank: int, world: int) -> None:
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        group = parallel_state.get_tensor_model_parallel_group()
        vocab = 2 * 37
        # fp64: the split combine equals the whole-vocabulary oracle
        logits, target, dloss = batch(9, 2, vocab, F64, seed=2)
        shard = slice(rank * vocab // world, (rank + 1) * vocab // world)
        loss, grad = loss_and_grad(
            lambda x, t: vocab_parallel_cross_entropy(x, t, group), logits[..., shard], target, dloss
        )
        ref_loss, ref_grad = oracle(logits, target, dloss)
        assert rel_err(loss, ref_loss) < 1e-14, rel_err(loss, ref_loss)
        assert rel_err(grad, ref_grad[..., shard]) < 1e-14, rel_err(grad, ref_grad[..., shard])
        # fp32: Megatron's own vocab_parallel_cross_entropy gives the same loss and gradient
        logits32 = logits[..., shard].float()
        ours = loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t, group), logits32, target, dloss)
        megatron = loss_and_grad(
            lambda x, t: tensor_parallel.vocab_parallel_cross_entropy(x, t, tp_group=group), logits32, target, dloss
        )
        for a, b, what in zip(ours, megatron, ("loss", "gradient"), strict=True):
            assert rel_err(a, b) < 1e-6, f"rank {rank}: {what} off Megatron's by {rel_err(a, b):.1e}"
        dist.barrier()

    def test_vocabulary_split_over_two_ranks():
        run_distributed(_two_ranks, 2)


# (loss, gradient) against fp64. The loss: a few fp32 roundings. The gradient: exp(x - lse) with lse ~ 15 at these
# logits, whose fp32 ulp (~1e-6) is the relative error of x - lse and so of the exp (GPU: ex2.approx adds ~2e-7);
# bf16 / fp16: then rounded once to the logits' dtype (the interpreter truncates).
TOL = {F32: (1e-6, 4e-6), F16: (1e-6, 2e-3), BF16: (1e-6, 8e-3)}


@pytest.mark.parametrize(
    "shape, dtype",
    cases(
        interpret=[((5, 2, 5000), F32), ((3, 1, 70), BF16), ((4, 2, 4097), F16)],
        cuda=[((2048, 8, 64000), BF16), ((1024, 1, 32000), F32), ((4096, 1, 50257), F16)],
    ),
)
def test_kernels_match_oracle(shape, dtype):
    logits, target, dloss = batch(*shape, dtype, seed=3, device=DEVICE)
    loss, grad = loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t, backend="triton"), logits, target, dloss)
    ref_loss, ref_grad = oracle(logits, target, dloss)
    assert loss.dtype == F32 and grad.dtype == dtype
    assert torch.isfinite(grad).all(), "gradient has NaN/Inf (unwritten?)"
    loss, grad = loss.cpu(), grad.cpu()  # the oracle ran on the CPU
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(loss, ref_loss) < loss_tol, rel_err(loss, ref_loss)
    assert rel_err(grad, ref_grad) < grad_tol, rel_err(grad, ref_grad)
    print(f"\n{tuple(shape)} {dtype}: loss {rel_err(loss, ref_loss):.1e}, gradient {rel_err(grad, ref_grad):.1e}")


@INTERPRETER_ONLY
def test_kernels_on_one_rank_share_of_the_vocabulary():
    """The kernels of rank 1 of 3 (columns 40..79 of 120, rows read through a stride): its max, sum of exps and
    target logit (0 for other ranks' targets), and its columns' gradient for a given log-sum-exp."""
    from megatron_tnllm.ops.cross_entropy.fused import logits_grad_triton, row_stats_triton
    from megatron_tnllm.ops.cross_entropy.naive import logits_grad_torch, row_stats_torch

    logits, target, dloss = batch(6, 1, 120, F32, seed=4)
    wide = torch.zeros(6, 200)
    wide[:, :40] = logits[:, 0, 40:80]
    x, t = wide[:, :40], target[:, 0]
    t[0] = 45  # make sure at least one target falls in this rank's columns
    stats = row_stats_triton(x, t, vocab_start=40)
    ref = row_stats_torch(x.double(), t, vocab_start=40)
    assert rel_err(stats, ref) < 1e-6
    assert stats[2, 0] == x[0, 5] and all(stats[2, r] == 0 for r in range(6) if not 40 <= t[r] < 80)
    lse = torch.logsumexp(logits[:, 0].double(), -1)
    grad = logits_grad_triton(x, t, lse.float(), dloss[:, 0].float(), vocab_start=40)
    assert rel_err(grad, logits_grad_torch(x.double(), t, lse, dloss[:, 0], vocab_start=40)) < 1e-6


@INTERPRETER_ONLY
def test_bench_cross_entropy_smoke(tmp_path, monkeypatch):
    """tools/bench/bench_cross_entropy.py --smoke (CPU, interpreter): every case measured, each loss equal to
    Megatron's, the table written, so the GPU run fails on no typo."""
    from tests.distributed import _free_port

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    import bench_cross_entropy

    monkeypatch.setattr(sys, "argv", ["bench_cross_entropy.py", "--smoke", "--out", str(tmp_path)])
    bench_cross_entropy.main()
    rows = json.loads((tmp_path / "bench_cross_entropy.json").read_text())["shapes"][0]["rows"]
    assert {(r["case"], r["mode"]) for r in rows} == {
        (c, m) for c in ("megatron", "megatron_native_fused", "tnl") for m in ("fwd", "fwd+bwd")
    }
    assert all(r["loss_max_rel_diff_to_megatron"] < 1e-6 for r in rows)
    assert "| smoke (1) | 16 x 300 | tnl |" in (tmp_path / "bench_cross_entropy.md").read_text()
