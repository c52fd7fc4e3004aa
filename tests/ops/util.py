"""Shared helpers for the op tests: random routing inputs and per-dtype comparison."""

from __future__ import annotations

import torch

from moe_kernels.tolerances import DEFAULT_TOLERANCES

# Backends runnable on this machine for float ops; the reference is what they are checked against.
CPU_BACKENDS = ["cpu", "reference"]
DTYPES = [torch.float32, torch.bfloat16]


def random_experts(T, K, E, *, seed=0, skew=0.0):
    """(T, K) int32 distinct expert ids per token; skew > 0 draws experts Zipf-like."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if skew:
        scores = scores * torch.arange(1, E + 1, dtype=torch.float32).pow(-skew)
    return torch.topk(scores, K, dim=-1).indices.to(torch.int32)


def assert_close(actual, expected, dtype, what=""):
    tol = DEFAULT_TOLERANCES[dtype]
    err = (actual.double() - expected.double()).abs()
    if err.numel():
        print(f"{what} {dtype}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}")
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol.atol, rtol=tol.rtol)
