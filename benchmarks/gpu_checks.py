"""Correctness checks of the GPU benchmarks: every implementation's outputs and gradients against
a plain-torch fp32 reference, and the status strings of the rows (``ok``, ``WRONG (...)``,
``ERROR: ...``, ``not available: ...``)."""

from __future__ import annotations

import math

import torch

# (relative L2 error, largest error relative to the largest reference value) allowed per dtype
# against the fp32 plain-torch reference.
TOLERANCES = {
    torch.bfloat16: (1.5e-2, 5e-2),
    torch.float16: (3e-3, 1e-2),
    torch.float32: (1e-4, 1e-3),
}


def rel_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, b = actual.detach().double(), expected.detach().double()
    if a.shape != b.shape:
        return math.inf, math.inf
    if not bool(torch.isfinite(a).all()):
        return math.inf, math.inf
    scale_l2 = float(b.norm()) or 1.0
    scale_max = float(b.abs().max()) if b.numel() else 1.0
    diff = a - b
    return float(diff.norm()) / scale_l2, (float(diff.abs().max()) / (scale_max or 1.0))


def compare(actual: dict, expected: dict, dtype: torch.dtype) -> tuple[bool, dict]:
    """Compare named tensors; returns (all within tolerance, {name: [rel L2, rel max]})."""
    tol_l2, tol_max = TOLERANCES[dtype]
    errors, ok = {}, True
    for name, ref in expected.items():
        got = actual.get(name)
        if got is None:
            errors[name], ok = [math.inf, math.inf], False
            continue
        l2, mx = rel_errors(got, ref)
        errors[name] = [l2, mx]
        ok = ok and l2 <= tol_l2 and mx <= tol_max
    return ok, errors


def wrong_status(errors: dict, dtype: torch.dtype) -> str:
    """``errors``: name -> [rel L2, rel max] (float comparison) or "equal"/"differs" (exact)."""
    tol_l2, tol_max = TOLERANCES[dtype]
    bad = []
    for n, v in errors.items():
        if isinstance(v, str):
            if v != "equal":
                bad.append(f"{n} {v}")
        elif not (v[0] <= tol_l2 and v[1] <= tol_max):
            bad.append(f"{n} rel err {v[0]:.2g}/{v[1]:.2g} (tolerance {tol_l2:g}/{tol_max:g})")
    return f"WRONG ({'; '.join(bad)})"


def error_status(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"ERROR: {type(exc).__name__}: {msg[0][:160] if msg else ''}"


def unavailable_status(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # NoBackendError lists "  backend: reasons" lines after a header; keep the reasons.
    reasons = lines[1:] if len(lines) > 1 else lines
    return "not available: " + " | ".join(reasons)[:200]
