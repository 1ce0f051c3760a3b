"""The Triton kernels against fp64 PyTorch references, on a CUDA GPU and on the CPU under Triton's interpreter.

Triton's interpreter is chosen when the kernels are decorated (TRITON_INTERPRET=1 at import) and must not leak
into other tests: a normal pytest run re-runs this file in a subprocess with it set (``test_interpreter_suite``).
There the interpreter cases run: fp32 only (the interpreter's tl.dot on bf16 is wrong), small shapes and 16-token
chunks so that every path (segments, tails, tiles) is hit. In the normal run the GPU cases run, skipped without
CUDA: bf16/fp16/fp32 at real sizes, every kernel output poisoned with NaN first (an unwritten element fails).
A check that both share is one body; ``cases`` hands it the parameter sets of the process's target.

Every check gates the relative error ||x - ref|| / ||ref|| against the fp64 reference.
"""

from __future__ import annotations

import pytest
import torch
import triton

from tests.testing import alibi, rel_err
from tests.triton_targets import CUDA, DEVICE, INTERPRET, INTERPRETER_ONLY, NEEDS_CUDA, cases, run_interpreter_suite

# fp32 inputs: exact fp32 under the interpreter, tf32x3 dots on the GPU
TOL = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-5 if INTERPRET else 1e-4}

if INTERPRET or CUDA:
    from megatron_tnllm.ops import backend, lightning_attention, lightning_attention_step, srmsnorm
    from megatron_tnllm.ops.lightning_attn import chunk as chunk_mod
    from megatron_tnllm.ops.lightning_attn.naive import lightning_attention_chunked, lightning_attention_quadratic
    from megatron_tnllm.ops.srmsnorm import norm_gate_rstd, srmsnorm_gate, sum_of_squares


if not INTERPRET:

    @pytest.mark.skipif(
        tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8),
        reason=f"Triton {triton.__version__}'s interpreter gives program ids as 1-element arrays, which the kernels' "
        "range() loops cannot take (3.8's are scalars); the GPU cases run the compiled kernels",
    )
    def test_interpreter_suite():
        run_interpreter_suite(__file__, timeout_s=900)


@pytest.fixture(autouse=True)
def kernel_settings():
    """Interpreter: 16-token chunks and 16-wide tiles, segments forced by a low min_seg and a high CTA target.
    GPU: every kernel output filled with NaN before the kernels run. Tests may replace CONFIG: restored here."""
    if not (INTERPRET or CUDA):
        yield
        return
    saved = chunk_mod.CONFIG
    if INTERPRET:
        chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, target_ctas=4, min_seg=32)
    backend.POISON_OUTPUTS = CUDA
    yield
    backend.POISON_OUTPUTS = False
    chunk_mod.CONFIG = saved


def slopes(kind: str, H: int) -> torch.Tensor:
    """[H] fp32 on DEVICE. "alibi_ends": ALiBi with one head without decay and one at slope 8 (H >= 3)."""
    if kind in ("alibi", "alibi_ends"):
        s = alibi(H)
        if kind == "alibi_ends" and H >= 3:
            s[0], s[-1] = 0.0, 8.0
    elif kind == "mixed":
        s = torch.tensor([0.0, 8.0, 0.5, 1e-4, 0.05, 2.0][:H])
    else:
        s = torch.full((H,), {"zero": 0.0, "strong": 8.0}[kind])
    return s.to(DEVICE)


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype)


