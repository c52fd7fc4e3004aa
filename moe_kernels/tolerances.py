"""Per-dtype tolerances for a kernel's float output against the reference: the one set of numbers
used by the op tests, the first-use self-check of the GPU backends and
``python -m moe_kernels.selfcheck``.

A value passes when ``|actual - expected| <= atol + rtol * |expected|`` elementwise. For GEMM
outputs (sums of ``reduction`` products of unit-scale values) the magnitude and the accumulation
error both grow like sqrt(reduction) (random-sign rounding errors add up like a random walk), so
:func:`tolerance` scales the absolute part by that factor and keeps the relative one.

This module imports nothing of moe_kernels (``moe_kernels.ops._select`` re-exports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"{self.atol:.1e}+{self.rtol:.0e}*|ref|"


# Per-dtype tolerances for float outputs compared with the fp32/fp64 reference.
DEFAULT_TOLERANCES = {
    torch.float64: Tolerance(1e-10, 1e-8),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.bfloat16: Tolerance(2e-2, 2e-2),
    torch.float16: Tolerance(2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype, reduction: int | None = None) -> Tolerance:
    """The tolerance of an output of ``dtype``; ``reduction``: the length of the dot products
    behind it (GEMM outputs), which scales the absolute part by sqrt(reduction)."""
    tol = DEFAULT_TOLERANCES[dtype]
    if not reduction:
        return tol
    return Tolerance(tol.atol * math.sqrt(reduction), tol.rtol)


def max_error(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> tuple[float, bool]:
    """(largest absolute error, whether every element is within ``tol``), in fp64 on the host
    (one synchronisation). Shapes must match; NaN or inf where the reference is finite fails."""
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf, False
    if actual.numel() == 0:
        return 0.0, True
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    err = (a - b).abs()
    ok = bool(((err <= tol.atol + tol.rtol * b.abs()) | (a == b)).all())
    worst = float(err.nan_to_num(nan=math.inf).max())
    return worst, ok and math.isfinite(worst)
