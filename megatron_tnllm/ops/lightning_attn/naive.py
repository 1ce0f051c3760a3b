"""Plain PyTorch forms of lightning attention: the oracle for every kernel.

The operator, per head h with decay lambda_h = exp(-slope_h) and fp32 state S [Dk, Dv]:

    S_t = lambda_h * S_{t-1} + k_t^T v_t,        o_t = q_t S_t

i.e. o_t = sum_{s <= t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S_init.
No softmax, no scale, no denominator. Three independent forms compute it:

* ``quadratic``: the masked (T x T) product, the definition;
* ``chunked``: the Lightning Attention-2 split (intra-chunk masked product plus an
  inter-chunk state), what the fast kernels do;
* ``recurrent``: the token-by-token recurrence, what decoding does.

Every form only ever raises lambda to powers >= 0, so strong decays underflow to 0 instead of
overflowing. Causality holds for non-finite inputs too: the masked (T x T) products select (never multiply by
a 0 mask) and ``_tri_matmul`` keeps a NaN / inf at position t out of every output row that does not depend on
t, in the forward and the backward (a NaN in v_t reaches o_s only for s >= t; in do_t, dk_s and dv_s only for
s <= t). All arithmetic runs in fp32 (fp64 when any input is fp64); outputs are cast to q's dtype.
Layout: q, k [B, T, H, Dk]; v [B, T, H, Dv]; slope [H]; states [N, H, Dk, Dv] fp32.
"""

from __future__ import annotations

import torch

__all__ = [
    "lightning_attention_chunked",
    "lightning_attention_quadratic",
    "lightning_attention_recurrent",
    "lightning_attention_step_torch",
]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sequence(fn):
    """Lifts a single-batch form to packed sequences: B = 1 with ``cu_seqlens`` [N + 1]."""

    def wrapper(q, k, v, slope, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        if cu_seqlens is None:
            return fn(q, k, v, slope, initial_state, output_final_state, **kw)
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            o, ht = fn(q[:, start:end], k[:, start:end], v[:, start:end], slope, h0, output_final_state, **kw)
            outs.append(o)
            states.append(ht)
        o = torch.cat(outs, dim=1)
        return o, (torch.cat(states, dim=0) if output_final_state else None)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _decay_mask(s: torch.Tensor, n: int) -> torch.Tensor:
    """[1, H, n, n] with lambda^(i-j) for i >= j and 0 above the diagonal (no negative powers)."""
    i = torch.arange(n, device=s.device, dtype=s.dtype)
    dist = i[:, None] - i[None, :]
    return torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=s.dtype, device=s.device))


def _tri_matmul(m: torch.Tensor, x: torch.Tensor, lower: bool) -> torch.Tensor:
    """m @ x for a lower (row i uses x_j, j <= i) or upper (j >= i) triangular m [.., n, n], x [.., n, D].

    A plain product turns 0 * NaN above the triangle into NaN: non-finite entries of x are zeroed for the
    product instead, and y[i, c] is set to NaN exactly where some x[j, c] inside row i's triangle is non-finite.
    """
    finite = torch.isfinite(x)
    y = m @ torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if not bool(finite.all()):
        n = x.shape[-2]
        tri = torch.ones(n, n, dtype=x.dtype, device=x.device)
        tri = tri.tril() if lower else tri.triu()
        reach = tri @ (~finite).to(x.dtype)
        y = torch.where(reach > 0, torch.full((), float("nan"), dtype=y.dtype, device=y.device), y)
    return y


class _IntraChunk(torch.autograd.Function):
    """O = A V with A = where(i >= j, (Q K^T) * D, 0): every masked product through ``_tri_matmul``, so a
    non-finite input reaches only the outputs (and gradients) that depend on it. q, k [B, H, n, Dk];
    v [B, H, n, Dv]; decay [1, H, n, n] (lower triangular, not differentiated)."""

    @staticmethod
    def forward(ctx, q, k, v, decay):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        a = torch.where(causal, (q @ k.transpose(-1, -2)) * decay, zero)
        ctx.save_for_backward(q, k, v, decay)
        return _tri_matmul(a, v, lower=True)

    @staticmethod
    def backward(ctx, do):
        q, k, v, decay = ctx.saved_tensors
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        a = torch.where(causal, (q @ k.transpose(-1, -2)) * decay, zero)
        # dA_ij = do_i . v_j, kept only for j <= i (a select: v_j beyond row i never enters)
        ds = torch.where(causal, (do @ v.transpose(-1, -2)) * decay, zero)
        dq = _tri_matmul(ds, k, lower=True)
        dk = _tri_matmul(ds.transpose(-1, -2), q, lower=False)
        dv = _tri_matmul(a.transpose(-1, -2), do, lower=False)
        return dq, dk, dv, None


