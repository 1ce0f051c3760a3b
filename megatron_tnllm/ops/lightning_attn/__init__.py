"""Lightning attention: causal linear attention with a fixed per-head exponential decay.

Public entry points (the contract every backend honours):

* :func:`lightning_attention` — a whole sequence (training, prefill);
* :func:`lightning_attention_step` — one token per sequence (decode).

``backend`` ("auto", "torch", "triton"; see ``megatron_tnllm.ops.backend``) picks the Triton kernels or the
chunked PyTorch form.

Modules: ``naive.py`` (PyTorch references), ``chunk.py`` (Triton training/prefill kernels),
``decode.py`` (Triton one-token step).
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.backend import resolve_backend
from megatron_tnllm.ops.lightning_attn.naive import (
    lightning_attention_chunked,
    lightning_attention_quadratic,
    lightning_attention_recurrent,
    lightning_attention_step_torch,
)

__all__ = [
    "lightning_attention",
    "lightning_attention_chunked",
    "lightning_attention_quadratic",
    "lightning_attention_recurrent",
    "lightning_attention_step",
]


def _slope_version(slope: torch.Tensor) -> int:
    """The tensor's in-place version (inference tensors have none: they count as never modified)."""
    try:
        return slope._version
    except RuntimeError:
        return -1


def _check_floats(**tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")


def _check_slope(slope: torch.Tensor) -> None:
    """slope must be finite and >= 0 (lambda = exp(-slope) in (0, 1]). Reading the values of a CUDA tensor
    waits for the GPU, so a CUDA slope is checked once per in-place version (the layers keep one tensor per
    layer) and not at all while a CUDA graph is being captured."""
    _check_floats(slope=slope)
    on_gpu = slope.device.type != "cpu"
    if on_gpu:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        if getattr(slope, "_tnl_checked_version", None) == _slope_version(slope):
            return
    ok = torch.isfinite(slope) & (slope >= 0)
    if not bool(ok.all()):
        heads = (~ok).nonzero().flatten().tolist()
        raise ValueError(
            f"slope must be finite and >= 0 (decay exp(-slope) in (0, 1]); got {slope[heads].tolist()} at heads {heads}"
        )
    if on_gpu:
        slope._tnl_checked_version = _slope_version(slope)


def _check_attention_inputs(q, k, v, slope, initial_state, cu_seqlens) -> None:
    _check_floats(q=q, k=k, v=v)
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f"q, k, v must not be empty; got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv]; got {tuple(v.shape)}")
    if slope.shape != (H,):
        raise ValueError(f"slope must be [H] = [{H}]; got {tuple(slope.shape)}")
    _check_slope(slope)
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B = 1; got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor [N + 1]; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        bounds = cu_seqlens.tolist() if not cu_seqlens.is_cuda else None
        if bounds is not None and (
            bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:], strict=False))
        ):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}; got {bounds}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (n_seq, H, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must be [N, H, Dk, Dv] = {list(expected)}; got {tuple(initial_state.shape)}"
            )


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t = sum_{s <= t} exp(-slope)^(t-s) (q_t . k_s) v_s, plus the decayed initial state.

    Args:
        q, k: [B, T, H, Dk] floating point, not empty, any strides (SiLU/LRPE already applied; no scale).
        v: [B, T, H, Dv].
        slope: [H] fp32, finite and >= 0: lambda = exp(-slope) decay per token (0 = no decay).
        initial_state: [N, H, Dk, Dv] fp32 state before the first token (N = B, or the number of
            packed sequences).
        output_final_state: also return the [N, H, Dk, Dv] fp32 state after the last token.
        cu_seqlens: [N + 1] offsets of N sequences packed along T (B = 1); the state resets at each.
        backend: "auto", "torch" or "triton".

    Returns:
        (o [B, T, H, Dv] in q's dtype, final state or None)

    Causal for non-finite inputs too: a NaN / inf at position t never reaches o (or dq) before t, nor dk, dv
    after t.

    Raises:
        TypeError: non-float q, k, v or slope. ValueError: empty inputs, wrong shapes, a negative or
        non-finite slope, bad cu_seqlens or initial_state.
    """
    _check_attention_inputs(q, k, v, slope, initial_state, cu_seqlens)
    if resolve_backend(backend, q) == "triton":
        # imported here: the kernels are decorated at import, and TRITON_INTERPRET must be read then
        from megatron_tnllm.ops.lightning_attn.chunk import chunk_lightning_attention

        return chunk_lightning_attention(q, k, v, slope, initial_state, output_final_state, cu_seqlens)
    return lightning_attention_chunked(
        q, k, v, slope, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )


def lightning_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    *,
    inplace: bool = False,
    silu_qk: bool = False,
    keep: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step per sequence: S <- exp(-slope) S + k^T v; o = q S.

    Args:
        q, k: [B, H, Dk]; v: [B, H, Dv]; slope: [H] fp32; state: [B, H, Dk, Dv] fp32.
        inplace: update ``state`` in place (and return it) instead of returning a new tensor.
        silu_qk: apply SiLU to q and k first, rounded to their dtype as ``F.silu`` would (TNL's token mixer;
            the kernel does it as it loads them, instead of two more launches).
        keep: [B] bool, False for a padding token, whose v counts as zero (it adds nothing to the state).

    Returns:
        (o [B, H, Dv] in q's dtype, the updated state)
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k must be [B, H, Dk] and v [B, H, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    expected = (*q.shape, v.shape[-1])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, Dk, Dv] = {list(expected)}; got {tuple(state.shape)}")
    if state.dtype != torch.float32 and state.dtype != torch.float64:
        raise ValueError(f"state must be fp32 (or fp64 for checks); got {state.dtype}")
    if slope.shape != (q.shape[1],):
        raise ValueError(f"slope must be [H] = [{q.shape[1]}]; got {tuple(slope.shape)}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (q.shape[0],)):
        raise ValueError(f"keep must be a bool [B] = [{q.shape[0]}] tensor; got {keep.dtype} {tuple(keep.shape)}")
    _check_floats(q=q, k=k, v=v)
    _check_slope(slope)
    if resolve_backend(backend, state) == "triton":
        from megatron_tnllm.ops.lightning_attn.decode import lightning_attention_step_triton

        return lightning_attention_step_triton(q, k, v, slope, state, inplace=inplace, silu_qk=silu_qk, keep=keep)
    return lightning_attention_step_torch(q, k, v, slope, state, inplace=inplace, silu_qk=silu_qk, keep=keep)
