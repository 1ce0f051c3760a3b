"""Where the Triton kernel tests run: in a TRITON_INTERPRET=1 subprocess on the CPU (the interpreter must be set
before the kernels are decorated, so a test module re-runs itself there through :func:`run_interpreter_suite`), or
on a CUDA GPU. Shared by the Triton op tests (tests/test_kernels.py, test_fused_elementwise.py,
test_cross_entropy.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cpu" if INTERPRET else "cuda"
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and no TRITON_INTERPRET)")
INTERPRETER_ONLY = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreter_suite's subprocess")


def run_interpreter_suite(test_file: str, timeout_s: int) -> None:
    """Run the tests of ``test_file`` in a pytest subprocess with TRITON_INTERPRET=1; fails with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]


def cases(interpret: list, cuda: list) -> list:
    """The parameter sets of a check shared by both targets: the interpreter's in the interpreter subprocess,
    else the GPU's (skipped without CUDA)."""
    if INTERPRET:
        return interpret
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=NEEDS_CUDA) for c in cuda]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """GPU: every kernel output filled with NaN before the kernels run (an unwritten element fails). Autouse in
    the modules that import it."""
    if not CUDA:
        yield
        return
    from megatron_tnllm.ops import backend

    backend.POISON_OUTPUTS = True
    yield
    backend.POISON_OUTPUTS = False