def _prepare(q, k, v, slope, initial_state):
    """[B, T, H, D] inputs -> [B, H, T, D] in the compute dtype; slope -> [1, H, 1, 1]; state [B, H, Dk, Dv]."""
    dtype = _compute_dtype(q, k, v, initial_state)
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    qh, kh, vh = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    s = slope.to(dtype).view(1, H, 1, 1)
    if initial_state is None:
        state = torch.zeros(B, H, Dk, Dv, dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)
    return qh, kh, vh, s, state


@_per_sequence
def lightning_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition: O = ((Q K^T) * M) V + diag(lambda^(t+1)) Q S_init, M_ts = lambda^(t-s) for t >= s.

    Memory is O(T^2) per head: for tests only.
    """
    qh, kh, vh, s, state = _prepare(q, k, v, slope, initial_state)
    T = qh.shape[2]
    t = torch.arange(T, device=q.device, dtype=qh.dtype)
    o = _IntraChunk.apply(qh, kh, vh, _decay_mask(s, T))
    o = o + torch.exp(-s * (t + 1)[:, None]) * (qh @ state)
    final = None
    if output_final_state:
        k_decay = torch.exp(-s * (T - 1 - t)[:, None])  # lambda^(T-1-s)
        final = torch.exp(-s * T) * state + (kh * k_decay).transpose(-1, -2) @ vh
    return o.transpose(1, 2).to(q.dtype), final


@_per_sequence
def lightning_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention-2 form, chunk C, in-chunk offsets i, j = 0..c-1 (c = true chunk length):

    O = ((Q K^T) * D) V + diag(lambda^(i+1)) Q S,    D_ij = lambda^(i-j) for i >= j
    S <- lambda^c S + (diag(lambda^(c-1-j)) K)^T V
    """
    qh, kh, vh, s, state = _prepare(q, k, v, slope, initial_state)
    T = qh.shape[2]
    outs = []
    for start in range(0, T, chunk_size):
        c = min(chunk_size, T - start)
        qc, kc, vc = qh[:, :, start : start + c], kh[:, :, start : start + c], vh[:, :, start : start + c]
        i = torch.arange(c, device=q.device, dtype=qh.dtype)
        o = _IntraChunk.apply(qc, kc, vc, _decay_mask(s, c)) + torch.exp(-s * (i + 1)[:, None]) * (qc @ state)
        outs.append(o)
        k_decay = torch.exp(-s * (c - 1 - i)[:, None])
        state = torch.exp(-s * c) * state + (kc * k_decay).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2) if outs else qh.new_zeros(*qh.shape[:3], vh.shape[-1])
    return o.transpose(1, 2).to(q.dtype), (state if output_final_state else None)


@_per_sequence
def lightning_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token by token: S <- lambda S + k^T v, o = q S."""
    qh, kh, vh, s, state = _prepare(q, k, v, slope, initial_state)
    decay = torch.exp(-s)
    outs = []
    for t in range(qh.shape[2]):
        state = decay * state + kh[:, :, t, :, None] * vh[:, :, t, None, :]
        outs.append((qh[:, :, t, None, :] @ state).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else qh.new_zeros(*qh.shape[:3], vh.shape[-1])
    return o.transpose(1, 2).to(q.dtype), (state if output_final_state else None)


def lightning_attention_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    inplace: bool = False,
    silu_qk: bool = False,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k [B, H, Dk]; v [B, H, Dv]; state [B, H, Dk, Dv] fp32 -> (o [B, H, Dv], state).

    silu_qk: q, k <- SiLU(q), SiLU(k) first (in their dtype); keep [B] bool: v <- 0 on rows where it is False.
    """
    if silu_qk:
        q, k = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
    if keep is not None:
        v = torch.where(keep[:, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    dtype = _compute_dtype(q, k, v, state)
    decay = torch.exp(-slope.to(dtype)).view(1, -1, 1, 1)
    update = k.to(dtype)[..., :, None] * v.to(dtype)[..., None, :]
    if inplace:
        new_state = state.mul_(decay.to(state.dtype)).add_(update.to(state.dtype))
    else:
        new_state = decay * state.to(dtype) + update
    o = (q.to(dtype)[..., None, :] @ new_state.to(dtype)).squeeze(-2)
    return o.to(q.dtype), new_state
