"""Triton kernel tests: the real kernels on CUDA, Triton's interpreter on CPU.

Without CUDA, every test module here runs with ``TRITON_INTERPRET=1``, set by a module-scoped
autouse fixture and restored afterwards, so the rest of the suite never sees it (benchmark smoke
tests that ask for backend="triton" on CPU are then declined, not interpreted). moe_kernels loads
its Triton kernels on first use, inside a test, where the variable is set: it fixes their mode.
"""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter_without_cuda():
    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