def check(q, k, v, slope, h0, cu=None):
    """Forward, final state, and dq, dk, dv, dh0 (with a final-state gradient) against fp64 at q's dtype's
    tolerance: the quadratic reference under the interpreter, the chunked one at GPU lengths."""
    dtype = q.dtype
    T = q.shape[1]
    gen = generator(T + 17)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    h0l = None if h0 is None else h0.detach().clone().requires_grad_()
    o, ht = lightning_attention(*leaves, slope, initial_state=h0l, output_final_state=True, cu_seqlens=cu,
                                backend="triton")  # fmt: skip
    do = randn(*o.shape, gen=gen, dtype=o.dtype)
    dht = randn(*ht.shape, gen=gen)
    torch.autograd.backward([o, ht], [do, dht])

    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rh0 = None if h0 is None else h0.detach().double().requires_grad_()
    if INTERPRET:
        ro, rht = lightning_attention_quadratic(*refs, slope.double(), rh0, True, cu_seqlens=cu)
    else:
        ref_chunk = 1024 if T > 16384 else 256
        ro, rht = lightning_attention_chunked(*refs, slope.double(), rh0, True, cu_seqlens=cu, chunk_size=ref_chunk)
    torch.autograd.backward([ro, rht], [do.double(), dht.double()])

    pairs = {"o": (o, ro), "ht": (ht, rht)}
    pairs.update({f"d{n}": (a.grad, b.grad) for n, a, b in zip("qkv", leaves, refs, strict=True)})
    if h0 is not None:
        pairs["dh0"] = (h0l.grad, rh0.grad)
    errs = {}
    for name, (a, b) in pairs.items():
        assert a is not None and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf (unwritten or overflow)"
        errs[name] = rel_err(a, b)
    print({n: f"{e:.2e}" for n, e in errs.items()})
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"rel err over {TOL[dtype]}: {bad}"
    return o


# ---------------------------------------------------------------------------------------------------------------
# checks on both targets
# ---------------------------------------------------------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "B,T,H,Dk,Dv,dtype,kind",
    cases(
        interpret=[
            (2, 50, 3, 24, 20, F32, "alibi"),  # non-power-of-two dims, T not a multiple of the chunk
            (1, 100, 2, 16, 16, F32, "mixed"),  # several segments (two-level scheme)
            (2, 75, 2, 40, 24, F32, "alibi"),  # Dk != Dv, several V tiles, segments with a partial last one
            (1, 5, 2, 8, 12, F32, "mixed"),  # T < chunk
            (2, 1, 2, 16, 16, F32, "alibi"),  # one token
            (1, 64, 4, 32, 16, F32, "zero"),  # no decay
            (1, 64, 4, 16, 32, F32, "strong"),  # slope 8: everything beyond the diagonal underflows
        ],
        cuda=[
            (2, 4096, 4, 128, 128, BF16, "alibi_ends"),
            (1, 65536, 2, 128, 128, BF16, "alibi_ends"),  # long: the two-level (segment) path
            (4, 8192, 3, 128, 128, BF16, "alibi_ends"),
            (2, 2048, 3, 256, 128, BF16, "alibi_ends"),  # LRPE layer
            (2, 1000, 3, 64, 64, BF16, "alibi_ends"),
            (2, 1000, 3, 96, 96, BF16, "alibi_ends"),  # non-power-of-two head dim
            (2, 3000, 3, 128, 128, F16, "alibi_ends"),
            (2, 777, 3, 128, 64, F32, "alibi_ends"),
        ],
    ),
)
def test_forward_and_gradients(B, T, H, Dk, Dv, dtype, kind):
    gen = generator(B * T + H * Dk + Dv)
    q = randn(B, T, H, Dk, gen=gen, dtype=dtype, scale=0.3)
    k = randn(B, T, H, Dk, gen=gen, dtype=dtype, scale=0.3)
    v = randn(B, T, H, Dv, gen=gen, dtype=dtype)
    h0 = randn(B, H, Dk, Dv, gen=gen)
    check(q, k, v, slopes(kind, H), h0)


