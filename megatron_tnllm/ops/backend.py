"""Which implementation an operator runs, and the switches its Triton kernels share.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch references otherwise (fp64 inputs,
the precision of the oracle checks, stay on PyTorch); ``"torch"`` and ``"triton"`` force one. Triton on CPU
tensors runs under Triton's interpreter, which must be chosen before the kernels are decorated:
TRITON_INTERPRET=1 before megatron_tnllm is imported.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "BACKENDS",
    "INTERPRET",
    "POISON_OUTPUTS",
    "as_rows",
    "check_triton_device",
    "poison",
    "resolve_backend",
    "sm_count",
]

BACKENDS = ("auto", "torch", "triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tests set this to fill every kernel output with NaN before the kernels run, proving each element is written
POISON_OUTPUTS = False


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Maps ``backend`` to "torch" or "triton" for tensor ``x``: "auto" means Triton on CUDA, except for
    fp64, which the kernels do not take."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype != torch.float64 else "torch"
    return backend


def check_triton_device(x: torch.Tensor) -> None:
    """Refuses a CPU tensor for a Triton kernel unless the interpreter is on."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton on {x.device} tensors needs TRITON_INTERPRET=1 set before megatron_tnllm is imported"
        )


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (what launch grids are sized to); 4 elsewhere (the
    interpreter), so that small test shapes still take the multi-program paths."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def poison(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` filled with NaN when POISON_OUTPUTS is set (a freshly allocated kernel output), else ``t`` as is."""
    if POISON_OUTPUTS and t is not None:
        t.fill_(float("nan"))
    return t


def as_rows(t: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """t [..., W] (or any shape whose trailing dims make ``width``) as [M, W] rows with a unit column stride,
    the layout the Triton wrappers read through a row stride: a view when the rows collapse, else one copy."""
    t2 = t.reshape(-1, t.shape[-1] if width is None else width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
