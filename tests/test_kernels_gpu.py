"""The Triton kernels on a CUDA GPU (skipped without one): bf16/fp16/fp32 against fp64 PyTorch references.

Every case draws fresh random inputs, poisons every kernel output with NaN first (so an unwritten element
fails), and gates the relative error ||x - ref|| / ||ref|| of o, the final state, dq, dk, dv and dh0.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from megatron_tnllm.ops import lightning_attention, lightning_attention_step, srmsnorm
    from megatron_tnllm.ops.lightning_attn import chunk as chunk_mod
    from megatron_tnllm.ops.lightning_attn.naive import lightning_attention_chunked
    from megatron_tnllm.ops.srmsnorm import fused as fused_norm
    from megatron_tnllm.ops.srmsnorm import norm_gate_rstd, srmsnorm_gate

TOL = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def poison():
    chunk_mod.POISON_OUTPUTS = True
    fused_norm.POISON_OUTPUTS = True
    yield
    chunk_mod.POISON_OUTPUTS = False
    fused_norm.POISON_OUTPUTS = False


def alibi(H: int, extremes: bool = True) -> torch.Tensor:
    s = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    if extremes and H >= 3:  # one head without decay, one at slope 8
        s[0], s[-1] = 0.0, 8.0
    return s.cuda()


def randn(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def check(q, k, v, slope, h0, cu=None, dtype=torch.bfloat16, ref_chunk=256):
    gen = torch.Generator(device="cuda").manual_seed(q.shape[1] + 17)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    h0l = None if h0 is None else h0.detach().clone().requires_grad_()
    o, ht = lightning_attention(*leaves, slope, initial_state=h0l, output_final_state=True, cu_seqlens=cu)
    do = randn(*o.shape, gen=gen, dtype=o.dtype)
    dht = randn(*ht.shape, gen=gen, dtype=torch.float32)
    torch.autograd.backward([o, ht], [do, dht])

    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rh0 = None if h0 is None else h0.detach().double().requires_grad_()
    ro, rht = lightning_attention_chunked(*refs, slope.double(), rh0, True, cu_seqlens=cu, chunk_size=ref_chunk)
    torch.autograd.backward([ro, rht], [do.double(), dht.double()])

    pairs = {"o": (o, ro), "ht": (ht, rht), "dq": (leaves[0].grad, refs[0].grad)}
    pairs.update({"dk": (leaves[1].grad, refs[1].grad), "dv": (leaves[2].grad, refs[2].grad)})
    if h0 is not None:
        pairs["dh0"] = (h0l.grad, rh0.grad)
    errs = {}
    for name, (a, b) in pairs.items():
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf (unwritten or overflow)"
        errs[name] = rel_err(a, b)
    print({n: f"{e:.2e}" for n, e in errs.items()})
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"rel err over {TOL[dtype]}: {bad}"
    return o


@pytest.mark.parametrize(
    "B,T,H,Dk,Dv,dtype",
    [
        (2, 4096, 4, 128, 128, torch.bfloat16),
        (1, 65536, 2, 128, 128, torch.bfloat16),  # long: the two-level (segment) path
        (4, 8192, 3, 128, 128, torch.bfloat16),
        (2, 2048, 3, 256, 128, torch.bfloat16),  # LRPE layer
        (2, 1000, 3, 64, 64, torch.bfloat16),
        (2, 1000, 3, 96, 96, torch.bfloat16),  # non-power-of-two head dim
        (2, 3000, 3, 128, 128, torch.float16),
        (2, 777, 3, 128, 64, torch.float32),
    ],
)
def test_attention_matches_fp64(B, T, H, Dk, Dv, dtype):
    gen = torch.Generator(device="cuda").manual_seed(B * T + H * Dk + Dv)
    q = randn(B, T, H, Dk, gen=gen, dtype=dtype, scale=0.3)
    k = randn(B, T, H, Dk, gen=gen, dtype=dtype, scale=0.3)
    v = randn(B, T, H, Dv, gen=gen, dtype=dtype)
    h0 = randn(B, H, Dk, Dv, gen=gen, dtype=torch.float32)
    check(q, k, v, alibi(H), h0, dtype=dtype, ref_chunk=1024 if T > 16384 else 256)


def test_packed_sequences():
    lens = [0, 1, 100, 3000, 64, 5000, 77]
    H, D = 4, 128
    gen = torch.Generator(device="cuda").manual_seed(99)
    T = sum(lens)
    q, k = (randn(1, T, H, D, gen=gen, dtype=torch.bfloat16, scale=0.3) for _ in range(2))
    v = randn(1, T, H, D, gen=gen, dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    h0 = randn(len(lens), H, D, D, gen=gen, dtype=torch.float32)
    check(q, k, v, alibi(H), h0, cu=cu)


def test_megatron_fused_views():
    """[s, b, 4 h d] projection output viewed as [b, s, h, d]: no copies; o comes back s-major."""
    s, b, H, D = 3000, 2, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    fused = randn(s, b, 4 * H * D, gen=gen, dtype=torch.bfloat16, scale=0.3)
    q, k, v, _ = (x.view(s, b, H, D).transpose(0, 1) for x in fused.split(H * D, dim=-1))
    o = check(q, k, v, alibi(H), None)
    assert o.transpose(0, 1).is_contiguous()


def test_segments_forced_and_off():
    """The same inputs through one segment per sequence and through many: both match the reference."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    q, k = (randn(2, 5000, 2, 128, gen=gen, dtype=torch.bfloat16, scale=0.3) for _ in range(2))
    v = randn(2, 5000, 2, 128, gen=gen, dtype=torch.bfloat16)
    h0 = randn(2, 2, 128, 128, gen=gen, dtype=torch.float32)
    saved = chunk_mod.CONFIG
    try:
        for target, min_seg in ((1, 512), (4096, 256)):
            chunk_mod.CONFIG = chunk_mod.KernelConfig(target_ctas=target, min_seg=min_seg)
            check(q, k, v, alibi(2, extremes=False), h0)
    finally:
        chunk_mod.CONFIG = saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,bad,t", [("v", "nan", 150), ("k", "inf", 200), ("q", "nan", 130), ("do", "nan", 260)])
