"""Run Megatron-Core on a CPU: stubs for the few CUDA-only calls on its CPU-capable paths.

For test workers and the CPU demo only; never imported by the package. Megatron-Core asks for
``torch.cuda.current_device()`` when allocating buffers, synchronises CUDA before checkpoint
writes, forks the CUDA RNG tracker around sequence-parallel dropout, and moves the tied output
embedding to CUDA before its pipeline all-reduce. On a CPU each of these means "the CPU" or
"nothing to do".
"""

import contextlib

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker


def apply_cpu_shims() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    CudaRNGStatesTracker.fork = contextlib.contextmanager(lambda self, *args, **kwargs: (yield))


class _NoStream:
    """torch.cuda.current_stream() on a CPU: every wait is already satisfied."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def _on_cpu(factory):
    def make(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return make


def apply_ddp_cpu_shims() -> None:
    """More stubs for Megatron's DistributedDataParallel and DistributedOptimizer on a CPU: the grad sync waits on
    the current CUDA stream, the optimizer sorts parameters by their CUDA tensor type names and allocates its
    flags and norms with ``device="cuda"``. Once per process (the stubs wrap torch's functions)."""
    if getattr(torch.Tensor.type, "cpu_shim", False):
        return
    apply_cpu_shims()
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    tensor_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        return tensor_type(self).replace("torch.", "torch.cuda.", 1)

    cuda_type.cpu_shim = True
    torch.Tensor.type = cuda_type
