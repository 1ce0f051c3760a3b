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