def test_non_finite_input_stays_causal(name, bad, t, dtype):
    """A NaN / inf at t (4 segments of 64 tokens, mid-chunk) reaches no output that does not depend on t."""
    from tests.test_ops_nan_causal import check_nan_stays_causal

    saved = chunk_mod.CONFIG
    try:
        chunk_mod.CONFIG = chunk_mod.KernelConfig(min_seg=64)
        check_nan_stays_causal(lambda q, k, v, s: lightning_attention(q, k, v, s)[0], name, float(bad), dtype,
                               TOL[dtype] * 2, device="cuda", B=2, T=300, H=2, D=64, t=t)  # fmt: skip
    finally:
        chunk_mod.CONFIG = saved


def test_fused_segments_replay_from_a_cuda_graph():
    """Segments combined inside the sweeps (ticket counter, flags, epochs) replayed from a captured graph: every
    replay, with new inputs copied into the static ones, matches an eager call (bitwise: same kernels)."""
    gen = torch.Generator(device="cuda").manual_seed(31)
    B, T, H, D = 1, 4096, 8, 128
    static = [randn(B, T, H, D, gen=gen, dtype=torch.bfloat16, scale=0.3).requires_grad_() for _ in range(3)]
    do = randn(B, T, H, D, gen=gen, dtype=torch.bfloat16)
    slope = alibi(H, extremes=False)
    assert chunk_mod.plan_segments(B * H, T, 2, False, static[0].device)[0] > 1

    def step():
        lightning_attention(*static, slope)[0].backward(do)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for x in static:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        o = lightning_attention(*static, slope)[0]
        o.backward(do)
    for _ in range(3):
        new = [randn(B, T, H, D, gen=gen, dtype=torch.bfloat16, scale=0.3) for _ in range(3)]
        with torch.no_grad():
            for x, n in zip(static, new, strict=True):
                x.copy_(n)
        graph.replay()
        leaves = [n.clone().requires_grad_() for n in new]
        ref = lightning_attention(*leaves, slope)[0]
        ref.backward(do)
        assert torch.equal(o, ref)
        for x, leaf in zip(static, leaves, strict=True):
            assert torch.equal(x.grad, leaf.grad)


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("inplace", [False, True])
def test_decode_step(B, inplace):
    H, D = 8, 128
    gen = torch.Generator(device="cuda").manual_seed(B + inplace)
    q, k, v = (randn(B, H, D, gen=gen, dtype=torch.bfloat16) for _ in range(3))
    state = randn(B, H, D, D, gen=gen, dtype=torch.float32)
    slope = alibi(H)
    ref_o, ref_s = lightning_attention_step(q, k, v, slope, state.double(), backend="torch")
    before = state.clone()
    o, s = lightning_attention_step(q, k, v, slope, state, inplace=inplace)
    assert (s is state) == inplace
    if not inplace:
        assert torch.equal(state, before)
    assert rel_err(o, ref_o) < 5e-3 and rel_err(s, ref_s) < 1e-6


def test_prefill_then_decode():
    B, T, P, H, D = 2, 300, 257, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k = (randn(B, T, H, D, gen=gen, dtype=torch.bfloat16, scale=0.3) for _ in range(2))
    v = randn(B, T, H, D, gen=gen, dtype=torch.bfloat16)
    slope = alibi(H)
    ro, _ = lightning_attention_chunked(q.double(), k.double(), v.double(), slope.double())
    o, state = lightning_attention(q[:, :P], k[:, :P], v[:, :P], slope, output_final_state=True)
    outs = [o]
    for t in range(P, T):
        o_t, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state, inplace=True)
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, 1), ro) < 5e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_srmsnorm_family(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = randn(1000, 4096, gen=gen, dtype=dtype, scale=3)
    u = randn(1000, 4096, gen=gen, dtype=dtype)
    dy = randn(1000, 4096, gen=gen, dtype=dtype)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    fns = {
        "norm": lambda x, u, r: srmsnorm(x, 1e-6),
        "gate": lambda x, u, r: srmsnorm_gate(x, u, 1e-6),
        "rstd": lambda x, u, r: norm_gate_rstd(x, u, r),
    }
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-5
    for name, fn in fns.items():
        got, ref = [], []
        for out, conv in ((got, lambda t: t), (ref, lambda t: t.double())):
            leaves = [conv(t).detach().requires_grad_() for t in (x, u, rstd)]
            y = fn(*leaves)
            (y.double() * dy.double()).sum().backward()
            out.extend([y] + [t.grad for t in leaves])
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            if b is None:
                continue
            assert torch.isfinite(a).all() and rel_err(a, b) < tol, (name, i, rel_err(a, b))