@pytest.mark.parametrize(
    "lens,H,Dk,Dv,dtype,kind",
    cases(
        interpret=[([0, 1, 17, 40, 5, 0, 33], 3, 20, 12, F32, "mixed")],
        cuda=[([0, 1, 100, 3000, 64, 5000, 77], 4, 128, 128, BF16, "alibi_ends")],
    ),
)
def test_packed_sequences(lens, H, Dk, Dv, dtype, kind):
    """cu_seqlens with empty, one-token, sub-chunk and multi-chunk sequences; state per sequence."""
    gen = generator(99)
    T = sum(lens)
    q, k = (randn(1, T, H, Dk, gen=gen, dtype=dtype, scale=0.3) for _ in range(2))
    v = randn(1, T, H, Dv, gen=gen, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    h0 = randn(len(lens), H, Dk, Dv, gen=gen)
    check(q, k, v, slopes(kind, H), h0, cu=cu)


@pytest.mark.parametrize(
    "s,b,H,D,dtype,kind",
    cases(interpret=[(40, 2, 2, 24, F32, "alibi")], cuda=[(3000, 2, 4, 128, BF16, "alibi_ends")]),
)
def test_megatron_fused_views(s, b, H, D, dtype, kind):
    """Megatron's [s, b, 4 h d] projection, viewed as [b, s, h, d] per section: read in place, o keeps s-major."""
    fused = randn(s, b, 4 * H * D, gen=generator(5), dtype=dtype, scale=0.3)
    q, k, v, _ = (x.view(s, b, H, D).transpose(0, 1) for x in fused.split(H * D, dim=-1))
    assert not q.is_contiguous()
    o = check(q, k, v, slopes(kind, H), None)
    assert o.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize(
    "name,bad,t,dtype",
    cases(
        interpret=[("v", "nan", 37, F32), ("k", "inf", 50, F32), ("q", "nan", 37, F32), ("do", "nan", 50, F32)],
        cuda=[
            (name, bad, t, dtype)
            for name, bad, t in (("v", "nan", 150), ("k", "inf", 200), ("q", "nan", 130), ("do", "nan", 260))
            for dtype in (BF16, F32)
        ],
    ),
)
def test_non_finite_input_stays_causal(name, bad, t, dtype):
    """A NaN / inf at t (mid-chunk, several segments) reaches no output that does not depend on t, fwd and bwd
    (the sweeps flag the segments whose state comes out non-finite; a second launch re-runs them causally).
    Segments combined in the sweeps and by the two extra launches."""
    from tests.test_ops_nan_causal import check_nan_stays_causal

    if INTERPRET:  # two segments of the interpreter's 16-token chunks
        shape, tol = dict(B=1, T=70, H=2, D=16), TOL[dtype]
        assert chunk_mod.plan_segments(2, 70, 1, False, torch.device("cpu"))[0] == 2
        base = chunk_mod.CONFIG
    else:  # four segments of 64 tokens
        shape, tol = dict(B=2, T=300, H=2, D=64), TOL[dtype] * 2
        base = chunk_mod.KernelConfig(min_seg=64)

    def fn(q, k, v, s):
        return lightning_attention(q, k, v, s, backend="triton")[0]

    for fused in (True, False):
        chunk_mod.CONFIG = chunk_mod.KernelConfig(**{**vars(base), "fused_segments": fused})
        check_nan_stays_causal(fn, name, float(bad), dtype, tol, device=DEVICE, t=t, **shape)


@pytest.mark.parametrize(
    "B,T,P,H,Dk,Dv,dtype,kind,inplace",
    cases(
        interpret=[(2, 12, 7, 3, 24, 40, F32, "mixed", False), (2, 12, 7, 3, 24, 40, F32, "mixed", True)],
        cuda=[(2, 300, 257, 4, 128, 128, BF16, "alibi_ends", True)],
    ),
)
def test_prefill_then_decode(B, T, P, H, Dk, Dv, dtype, kind, inplace):
    """prefill = lightning_attention(..., output_final_state=True); then one-token steps continue the sequence."""
    gen = generator(3)
    q, k = (randn(B, T, H, Dk, gen=gen, dtype=dtype, scale=0.3) for _ in range(2))
    v = randn(B, T, H, Dv, gen=gen, dtype=dtype)
    slope = slopes(kind, H)
    ro, _ = lightning_attention_chunked(q.double(), k.double(), v.double(), slope.double())
    o, state = lightning_attention(q[:, :P], k[:, :P], v[:, :P], slope, output_final_state=True, backend="triton")
    outs = [o]
    for t in range(P, T):
        before = state
        o_t, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state, inplace=inplace,
                                              backend="triton")  # fmt: skip
        assert (state is before) == inplace
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, 1), ro) < TOL[dtype]


