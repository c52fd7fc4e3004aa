"""Shared helpers of the Triton kernel tests.

This folder has no __init__.py (a test package named ``triton`` would shadow the real one), so
this module's name is unique. The tests load the kernel modules only through moe_kernels, inside
tests (never at module level), where conftest.py has set TRITON_INTERPRET on CPU-only machines."""

from __future__ import annotations

import pytest
import torch

from moe_kernels.tolerances import tolerance
from moe_kernels.triton import families

# The kernels run where the tests can run them: on the GPU, or on CPU through Triton's
# interpreter (conftest.py sets TRITON_INTERPRET=1 around these tests when there is no CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.skipif(
    not families.TRITON_INSTALLED, reason="triton is not installed (pip install '.[triton]')"
)
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual, expected, dtype, what="", *, reduction=None):
    """Compare with the per-dtype tolerance of moe_kernels.tolerances.

    ``reduction``: for GEMM outputs, the length of the dot products. Each output is then a sum of
    ``reduction`` products of unit-scale values, so its magnitude, and the accumulation error on
    it (random-sign rounding errors add up like a random walk), grow like sqrt(reduction): the
    absolute tolerance is scaled by that factor and the relative one kept."""
    tol = tolerance(dtype, reduction)
    atol = tol.atol
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).abs()
    if err.numel():
        print(f"{what} {dtype}: max err {err.max().item():.3e} (atol {atol:.1e})")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=tol.rtol)


def random_experts(T, K, E, *, seed=0):
    """(T, K) int32 distinct expert ids per token."""
    g = torch.Generator().manual_seed(seed)
    return torch.topk(torch.rand(T, E, generator=g), K, dim=-1).indices.to(torch.int32)


def offsets_from_sizes(sizes, device=DEVICE):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32).to(device)
