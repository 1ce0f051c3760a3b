"""Helpers shared by the tests (megatron-free, so the kernel and Hugging Face tests import it too).

The CPU stand-ins for Megatron-Core's CUDA-only calls are in :mod:`tests.cpu_shims`; the multi-process harness
in :mod:`tests.distributed`; Megatron model helpers in :mod:`tests.megatron_utils`.
"""

from __future__ import annotations

import torch

from megatron_tnllm.ops.decay import alibi_slopes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def alibi(num_heads: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """TNL's ALiBi slopes of ``num_heads`` heads [H] (:func:`megatron_tnllm.ops.decay.alibi_slopes`)."""
    return torch.tensor(alibi_slopes(num_heads), dtype=dtype, device=device)


def pythonpath(*folders) -> str:
    """A PYTHONPATH with ``folders`` first, then the current one's entries (for subprocesses)."""
    import os

    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])
