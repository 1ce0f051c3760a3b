"""A non-finite input at position t reaches only what depends on t; bad arguments get one-line errors.

Dependencies of the operator (o_s = sum_{j <= s} lambda^(s-j) (q_s . k_j) v_j): o_s and dq_s depend on positions
<= s, dk_s and dv_s on positions >= s (and dk_s on v_s, dv_s on k_s). ``check_nan_stays_causal`` plants a NaN or
inf in one input at (t, head, column) and checks that every output that does not depend on it equals the fp64
reference on the clean inputs, and that the ones that do are non-finite. The same check runs the Triton kernels
under the interpreter and on a GPU (tests/test_kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from megatron_tnllm.ops import lightning_attention, lightning_attention_step
from megatron_tnllm.ops.lightning_attn import (
    lightning_attention_chunked,
    lightning_attention_quadratic,
    lightning_attention_recurrent,
)

# input planted -> {output: rows equal to the clean reference ("<t", ">t", "!=t", "all")}, and the output row t
# that must be non-finite
CLEAN_ROWS = {
    "v": ({"o": "<t", "dq": "<t", "dk": "!=t", "dv": "all"}, "o"),
    "k": ({"o": "<t", "dq": "<t", "dk": "all", "dv": "!=t"}, "o"),
    "q": ({"o": "!=t", "dq": "all", "dk": ">t", "dv": ">t"}, "o"),
    "do": ({"o": "all", "dq": "!=t", "dk": ">t", "dv": ">t"}, "dq"),
}


def _rows(sel: str, T: int, t: int) -> torch.Tensor:
    r = torch.arange(T)
    return {"<t": r < t, ">t": r > t, "!=t": r != t, "all": r >= 0}[sel]


def run_fwd_bwd(fn: Callable, q, k, v, slope, do) -> dict[str, torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, slope)
    o.backward(do)
    return {"o": o.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def check_nan_stays_causal(fn: Callable, name: str, bad: float, dtype: torch.dtype, tol: float, device="cpu",
                           B=1, T=70, H=2, D=16, t=37) -> None:  # fmt: skip
    """fn(q, k, v, slope) -> o, differentiable. Plants ``bad`` in input ``name`` at (batch 0, t, head 1, col 3)."""
    g = torch.Generator().manual_seed(T + t)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    slope = torch.tensor([0.0, 0.05, 8.0, 0.5][:H], dtype=torch.float64)
    clean = run_fwd_bwd(lightning_attention_quadratic_o, q, k, v, slope, do)
    inputs = {"q": q, "k": k, "v": v, "do": do}
    planted = inputs[name].clone()
    planted[0, t, 1, 3] = bad
    inputs[name] = planted
    args = [inputs[x].to(device=device, dtype=dtype) for x in ("q", "k", "v")]
    got = run_fwd_bwd(fn, *args, slope.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype),
                      inputs["do"].to(device=device, dtype=dtype))  # fmt: skip
    rows, poisoned = CLEAN_ROWS[name]
    for out, sel in rows.items():
        m = _rows(sel, T, t)
        a, b = got[out].double().cpu()[:, m], clean[out][:, m]
        assert torch.isfinite(a).all(), f"{name}={bad} at t={t} reached {out} at rows {sel}"
        err = ((a - b).norm() / b.norm()).item()
        assert err < tol, f"{name}={bad}: {out}[{sel}] rel err {err:.2e}"
    assert not torch.isfinite(got[poisoned][0, t, 1]).all(), f"{name}={bad} at t={t} vanished from {poisoned}[t]"


def lightning_attention_quadratic_o(q, k, v, slope):
    return lightning_attention_quadratic(q, k, v, slope)[0]


REFERENCES = {
    "quadratic": lightning_attention_quadratic_o,
    "chunked": lambda q, k, v, s: lightning_attention_chunked(q, k, v, s, chunk_size=16)[0],
    "recurrent": lambda q, k, v, s: lightning_attention_recurrent(q, k, v, s)[0],
}


@pytest.mark.parametrize("form", sorted(REFERENCES))
@pytest.mark.parametrize("name", sorted(CLEAN_ROWS))
def test_reference_nan_stays_causal(form, name):
    bad = float("inf") if name == "k" else float("nan")
    check_nan_stays_causal(REFERENCES[form], name, bad, torch.float64, 1e-10, T=40, t=21)


def test_empty_inputs_are_refused():
    x = torch.zeros(1, 0, 2, 4)
    with pytest.raises(ValueError, match="must not be empty"):
        lightning_attention(x, x, x, torch.zeros(2))
    y = torch.zeros(1, 3, 2, 0)
    with pytest.raises(ValueError, match="must not be empty"):
        lightning_attention(y, y, y, torch.zeros(2))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), float("-inf")])
def test_negative_or_non_finite_slopes_are_refused(bad):
    q = torch.randn(1, 4, 2, 4)
    slope = torch.tensor([0.1, bad])
    with pytest.raises(ValueError, match="slope must be finite and >= 0"):
        lightning_attention(q, q, q, slope)
    state = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="slope must be finite and >= 0"):
        lightning_attention_step(q[:, 0], q[:, 0], q[:, 0], slope, state)


def test_non_float_inputs_are_refused():
    q = torch.randn(1, 4, 2, 4)
    with pytest.raises(TypeError, match="v must be a floating-point tensor; got torch.int64"):
        lightning_attention(q, q, torch.ones(1, 4, 2, 4, dtype=torch.long), torch.zeros(2))
    with pytest.raises(TypeError, match="slope must be a floating-point tensor; got torch.int64"):
        lightning_attention(q, q, q, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        lightning_attention_step(torch.ones(1, 2, 4, dtype=torch.int32), q[:, 0], q[:, 0], torch.zeros(2),
                                 torch.zeros(1, 2, 4, 4))  # fmt: skip
