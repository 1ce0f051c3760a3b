"""The Triton kernels, run on the CPU by Triton's interpreter, against the fp64 PyTorch references.

TRITON_INTERPRET must be set before the kernels are decorated (at import), and must not leak into other
tests: in a normal pytest run this module holds one test that re-runs this file in a subprocess with
TRITON_INTERPRET=1; there the real cases below are collected. fp32 inputs only (the interpreter's tl.dot
on bf16 is wrong); small shapes and a 16-token chunk so that every path (segments, tails, tiles) is hit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INNER = os.environ.get("TRITON_INTERPRET") == "1"

if not INNER:

    def test_interpreter_suite():
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        print(res.stdout[-4000:])
        assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]

else:
    from megatron_tnllm.ops import lightning_attention, lightning_attention_step, srmsnorm
    from megatron_tnllm.ops.lightning_attn import chunk as chunk_mod
    from megatron_tnllm.ops.lightning_attn.naive import lightning_attention_quadratic
    from megatron_tnllm.ops.srmsnorm import norm_gate_rstd, srmsnorm_gate

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()

    @pytest.fixture(autouse=True)
    def small_tiles():
        """16-token chunks and 16-wide tiles; force segments with a low min_seg and a high CTA target."""
        saved = chunk_mod.CONFIG
        chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, target_ctas=4, min_seg=32)
        yield
        chunk_mod.CONFIG = saved

    def slopes(kind: str, H: int) -> torch.Tensor:
        if kind == "alibi":
            return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
        if kind == "mixed":
            return torch.tensor([0.0, 8.0, 0.5, 1e-4, 0.05, 2.0][:H])
        return torch.full((H,), {"zero": 0.0, "strong": 8.0}[kind])

    def check_against_reference(q, k, v, slope, h0, cu=None, tol=1e-5, with_dht=True):
        """Forward, final state, and dq, dk, dv, dh0 (with a final-state gradient) against fp64."""
        g = torch.Generator().manual_seed(123)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        h0l = None if h0 is None else h0.detach().clone().requires_grad_()
        o, ht = lightning_attention(*leaves, slope, initial_state=h0l, output_final_state=True, cu_seqlens=cu,
                                    backend="triton")  # fmt: skip
        do = torch.randn(o.shape, generator=g)
        dht = torch.randn(ht.shape, generator=g) if with_dht else torch.zeros(ht.shape)
        ((o * do).sum() + (ht * dht).sum()).backward()

        ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        rh0 = None if h0 is None else h0.detach().double().requires_grad_()
        ro, rht = lightning_attention_quadratic(*ref_leaves, slope.double(), rh0, True, cu_seqlens=cu)
        ((ro * do.double()).sum() + (rht * dht.double()).sum()).backward()

        pairs = {"o": (o, ro), "ht": (ht, rht)}
        pairs.update({n: (a.grad, b.grad) for n, a, b in zip("qkv", leaves, ref_leaves, strict=True)})
        if h0 is not None:
            pairs["h0"] = (h0l.grad, rh0.grad)
        for name, (a, b) in pairs.items():
            assert a is not None and torch.isfinite(a).all(), name
            assert a.shape == b.shape, name
            err = rel_err(a, b)
            assert err < tol, f"{name}: rel err {err:.2e}"
        return o

    @pytest.mark.parametrize(
        "B,T,H,Dk,Dv,kind",
        [
            (2, 50, 3, 24, 20, "alibi"),  # non-power-of-two dims, T not a multiple of the chunk
            (1, 100, 2, 16, 16, "mixed"),  # several segments (two-level scheme)
            (2, 75, 2, 40, 24, "alibi"),  # Dk != Dv, several V tiles, segments with a partial last one
            (1, 5, 2, 8, 12, "mixed"),  # T < chunk
            (2, 1, 2, 16, 16, "alibi"),  # one token
            (1, 64, 4, 32, 16, "zero"),  # no decay
            (1, 64, 4, 16, 32, "strong"),  # slope 8: everything beyond the diagonal underflows
        ],
    )
    def test_forward_and_gradients(B, T, H, Dk, Dv, kind):
        g = torch.Generator().manual_seed(B * 1000 + T)
        q, k = (torch.randn(B, T, H, Dk, generator=g) for _ in range(2))
        v = torch.randn(B, T, H, Dv, generator=g)
        h0 = torch.randn(B, H, Dk, Dv, generator=g)
        check_against_reference(q, k, v, slopes(kind, H), h0)

    @pytest.mark.parametrize("name,bad,t", [("v", "nan", 37), ("k", "inf", 50), ("q", "nan", 37), ("do", "nan", 50)])
    def test_non_finite_input_stays_causal(name, bad, t):
        """A NaN / inf at t (two segments, mid-chunk) reaches no output that does not depend on t, fwd and bwd."""
        from tests.test_ops_nan_causal import check_nan_stays_causal

        def fn(q, k, v, s):
            return lightning_attention(q, k, v, s, backend="triton")[0]

        assert chunk_mod.plan_segments(2, 70, 1, False, torch.device("cpu"))[0] == 2
        check_nan_stays_causal(fn, name, float(bad), torch.float32, 1e-5, T=70, t=t)

    def test_wide_key_dim_uses_its_own_chunk():
        """Dk > 128 (the LRPE layer's 256, here 136 -> a 256-wide tile) runs with wide_chunk / wide_tile."""
        chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, wide_chunk=32, wide_tile=16,
                                                  target_ctas=8, min_seg=16)  # fmt: skip
        g = torch.Generator().manual_seed(17)
        q, k = (torch.randn(1, 70, 2, 136, generator=g) * 0.3 for _ in range(2))
        v = torch.randn(1, 70, 2, 24, generator=g)
        h0 = torch.randn(1, 2, 136, 24, generator=g)
        check_against_reference(q, k, v, slopes("mixed", 2), h0)

    @pytest.mark.parametrize("fused", [True, False])
    def test_segment_states_in_kernel_or_in_two_launches(fused):
        """Segments combined inside the sweeps (tickets, flags, epochs) or by the two extra launches: both exact;
        the fused path leaves its counters reset and advances the epoch once per launch (forward, dV + dK)."""
        chunk_mod.CONFIG = chunk_mod.KernelConfig(chunk=16, fwd_tile=16, rev_tile=16, target_ctas=16, min_seg=16,
                                                  fused_segments=fused)  # fmt: skip
        g = torch.Generator().manual_seed(29)
        q, k, v = (torch.randn(2, 90, 2, 16, generator=g) for _ in range(3))
        h0 = torch.randn(2, 2, 16, 16, generator=g)
        assert chunk_mod.plan_segments(4, 90, 1, False, torch.device("cpu"))[0] == 3
        sync, _ = chunk_mod._sync_buffers(torch.device("cpu"), 1)
        epoch = int(sync[2])
        check_against_reference(q, k, v, slopes("mixed", 2), h0)
        assert sync[:2].tolist() == [0, 0]
        assert int(sync[2]) == epoch + (2 if fused else 0)

    def test_segment_plan_is_used():
        n_seg, seg_len = chunk_mod.plan_segments(2, 100, 1, False, torch.device("cpu"))
        assert n_seg > 1 and seg_len % 16 == 0
        assert chunk_mod.plan_segments(2, 100, 1, True, torch.device("cpu"))[0] == 1

    def test_packed_sequences():
        """cu_seqlens with empty, one-token, sub-chunk and multi-chunk sequences; state per sequence."""
        lens = [0, 1, 17, 40, 5, 0, 33]
        H, Dk, Dv = 3, 20, 12
        g = torch.Generator().manual_seed(7)
        T = sum(lens)
        q, k = (torch.randn(1, T, H, Dk, generator=g) for _ in range(2))
        v = torch.randn(1, T, H, Dv, generator=g)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        h0 = torch.randn(len(lens), H, Dk, Dv, generator=g)
        check_against_reference(q, k, v, slopes("mixed", H), h0, cu=cu)

    def test_fused_strided_views_and_output_layout():
        """Megatron's [s, b, 4 h d] projection, viewed as [b, s, h, d] per section: read in place, o keeps s-major."""
        s, b, H, D = 40, 2, 2, 24
        g = torch.Generator().manual_seed(3)
        fused = torch.randn(s, b, 4 * H * D, generator=g)
        q, k, v, _ = (x.view(s, b, H, D).transpose(0, 1) for x in fused.split(H * D, dim=-1))
        assert not q.is_contiguous()
        o = check_against_reference(q, k, v, slopes("alibi", H), None)
        assert o.transpose(0, 1).is_contiguous()

    def test_no_initial_state_and_broadcast_grad():
        """No h0, no final state; o.sum() hands the kernels a zero-stride dO."""
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(2, 30, 2, 16, generator=g).requires_grad_() for _ in range(3))
        slope = slopes("alibi", 2)
        o, ht = lightning_attention(q, k, v, slope, backend="triton")
        assert ht is None
        o.sum().backward()
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        lightning_attention_quadratic(*ref, slope.double())[0].sum().backward()
        for a, r in zip((q, k, v), ref, strict=True):
            assert rel_err(a.grad, r.grad) < 1e-5

    def test_dtype_and_backend_dispatch():
        q = torch.randn(1, 8, 1, 16)
        o, _ = lightning_attention(q, q, q, torch.zeros(1))  # auto on CPU: the torch path
        assert o.dtype == torch.float32
        with pytest.raises(TypeError):
            lightning_attention(q.double(), q.double(), q.double(), torch.zeros(1), backend="triton")

    @pytest.mark.parametrize("inplace", [False, True])
    def test_prefill_then_decode(inplace):
        """prefill = lightning_attention(..., output_final_state=True); then steps continue the sequence."""
        B, T, H, Dk, Dv, P = 2, 12, 3, 24, 40, 7
        g = torch.Generator().manual_seed(11)
        q, k = (torch.randn(B, T, H, Dk, generator=g) for _ in range(2))
        v = torch.randn(B, T, H, Dv, generator=g)
        slope = slopes("mixed", H)
        ro, _ = lightning_attention_quadratic(q.double(), k.double(), v.double(), slope.double())
        o, state = lightning_attention(q[:, :P], k[:, :P], v[:, :P], slope, output_final_state=True, backend="triton")
        assert rel_err(o, ro[:, :P]) < 1e-5
        for t in range(P, T):
            before = state
            o_t, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state, inplace=inplace,
                                                  backend="triton")  # fmt: skip
            assert (state is before) == inplace
            assert rel_err(o_t, ro[:, t]) < 1e-5

    def test_decode_strided_state():
        B, H, Dk, Dv = 3, 2, 16, 20
        g = torch.Generator().manual_seed(13)
        q, k = (torch.randn(B, H, Dk, generator=g) for _ in range(2))
        v = torch.randn(B, H, Dv, generator=g)
        big = torch.randn(B, H, Dv, Dk, generator=g)
        state = big.transpose(-1, -2)  # a non-contiguous [B, H, Dk, Dv] view
        slope = slopes("alibi", H)
        ref_o, ref_s = lightning_attention_step(q, k, v, slope, state.double(), backend="torch")
        o, s = lightning_attention_step(q, k, v, slope, state, inplace=True, backend="triton")
        assert rel_err(o, ref_o) < 1e-6 and rel_err(big.transpose(-1, -2), ref_s) < 1e-6

    @pytest.mark.parametrize("D", [48, 100])
    def test_srmsnorm_family(D):
        g = torch.Generator().manual_seed(D)
        x = torch.randn(3, 5, D, generator=g) * 2
        u = torch.randn(3, 5, D, generator=g)
        dy = torch.randn(3, 5, D, generator=g)
        rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
        cases = {
            "norm": lambda x, u, r, be: srmsnorm(x, 1e-6, backend=be),
            "gate": lambda x, u, r, be: srmsnorm_gate(x, u, 1e-6, backend=be),
            "rstd": lambda x, u, r, be: norm_gate_rstd(x, u, r, backend=be),
        }
        for name, fn in cases.items():
            outs = []
            for be, dt in (("triton", torch.float32), ("torch", torch.float64)):
                leaves = [t.detach().to(dt).requires_grad_() for t in (x, u, rstd)]
                y = fn(*leaves, be)
                (y * dy.to(dt)).sum().backward()
                outs.append([y] + [t.grad for t in leaves])
            for i, (a, b) in enumerate(zip(*outs, strict=True)):
                if b is None:
                    assert a is None, (name, i)
                else:
                    assert rel_err(a, b) < 1e-5, (name, i, rel_err(a, b))