@pytest.mark.parametrize(
    "shape,dtype,strided",
    cases(
        # rows per program (fused._config): 16 of 15 / 64 of 37 (one masked program), 4 of 7 and of 21 (a partial
        # last program), 1 of 3 at a width that is not a power of two (masked columns)
        interpret=[((3, 5, 48), F32, False), ((37, 48), F32, True), ((7, 704), F32, True), ((21, 1000), F32, False),
                   ((3, 2816), F32, True)],
        cuda=[((1000, 4096), BF16, False), ((1000, 4096), F32, True), ((2047, 2816), BF16, True),
              ((4095, 704), BF16, False), ((3, 341, 1408), F16, True), ((5, 128), BF16, False)],
    ),
)  # fmt: skip
def test_srmsnorm_family(shape, dtype, strided):
    """srmsnorm, srmsnorm_gate, norm_gate_rstd, sum_of_squares and the TP composition (sum of squares -> rstd ->
    norm_gate_rstd) in Triton, in dtype, against their fp64 PyTorch references: outputs and the gradients of x, u
    and rstd. ``strided``: x and u are column slices of one wider tensor (row stride 3 D, as the gate slice of the
    fused projection), read in place. The forward without autograd matches too."""
    gen = generator(1)
    D = shape[-1]
    wide = randn(*shape[:-1], 3 * D, gen=gen, dtype=dtype, scale=3)
    x, u = (wide[..., :D], wide[..., 2 * D :]) if strided else (wide[..., :D].clone(), wide[..., D : 2 * D].clone())
    dy = randn(*shape, gen=gen, dtype=dtype)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    fns = {
        "norm": lambda x, u, r, be: srmsnorm(x, 1e-6, backend=be),
        "gate": lambda x, u, r, be: srmsnorm_gate(x, u, 1e-6, backend=be),
        "rstd": lambda x, u, r, be: norm_gate_rstd(x, u, r, backend=be),
        "sum_sq": lambda x, u, r, be: sum_of_squares(x, backend=be)[..., None] * u,
        "tp": lambda x, u, r, be: norm_gate_rstd(x, u, torch.rsqrt(sum_of_squares(x, backend=be) / D + 1e-6),
                                                 backend=be),
    }  # fmt: skip
    if CUDA:  # "auto" runs torch's rms_norm for the plain norm on a GPU
        fns["norm_auto"] = lambda x, u, r, be: srmsnorm(x, 1e-6, backend="auto" if be == "triton" else be)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, fn in fns.items():
        outs = []
        for be, conv in (("triton", lambda t: t), ("torch", lambda t: t.double())):
            leaves = [conv(t).detach().requires_grad_() for t in (x, u, rstd)]
            y = fn(*leaves, be)
            (y.double() * dy.double()).sum().backward()
            outs.append([y] + [t.grad for t in leaves])
        for i, (a, b) in enumerate(zip(*outs, strict=True)):
            if b is None:
                assert a is None, (name, i)
            else:
                assert torch.isfinite(a).all() and rel_err(a, b) < tol, (name, i, rel_err(a, b))
        with torch.no_grad():  # the launch without an autograd node
            assert rel_err(fn(x, u, rstd, "triton"), outs[1][0]) < tol, name


# ---------------------------------------------------------------------------------------------------------------
# GPU only: real segment plans, CUDA graphs, decode batch sizes
# ---------------------------------------------------------------------------------------------------------------


