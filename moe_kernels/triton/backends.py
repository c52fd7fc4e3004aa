"""Triton backend objects for the op families (see moe_kernels.ops._backend)."""

from __future__ import annotations

from moe_kernels.ops import _backend as B


def make(family: str) -> B.Backend:
    """The Triton backend of ``family`` or a placeholder that says why there is none."""
    return B.NotImplementedBackend("triton", f"no Triton {family} kernel in this version")
