"""The three PyTorch forms of lightning attention agree with each other in fp64."""

import math

import pytest
import torch

from megatron_tnllm.ops import (
    backend,
    lightning_attention,
    lightning_attention_step,
    norm_gate_rstd,
    srmsnorm,
    srmsnorm_gate,
)
from megatron_tnllm.ops.lightning_attn import (
    lightning_attention_chunked,
    lightning_attention_quadratic,
    lightning_attention_recurrent,
)
from megatron_tnllm.ops.srmsnorm import sum_of_squares
from tests.testing import alibi, rel_err


def make_inputs(B, T, H, Dk, Dv, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    return q, k, v


SLOPES = {
    "alibi": lambda H: alibi(H, torch.float64),
    "zero": lambda H: torch.zeros(H, dtype=torch.float64),
    "strong": lambda H: torch.full((H,), 8.0, dtype=torch.float64),
    "mixed": lambda H: torch.tensor([0.0, 8.0, 0.5, 1e-4][:H], dtype=torch.float64),
}


@pytest.mark.parametrize("slopes", sorted(SLOPES))
@pytest.mark.parametrize("T,chunk", [(1, 4), (37, 8), (64, 16), (50, 64)])
@pytest.mark.parametrize("Dk,Dv", [(8, 8), (12, 6)])
def test_three_forms_agree_fp64(slopes, T, chunk, Dk, Dv):
    B, H = 2, 4
    q, k, v = make_inputs(B, T, H, Dk, Dv, seed=T * 7 + Dk)
    slope = SLOPES[slopes](H)
    h0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64)
    ref_o, ref_s = lightning_attention_quadratic(q, k, v, slope, h0, True)
    for form in (
        lambda *a: lightning_attention_chunked(*a, chunk_size=chunk),
        lightning_attention_recurrent,
    ):
        o, s = form(q, k, v, slope, h0, True)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert rel_err(o, ref_o) < 1e-12
        assert rel_err(s, ref_s) < 1e-12


def test_matches_explicit_sum():
    """An independent spelling of the definition, element by element."""
    q, k, v = make_inputs(1, 6, 1, 3, 2, seed=3)
    slope = torch.tensor([0.3], dtype=torch.float64)
    o, _ = lightning_attention_quadratic(q, k, v, slope)
    lam = math.exp(-0.3)
    for t in range(6):
        expect = sum(lam ** (t - s) * (q[0, t, 0] @ k[0, s, 0]) * v[0, s, 0] for s in range(t + 1))
        assert torch.allclose(o[0, t, 0], expect, rtol=1e-13, atol=0)


def test_strong_decay_is_finite_and_local():
    """slope 8 per token: lambda^t underflows; the output is (almost) the diagonal term alone."""
    q, k, v = make_inputs(1, 300, 2, 4, 4, seed=11, dtype=torch.float32)
    slope = torch.full((2,), 8.0)
    o, s = lightning_attention(q, k, v, slope, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    diag = (q * k).sum(-1, keepdim=True) * v
    assert rel_err(o.double(), diag.double()) < 1e-3


def test_cu_seqlens_resets_state():
    H, Dk, Dv = 3, 5, 4
    lens = [7, 1, 20, 13]
    q, k, v = make_inputs(1, sum(lens), H, Dk, Dv, seed=5)
    slope = SLOPES["alibi"](H)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    h0 = torch.randn(len(lens), H, Dk, Dv, dtype=torch.float64)
    o, s = lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = lightning_attention_quadratic(q[:, a:b], k[:, a:b], v[:, a:b], slope, h0[n : n + 1], True)
        assert rel_err(o[:, a:b], o_n) < 1e-12
        assert rel_err(s[n : n + 1], s_n) < 1e-12


def test_non_contiguous_views_give_the_same_result():
    """Megatron hands [s, b, h, d] views transposed to [b, s, h, d]."""
    q, k, v = make_inputs(3, 40, 2, 6, 6, seed=9)
    slope = SLOPES["alibi"](2)
    sbhd = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v)]
    assert not sbhd[0].is_contiguous()
    o1, _ = lightning_attention(q, k, v, slope)
    o2, _ = lightning_attention(*sbhd, slope)
    assert rel_err(o1, o2) < 1e-14


def test_gradients_match_between_forms():
    q, k, v = make_inputs(1, 33, 2, 4, 3, seed=1)
    slope = SLOPES["alibi"](2)
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    grads = []
    for form in (lightning_attention_quadratic, lambda *a: lightning_attention_chunked(*a, chunk_size=8)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
        o, s = form(*leaves[:3], slope, leaves[3], True)
        (o.sin().sum() + s.cos().sum()).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


def test_step_matches_sequence():
    B, T, H, Dk, Dv = 2, 9, 3, 4, 5
    q, k, v = make_inputs(B, T, H, Dk, Dv, seed=21)
    slope = SLOPES["alibi"](H)
    o_ref, s_ref = lightning_attention_quadratic(q, k, v, slope, None, True)
    state = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
    for t in range(T):
        o_t, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state, inplace=bool(t % 2))
        assert rel_err(o_t, o_ref[:, t]) < 1e-12
    assert rel_err(state, s_ref) < 1e-12


def test_bad_inputs_are_named():
    q, k, v = make_inputs(2, 8, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="slope must be"):
        lightning_attention(q, k, v, torch.zeros(3))
    with pytest.raises(ValueError, match="needs B = 1"):
        lightning_attention(q, k, v, torch.zeros(2), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="rise from 0"):
        lightning_attention(q[:1], k[:1], v[:1], torch.zeros(2), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, torch.zeros(2), initial_state=torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, torch.zeros(2), backend="cuda")


def test_srmsnorm_reference():
    x = torch.randn(3, 5, 64, dtype=torch.float64) * 3
    y = srmsnorm(x, 1e-6)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5, dtype=torch.float64), rtol=1e-5)
    xb = x.to(torch.bfloat16)
    assert srmsnorm(xb).dtype == torch.bfloat16


def test_gated_norm_references():
    """srmsnorm_gate = srmsnorm(x) * u, and norm_gate_rstd with the full row's rstd (from sum_of_squares, as across
    TP ranks) gives the same (fp64, torch); sum_of_squares is fp32 for bf16 input."""
    g = torch.Generator().manual_seed(4)
    x, u = (torch.randn(3, 5, 64, generator=g, dtype=torch.float64) for _ in range(2))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * u
    assert rel_err(srmsnorm_gate(x, u, 1e-6), expected) < 1e-14
    rstd = torch.rsqrt(sum_of_squares(x) / 64 + 1e-6)
    assert rel_err(norm_gate_rstd(x, u, rstd), expected) < 1e-14
    assert sum_of_squares(x.to(torch.bfloat16)).dtype == torch.float32
    assert srmsnorm_gate(x.float(), u.float()).dtype == torch.float32


@pytest.mark.skipif(backend.INTERPRET, reason="Triton's interpreter runs CPU tensors")
def test_triton_on_cpu_without_interpreter_is_refused():
    x = torch.randn(2, 16)
    for call in (
        lambda: srmsnorm(x, backend="triton"),
        lambda: lightning_attention(
            x[None, :, None], x[None, :, None], x[None, :, None], torch.zeros(1), backend="triton"
        ),  # fmt: skip
        lambda: lightning_attention_step(
            x[:, None], x[:, None], x[:, None], torch.zeros(1), torch.zeros(2, 1, 16, 16), backend="triton"
        ),  # fmt: skip
    ):
        with pytest.raises(RuntimeError, match="Triton on cpu tensors needs TRITON_INTERPRET=1"):
            call()