@NEEDS_CUDA
@pytest.mark.parametrize("fused", [False, True])
def test_segments_forced_and_off(fused):
    """The same inputs through one segment per sequence, through many, and through 27 in the forward with 9 in the
    backward (every third saved state): all match the reference, segments combined by the two extra launches or
    in the sweeps."""
    gen = generator(8)
    q, k = (randn(2, 5000, 2, 128, gen=gen, dtype=BF16, scale=0.3) for _ in range(2))
    v = randn(2, 5000, 2, 128, gen=gen, dtype=BF16)
    h0 = randn(2, 2, 128, 128, gen=gen)
    for target, min_seg, fwd_min_seg in ((1, 512, 0), (4096, 256, 0), (4096, 512, 128)):
        chunk_mod.CONFIG = chunk_mod.KernelConfig(target_ctas=target, min_seg=min_seg, fwd_min_seg=fwd_min_seg,
                                                  fused_segments=fused)  # fmt: skip
        check(q, k, v, slopes("alibi", 2), h0)


@NEEDS_CUDA
@pytest.mark.parametrize("fused", [False, True])
def test_segments_replay_from_a_cuda_graph(fused):
    """Segments (combined by the two extra launches, or inside the sweeps with the ticket counter, flags and
    epochs) and the re-run launches' fix flags, replayed from a captured graph: every replay, with new inputs
    copied into the static ones, matches an eager call (bitwise: same kernels)."""
    chunk_mod.CONFIG = chunk_mod.KernelConfig(fused_segments=fused)
    gen = generator(31)
    B, T, H, D = 1, 4096, 8, 128
    static = [randn(B, T, H, D, gen=gen, dtype=BF16, scale=0.3).requires_grad_() for _ in range(3)]
    do = randn(B, T, H, D, gen=gen, dtype=BF16)
    slope = slopes("alibi", H)
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
        new = [randn(B, T, H, D, gen=gen, dtype=BF16, scale=0.3) for _ in range(3)]
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


@NEEDS_CUDA
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("inplace", [False, True])
def test_decode_step(B, inplace):
    H, D = 8, 128
    gen = generator(B + inplace)
    q, k, v = (randn(B, H, D, gen=gen, dtype=BF16) for _ in range(3))
    state = randn(B, H, D, D, gen=gen)
    slope = slopes("alibi_ends", H)
    ref_o, ref_s = lightning_attention_step(q, k, v, slope, state.double(), backend="torch")
    before = state.clone()
    o, s = lightning_attention_step(q, k, v, slope, state, inplace=inplace)
    assert (s is state) == inplace
    if not inplace:
        assert torch.equal(state, before)
    assert rel_err(o, ref_o) < 5e-3 and rel_err(s, ref_s) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# interpreter only: paths the small configurations reach (the GPU's defaults do not)
# ---------------------------------------------------------------------------------------------------------------


@INTERPRETER_ONLY
def test_wide_key_dim_uses_its_own_chunk():
    """Dk > 128 (the LRPE layer's 256, here 136 -> a 256-wide tile) runs with wide_chunk / wide_tile."""
    chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, wide_chunk=32, wide_tile=16,
                                              target_ctas=8, min_seg=16)  # fmt: skip
    g = generator(17)
    q, k = (randn(1, 70, 2, 136, gen=g, scale=0.3) for _ in range(2))
    v = randn(1, 70, 2, 24, gen=g)
    h0 = randn(1, 2, 136, 24, gen=g)
    check(q, k, v, slopes("mixed", 2), h0)


