"""The decode step with TNL's prologue fused (``lightning_attention_step(..., silu_qk=True, keep=...)``): SiLU of q
and k and the padding select done inside the step, against the same step on explicitly prepared inputs.

The reference checks run everywhere; the kernel checks on a CUDA GPU, or on the CPU under Triton's interpreter in
a subprocess (``tests/triton_targets.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from megatron_tnllm.ops import lightning_attention_step
from tests.testing import rel_err
from tests.triton_targets import CUDA, DEVICE, INTERPRET, cases, run_interpreter_suite

if not INTERPRET:

    @pytest.mark.skipif(
        tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8),
        reason=f"Triton {triton.__version__}'s interpreter gives program ids as 1-element arrays (see test_kernels)",
    )
    def test_interpreter_suite():
        run_interpreter_suite(__file__, timeout_s=300)


def qkvu_inputs(B: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int):
    """q, k, v [B, H, D] as the token mixer passes them: strided views into one [B, 4, H, D] projection output;
    a slope [H], an fp32 state [B, H, D, D] and keep [B] with one padding row (B >= 2)."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkvu = (torch.randn(B, 4, H, D, generator=g, device=device) * 2).to(dtype)
    q, k, v = qkvu[:, :3].unbind(1)
    state = torch.randn(B, H, D, D, generator=g, device=device)
    slope = torch.linspace(0.0, 2.0, H, device=device)
    keep = torch.ones(B, dtype=torch.bool, device=device)
    keep[1] = False
    return q, k, v, slope, state, keep


def explicit(q, k, v, keep):
    """The unfused prologue: F.silu in the inputs' dtype, v zeroed on padding rows."""
    return F.silu(q), F.silu(k), torch.where(keep[:, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_the_explicit_prologue(dtype):
    q, k, v, slope, state, keep = qkvu_inputs(3, 2, 8, dtype, "cpu", 0)
    fused = lightning_attention_step(q, k, v, slope, state.clone(), silu_qk=True, keep=keep, backend="torch")
    plain = lightning_attention_step(*explicit(q, k, v, keep), slope, state.clone(), backend="torch")
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    # the padding row only decays its state; the others also add k^T v
    decay = torch.exp(-slope)[:, None, None]
    torch.testing.assert_close(fused[1][1], state[1] * decay, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(fused[1][0], state[0] * decay, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (torch.ones(3, dtype=torch.int64), "keep must be a bool \\[B\\] = \\[3\\] tensor; got torch.int64"),
        (torch.ones(2, dtype=torch.bool), "keep must be a bool \\[B\\] = \\[3\\] tensor; got torch.bool \\(2,\\)"),
    ],
)
def test_bad_keep_is_refused(keep, message):
    q, k, v, slope, state, _ = qkvu_inputs(3, 2, 8, torch.float32, "cpu", 1)
    with pytest.raises(ValueError, match=message):
        lightning_attention_step(q, k, v, slope, state, keep=keep, backend="torch")


@pytest.mark.parametrize(
    ("B", "H", "D", "dtype", "tol"),
    cases(
        interpret=[(3, 2, 16, torch.float32, 1e-6)],
        cuda=[(2, 16, 128, torch.bfloat16, 5e-3), (64, 16, 128, torch.bfloat16, 5e-3), (3, 4, 64, torch.float32, 1e-5)],
    ),
)
def test_kernel_against_fp64_reference(B, H, D, dtype, tol):
    if not (INTERPRET or CUDA):
        pytest.skip("needs a CUDA GPU or the interpreter")
    q, k, v, slope, state, keep = qkvu_inputs(B, H, D, dtype, DEVICE, 2)
    # fp64 oracle on the inputs the unfused path would hand the kernel (SiLU rounded to the input dtype)
    ref_o, ref_s = lightning_attention_step(*explicit(q, k, v, keep), slope, state.double(), backend="torch")
    before = state.clone()
    o, s = lightning_attention_step(q, k, v, slope, state, inplace=True, silu_qk=True, keep=keep, backend="triton")
    assert s is state
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < 1e-6
    # the padding row's state only decayed (its v counted as zero)
    assert rel_err(s[1], before[1] * torch.exp(-slope)[:, None, None]) < 1e-6
