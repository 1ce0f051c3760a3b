"""The fused elementwise ops around the GEMMs (``ops.glu``: SGLU's gated product; ``ops.qkvu``: the token mixer's
qkvu split with SiLU, and with LRPE on LRPE layers) against their fp64 PyTorch references, forward and every
gradient (theta's included).

As in tests/test_kernels.py, the Triton cases run on the CPU under Triton's interpreter in a subprocess
(``test_interpreter_suite``: TRITON_INTERPRET=1 must be set before the kernels are decorated) at small shapes,
and on a CUDA GPU at the per-GPU shapes of tnl-1b (16384 tokens, D 2048, F 5632) and tnl-7b TP=2 with every
kernel output poisoned with NaN first (skipped without CUDA). The PyTorch-backend cases run in the normal process.

Bits: the product of two bf16/fp16 numbers is exact in fp32, so rounding it once gives torch's ``a * b``
bit for bit. The GPU checks that for bf16; the interpreter rounds fp32 -> bf16 by truncation (not as the GPU
does), so there the bit check runs in fp16, which it rounds to nearest even.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_tnllm.layers.token_mixer import TokenMixer
from megatron_tnllm.ops.glu import glu_product
from megatron_tnllm.ops.lrpe import apply_lrpe, lrpe_theta_init
from megatron_tnllm.ops.qkvu import qkvu_silu
from tests.testing import rel_err
from tests.triton_targets import (  # poisoned_outputs: autouse in this module
    CUDA,
    DEVICE,
    INTERPRET,
    INTERPRETER_ONLY,
    cases,
    poisoned_outputs,  # noqa: F401
    run_interpreter_suite,
)

TRITON = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton: the interpreter subprocess or a CUDA GPU")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# fp32 against fp64: one rounding of each output; bf16: a few bf16 roundings (the interpreter truncates)
TOL = {F32: 1e-6, F16: 2e-3, BF16: 8e-3}

if INTERPRET or CUDA:
    from megatron_tnllm.ops.qkvu import fused


if not INTERPRET:

    def test_interpreter_suite():
        run_interpreter_suite(__file__, timeout_s=600)


def randn(*shape: int, dtype: torch.dtype, seed: int, device: str = DEVICE) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def grads_of(fn, x: torch.Tensor, dys: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """fn(leaf) -> output(s); backward with dys (None: that output unused) -> (outputs, leaf's gradient)."""
    leaf = x.detach().clone().requires_grad_()
    outs = fn(leaf)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    used = [(o, dy) for o, dy in zip(outs, dys, strict=True) if dy is not None]
    torch.autograd.backward([o for o, _ in used], [dy.to(o.dtype) for o, dy in used])
    return outs, leaf.grad


def assert_close(name: str, a: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert a.shape == ref.shape, (name, tuple(a.shape), tuple(ref.shape))
    assert torch.isfinite(a).all(), f"{name} has NaN/Inf (unwritten?)"
    err = rel_err(a, ref)
    assert err < tol, f"{name}: rel err {err:.2e} over {tol}"


# ---------------------------------------------------------------------------------------------------------------
# gated product (SGLU)
# ---------------------------------------------------------------------------------------------------------------


@TRITON
@pytest.mark.parametrize(
    "shape,dtype",
    cases(
        interpret=[((3, 5, 2 * 40), F32), ((2, 7, 2 * 1100), F32), ((9, 2 * 37), BF16)],
        cuda=[((2048, 8, 2 * 5632), BF16), ((4096, 2 * 5504), BF16), ((300, 2 * 1000), F32)],
    ),
)
def test_glu_product_matches_fp64(shape, dtype):
    """y and dx (both halves) against the fp64 reference; F not a multiple of the tile exercises the masks."""
    x = randn(*shape, dtype=dtype, seed=1)
    dy = randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=2)
    (y,), dx = grads_of(lambda t: glu_product(t, backend="triton"), x, [dy])
    (ry,), rdx = grads_of(lambda t: glu_product(t, backend="torch"), x.double(), [dy.double()])
    assert_close("y", y, ry, TOL[dtype])
    assert_close("dx", dx, rdx, TOL[dtype])


@TRITON
@pytest.mark.parametrize("dtype", cases(interpret=[F16], cuda=[BF16, F16]))
def test_glu_product_bits_equal_torch(dtype):
    """Forward and backward give torch's own products bit for bit, also from a row-strided input (a slice of a
    wider tensor) and a zero-stride gradient (y.sum())."""
    wide = randn(64, 2 * 300 + 16, dtype=dtype, seed=3) * 4
    x = wide[:, 8 : 8 + 600]  # rows 616 apart
    a, b = x[:, :300], x[:, 300:]
    dy = randn(64, 300, dtype=dtype, seed=4)
    (y,), dx = grads_of(lambda t: glu_product(t, backend="triton"), x, [dy])
    assert torch.equal(y, a * b)
    assert torch.equal(dx, torch.cat([dy * b, dy * a], -1))
    leaf = x.detach().clone().requires_grad_()
    glu_product(leaf, backend="triton").sum().backward()
    assert torch.equal(leaf.grad, torch.cat([b, a], -1))


def test_glu_product_torch_backend_is_megatrons_gated_path():
    """The PyTorch path equals Megatron's non-fused gated MLP (chunk, + glu_linear_offset 0.0, product) in value,
    forward and backward; odd widths are refused."""
    x = randn(4, 3, 2 * 24, dtype=BF16, seed=5, device="cpu")
    dy = randn(4, 3, 24, dtype=BF16, seed=6, device="cpu")

    def megatron(t):
        x_glu, x_linear = torch.chunk(t, 2, dim=-1)
        return x_glu * (x_linear + 0.0)

    (y,), dx = grads_of(lambda t: glu_product(t, backend="torch"), x, [dy])
    (ry,), rdx = grads_of(megatron, x, [dy])
    assert torch.equal(y, ry) and torch.equal(dx, rdx)
    with pytest.raises(ValueError, match="even last dimension"):
        glu_product(torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------------------------
# qkvu split + SiLU (token mixer)
# ---------------------------------------------------------------------------------------------------------------

ALL_GRADS = (True, True, True, True)


@TRITON
@pytest.mark.parametrize(
    "lead,H,d,dtype,used",
    cases(
        interpret=[
            ((3, 2), 2, 8, F32, ALL_GRADS),
            ((5, 1), 3, 40, F32, ALL_GRADS),  # L = 120: a masked column tile
            ((4, 2), 2, 8, F32, (True, False, False, True)),  # absent dk, dv: zeros
            ((4, 2), 2, 8, F32, (False, True, True, False)),
            ((3, 2), 2, 16, BF16, ALL_GRADS),
        ],
        cuda=[
            ((2048, 8), 16, 128, BF16, ALL_GRADS),  # tnl-1b: 16384 tokens, D 2048
            ((4096, 1), 16, 128, BF16, ALL_GRADS),  # tnl-7b TP = 2: D / TP 2048
            ((1000, 2), 4, 128, BF16, (True, False, True, False)),
            ((300, 2), 4, 96, F32, ALL_GRADS),
        ],
    ),
)
def test_qkvu_silu_matches_fp64(lead, H, d, dtype, used):
    """SiLU(q), SiLU(k), v, u and the one qkvu gradient against the fp64 reference (outputs without a gradient
    count as zero); v and u are views of qkvu, q and k contiguous."""
    L = H * d
    x = randn(*lead, 4 * L, dtype=dtype, seed=7)
    dys = [randn(*lead, H, d, dtype=dtype, seed=8 + i) for i in range(3)] + [randn(*lead, L, dtype=dtype, seed=11)]
    dys = [dy if u else None for dy, u in zip(dys, used, strict=True)]
    outs, dx = grads_of(lambda t: qkvu_silu(t, H, d, backend="triton"), x, dys)
    ref_dys = [None if g is None else g.double() for g in dys]
    refs, rdx = grads_of(lambda t: qkvu_silu(t, H, d, backend="torch"), x.double(), ref_dys)
    for name, a, r in zip("qkvu", outs, refs, strict=True):
        assert_close(name, a, r, TOL[dtype])
    assert_close("dqkvu", dx, rdx, TOL[dtype])
    q, k, v, u = qkvu_silu(x, H, d, backend="triton")
    assert q.is_contiguous() and k.is_contiguous()
    assert v.data_ptr() == x[..., 2 * L :].data_ptr() and u.data_ptr() == x[..., 3 * L :].data_ptr()
    assert v.shape == (*lead, H, d) and u.shape == (*lead, L)


# ---------------------------------------------------------------------------------------------------------------
# qkvu split + SiLU + LRPE (the token mixer's LRPE layers)
# ---------------------------------------------------------------------------------------------------------------


def lrpe_positions(s: int, starts: tuple[int, ...] = ()) -> torch.Tensor:
    """The mixer's token positions [s] (restarting at each packed sequence start in ``starts``)."""
    cu = torch.tensor([0, *starts, s]) if starts else None
    return TokenMixer._positions(s, cu, torch.device(DEVICE))


def lrpe_fp64(x: torch.Tensor, H: int, d: int, theta: torch.Tensor, positions: torch.Tensor):
    """The fp64 oracle of the LRPE split: x [s, ..., 4 H d] and theta [H, 1, d] fp64 leaves. The angles take the
    fp32 values ``apply_lrpe`` forms (positions.float() * theta.float(), rounded once) and the gradient d/dtheta =
    p of the exact product."""
    q, k, v, u = qkvu_silu(x, H, d, backend="torch")
    th = theta.view(H, d)
    p = positions.view(-1, *[1] * (x.dim() - 2), 1, 1)  # [s, 1.., 1, 1]
    t32 = (p.float() * th.detach().float()).double()
    t = t32 + p.double() * (th - th.detach())
    q, k = (torch.cat([a * torch.cos(t), a * torch.sin(t)], -1) for a in (q, k))
    return q, k, v, u


def lrpe_grads(fn, x: torch.Tensor, theta: torch.Tensor, dys: list[torch.Tensor | None], theta_grad: bool = True):
    """fn(x leaf, theta leaf) -> (q, k, v, u); backward with dys (None: unused) -> (outputs, dx, dtheta)."""
    xl = x.detach().clone().requires_grad_()
    th = theta.detach().clone().requires_grad_(theta_grad)
    outs = fn(xl, th)
    used = [(o, dy) for o, dy in zip(outs, dys, strict=True) if dy is not None]
    torch.autograd.backward([o for o, _ in used], [dy.to(o.dtype) for o, dy in used])
    return outs, xl.grad, th.grad


LRPE_INTERPRET = [
    # s, b, H, d, dtype, theta dtype, used, packed starts, theta grad, TILE (elements per program)
    (37, 2, 3, 8, F32, F32, ALL_GRADS, (9, 20), True, 256),  # L 24: masked columns and last position block
    (13, 1, 2, 16, F32, F32, ALL_GRADS, (), True, 4096),  # the default tiles: one position block
    (12, 2, 2, 8, F32, F32, (True, False, False, True), (5,), True, 32),  # absent dk, dv: zeros
    (12, 2, 2, 8, F32, F32, (False, True, True, False), (), True, 32),  # dtheta from k alone
    (10, 2, 2, 8, F32, F32, ALL_GRADS, (), False, 32),  # theta without a gradient
    (9, 2, 2, 16, BF16, BF16, ALL_GRADS, (4,), True, 4096),  # bf16 params: theta bf16
]
LRPE_CUDA = [
    (2048, 8, 16, 128, BF16, F32, ALL_GRADS, (), True, None),  # tnl-1b: 16384 tokens, H 16, d 128
    (4096, 1, 16, 128, BF16, BF16, ALL_GRADS, (1000, 3000), True, None),  # tnl-7b TP = 2, packed, bf16 params
    (16384, 1, 4, 128, F32, F32, ALL_GRADS, (), True, None),  # fp32, angles up to 16383 rad
    (1000, 2, 4, 96, F32, F32, (False, True, False, True), (300,), True, None),
]


@TRITON
@pytest.mark.parametrize(
    "s,b,H,d,dtype,theta_dtype,used,starts,theta_grad,tile", cases(interpret=LRPE_INTERPRET, cuda=LRPE_CUDA)
)
def test_qkvu_silu_lrpe_matches_fp64(s, b, H, d, dtype, theta_dtype, used, starts, theta_grad, tile, monkeypatch):
    """q' = [SiLU(q) cos | SiLU(q) sin], k', v, u, the one qkvu gradient and theta's gradient against the fp64
    oracle, packed-sequence positions restarting; outputs without a gradient count as zero; q', k' contiguous
    [s, b, H, 2d]. The interpreter shrinks the tiles so that theta's gradient sums over many programs' partial
    sums and the last position block is masked."""
    if tile is not None:
        monkeypatch.setattr(fused, "TILE", tile)
    L = H * d
    x = randn(s, b, 4 * L, dtype=dtype, seed=21)
    theta = lrpe_theta_init(H, d).to(DEVICE, theta_dtype)
    positions = lrpe_positions(s, starts)
    dys = [randn(s, b, H, 2 * d, dtype=dtype, seed=22 + i) for i in range(2)]
    dys += [randn(s, b, H, d, dtype=dtype, seed=24), randn(s, b, L, dtype=dtype, seed=25)]
    dys = [dy if u else None for dy, u in zip(dys, used, strict=True)]

    def fused_op(t, th):
        return qkvu_silu(t, H, d, theta=th, positions=positions, backend="triton")

    outs, dx, dtheta = lrpe_grads(fused_op, x, theta, dys, theta_grad)
    ref_dys = [None if g is None else g.double() for g in dys]
    refs, rdx, rdtheta = lrpe_grads(
        lambda t, th: lrpe_fp64(t, H, d, th, positions), x.double(), theta.double(), ref_dys
    )
    for name, a, r in zip("qkvu", outs, refs, strict=True):
        assert_close(name, a, r, TOL[dtype])
    assert outs[0].is_contiguous() and outs[1].is_contiguous() and outs[0].shape == (s, b, H, 2 * d)
    assert_close("dqkvu", dx, rdx, TOL[dtype])
    if theta_grad:
        assert dtheta.dtype == theta_dtype
        assert_close("dtheta", dtheta, rdtheta, 2e-5 if theta_dtype == F32 else TOL[BF16])
    else:
        assert dtheta is None


@TRITON
def test_qkvu_silu_lrpe_in_attention_layout():
    """The token mixer's use on an LRPE layer: the [b, s] transposes the attention kernels read, part of q' used
    twice and a zero-stride gradient for u (u.sum()); the qkvu and theta gradients match fp64."""
    s, b, H, d = 6, 2, 2, 8
    x = randn(s, b, 4 * H * d, dtype=F32, seed=12)
    theta = lrpe_theta_init(H, d).to(DEVICE)
    positions = lrpe_positions(s, (4,))
    w = randn(b, s, H, 2 * d, dtype=F32, seed=13)

    def mixer_input(q, k, v, u):
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        return ((qt * w.to(q.dtype)).sum() + (kt * kt).sum() + (vt * qt[..., :d]).sum() + u.sum(),)

    one = torch.ones((), device=DEVICE)
    _, dx, dtheta = lrpe_grads(
        lambda t, th: mixer_input(*qkvu_silu(t, H, d, theta=th, positions=positions, backend="triton")),
        x,
        theta,
        [one],
    )
    _, rdx, rdtheta = lrpe_grads(
        lambda t, th: mixer_input(*lrpe_fp64(t, H, d, th, positions)), x.double(), theta.double(), [one.double()]
    )
    assert_close("dqkvu", dx, rdx, TOL[F32])
    assert_close("dtheta", dtheta, rdtheta, 2e-5)


def test_qkvu_silu_lrpe_torch_backend_is_the_mixers_former_path():
    """The PyTorch path with LRPE is the mixer's former code (SiLU, then ``apply_lrpe`` with positions [s, 1]),
    forward and backward (qkvu and theta), bit for bit; a theta or positions that do not fit are refused."""
    s, b, H, d = 7, 2, 3, 4
    x = randn(s, b, 4 * H * d, dtype=BF16, seed=26, device="cpu")
    theta = lrpe_theta_init(H, d).to(BF16)
    positions = TokenMixer._positions(s, torch.tensor([0, 3, s]), torch.device("cpu"))
    dys = [randn(s, b, H, 2 * d, dtype=BF16, seed=27 + i, device="cpu") for i in range(2)]
    dys += [randn(s, b, H, d, dtype=BF16, seed=29, device="cpu"), randn(s, b, H * d, dtype=BF16, seed=30, device="cpu")]

    def former(t, th):
        q, k, v, u = qkvu_silu(t, H, d, backend="torch")
        return apply_lrpe(q, th, positions[:, None]), apply_lrpe(k, th, positions[:, None]), v, u

    outs, dx, dtheta = lrpe_grads(
        lambda t, th: qkvu_silu(t, H, d, theta=th, positions=positions, backend="torch"), x, theta, dys
    )
    refs, rdx, rdtheta = lrpe_grads(former, x, theta, dys)
    assert all(torch.equal(a, r) for a, r in zip(outs, refs, strict=True))
    assert torch.equal(dx, rdx) and torch.equal(dtheta, rdtheta)
    with pytest.raises(ValueError, match="both theta and positions"):
        qkvu_silu(x, H, d, theta=theta)
    with pytest.raises(ValueError, match=r"positions must be integers of shape \[s\]"):
        qkvu_silu(x, H, d, theta=theta, positions=positions[:-1])
    with pytest.raises(ValueError, match=r"theta must be \[heads, 1, head_dim\] = \[3, 1, 4\]"):
        qkvu_silu(x, H, d, theta=theta[:2], positions=positions)


def test_qkvu_silu_torch_backend_is_the_mixers_split():
    """The PyTorch path equals the mixer's former code (views of [s, b, 3, h, d], SiLU on q, k), forward and
    backward, bit for bit; a width that is not 4 H d is refused."""
    s, b, H, d = 5, 2, 3, 4
    x = randn(s, b, 4 * H * d, dtype=BF16, seed=14, device="cpu")
    dys = [randn(s, b, H, d, dtype=BF16, seed=15 + i, device="cpu") for i in range(3)]
    dys.append(randn(s, b, H * d, dtype=BF16, seed=18, device="cpu"))

    def former(t):
        q, k, v = t[..., : 3 * H * d].view(s, b, 3, H, d).unbind(2)
        return F.silu(q), F.silu(k), v, t[..., 3 * H * d :]

    outs, dx = grads_of(lambda t: qkvu_silu(t, H, d, backend="torch"), x, dys)
    refs, rdx = grads_of(former, x, dys)
    assert all(torch.equal(a, r) for a, r in zip(outs, refs, strict=True)) and torch.equal(dx, rdx)
    with pytest.raises(ValueError, match="4 \\* heads \\* head_dim = 48"):
        qkvu_silu(torch.zeros(2, 40), H, d)


@INTERPRETER_ONLY
def test_bench_fusion_smoke(tmp_path, monkeypatch):
    """tools/bench/bench_fusion.py --smoke (CPU, interpreter) writes its table, so the GPU run fails on no typo."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    import bench_fusion

    monkeypatch.setattr(sys, "argv", ["bench_fusion.py", "--smoke", "--out", str(tmp_path)])
    bench_fusion.main()
    rows = json.loads((tmp_path / "bench_fusion.json").read_text())["shapes"][0]["rows"]
    assert {(r["op"], r["case"], r["mode"]) for r in rows} == {
        (op, case, mode) for op in ("glu", "qkvu", "lrpe") for case in ("old", "fused") for mode in ("fwd", "fwd+bwd")
    }
    md = (tmp_path / "bench_fusion.md").read_text()
    assert "| smoke (1) | qkvu | 16 x 32 | fused |" in md and "| smoke (1) | lrpe | 16 x 32 | fused |" in md


def _layers_worker(rank, world, out):
    """tnl-tiny (LRPE on layer 0), fp32: loss and every gradient with the layers' ops forced to Triton (interpreted)
    and to PyTorch; saved to ``out``."""
    from megatron.core import parallel_state

    from megatron_tnllm.configs import get_preset
    from megatron_tnllm.layers import sglu, token_mixer
    from megatron_tnllm.models import build_model
    from tests.megatron_utils import fixed_batch, loss_of

    parallel_state.initialize_model_parallel()
    preset = get_preset("tnl-tiny")
    results = {}
    for be in ("triton", "torch"):
        sglu.glu_product = functools.partial(glu_product, backend=be)
        token_mixer.qkvu_silu = functools.partial(qkvu_silu, backend=be)
        torch.manual_seed(0)
        model = build_model(preset, use_cpu_initialization=True)
        loss = loss_of(model, fixed_batch(preset.vocab_size))
        loss.backward()
        results[be] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.save(results, out / "results.pt")


@INTERPRETER_ONLY
def test_layers_run_the_fused_ops(tmp_path):
    """The TNL layers (SGLU, the token mixer with and without LRPE) with the Triton ops (LRPE fused into the qkvu
    split on layer 0) give the loss and every parameter gradient of the PyTorch ops, lrpe_theta's included."""
    from tests.distributed import run_distributed

    run_distributed(_layers_worker, 1, tmp_path)
    results = torch.load(tmp_path / "results.pt")
    (loss, grads), (ref_loss, ref_grads) = results["triton"], results["torch"]
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and any("qkvu" in n for n in grads) and any("fc1" in n for n in grads)
    assert [n for n in grads if "lrpe_theta" in n] == ["decoder.layers.0.self_attention.lrpe_theta"]
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, name