@INTERPRETER_ONLY
@pytest.mark.parametrize("fused", [True, False])
def test_segment_states_in_kernel_or_in_two_launches(fused):
    """Segments combined inside the sweeps (tickets, flags, epochs) or by the two extra launches: both exact;
    the fused path leaves its counters reset and advances the epoch once per launch (forward, dV + dK)."""
    chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, target_ctas=16, min_seg=16,
                                              fused_segments=fused)  # fmt: skip
    g = generator(29)
    q, k, v = (randn(2, 90, 2, 16, gen=g) for _ in range(3))
    h0 = randn(2, 2, 16, 16, gen=g)
    assert chunk_mod.plan_segments(4, 90, 1, False, torch.device("cpu"))[0] == 3
    sync, _, _ = chunk_mod._sync_buffers(torch.device("cpu"), 1)
    epoch = int(sync[2])
    check(q, k, v, slopes("mixed", 2), h0)
    assert sync[:2].tolist() == [0, 0]
    assert int(sync[2]) == epoch + (2 if fused else 0)


@INTERPRETER_ONLY
@pytest.mark.parametrize("fused", [True, False])
def test_forward_segments_shorter_than_the_backward_ones(fused):
    """fwd_min_seg below min_seg: the forward runs 5 segments of 32 tokens, the backward 2 of 96 from every third
    saved segment state; both exact."""
    chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, target_ctas=40, min_seg=64,
                                              fwd_min_seg=16, fused_segments=fused)  # fmt: skip
    g = generator(31)
    q, k, v = (randn(2, 150, 2, 16, gen=g) for _ in range(3))
    h0 = randn(2, 2, 16, 16, gen=g)
    cpu = torch.device("cpu")
    assert chunk_mod.plan_segments(4, 150, 1, False, cpu, 16) == (5, 32)
    assert chunk_mod.plan_segments(4, 150, 1, False, cpu) == (2, 80)
    q.requires_grad_()
    o, _ = lightning_attention(q, k, v, slopes("mixed", 2), initial_state=h0, backend="triton")
    assert o.grad_fn.plan == (2, 2, 96)  # (sequences, backward segments, their length)
    check(q.detach(), k, v, slopes("mixed", 2), h0)


@INTERPRETER_ONLY
def test_segment_plan_is_used():
    n_seg, seg_len = chunk_mod.plan_segments(2, 100, 1, False, torch.device("cpu"))
    assert n_seg > 1 and seg_len % 16 == 0
    assert chunk_mod.plan_segments(2, 100, 1, True, torch.device("cpu"))[0] == 1


@INTERPRETER_ONLY
def test_no_initial_state_and_broadcast_grad():
    """No h0, no final state; o.sum() hands the kernels a zero-stride dO."""
    g = generator(5)
    q, k, v = (randn(2, 30, 2, 16, gen=g).requires_grad_() for _ in range(3))
    slope = slopes("alibi", 2)
    o, ht = lightning_attention(q, k, v, slope, backend="triton")
    assert ht is None
    o.sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    lightning_attention_quadratic(*ref, slope.double())[0].sum().backward()
    for a, r in zip((q, k, v), ref, strict=True):
        assert rel_err(a.grad, r.grad) < 1e-5


@INTERPRETER_ONLY
def test_dtype_and_backend_dispatch():
    q = torch.randn(1, 8, 1, 16)
    o, _ = lightning_attention(q, q, q, torch.zeros(1))  # auto on CPU: the torch path
    assert o.dtype == torch.float32
    with pytest.raises(TypeError):
        lightning_attention(q.double(), q.double(), q.double(), torch.zeros(1), backend="triton")


@INTERPRETER_ONLY
def test_decode_strided_state():
    B, H, Dk, Dv = 3, 2, 16, 20
    g = generator(13)
    q, k = (randn(B, H, Dk, gen=g) for _ in range(2))
    v = randn(B, H, Dv, gen=g)
    big = randn(B, H, Dv, Dk, gen=g)
    state = big.transpose(-1, -2)  # a non-contiguous [B, H, Dk, Dv] view
    slope = slopes("alibi", H)
    ref_o, ref_s = lightning_attention_step(q, k, v, slope, state.double(), backend="torch")
    o, s = lightning_attention_step(q, k, v, slope, state, inplace=True, backend="triton")
    assert rel_err(o, ref_o) < 1e-6 and rel_err(big.transpose(-1, -2), ref_s) < 1e-6
