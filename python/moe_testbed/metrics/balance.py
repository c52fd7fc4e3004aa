"""Load and utilization metrics of routing counts (``docs/METRICS.md``, "Load and utilization").

Legend: L MoE layers, D domains, E experts. ``C[d, e]`` counts top-k selections; ``f_e`` is the
load share of expert e.
"""

from __future__ import annotations

import numpy as np

from moe_testbed.metrics._arrays import (
    ArrayLike,
    check_counts,
    check_numeric,
    entropy,
    fractions,
    log_num_experts,
    per_layer,
)


def load_fractions(counts_DE: ArrayLike) -> np.ndarray:
    """Load share of each expert, ``f_e = sum_d C[d, e] / n``.

    Args: ``counts_DE`` (D, E) or (L, D, E) non-negative counts.
    Returns: float64 array (E,) or (L, E); each row sums to 1.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    return fractions(c) if layered else fractions(c)[0]


def utilization(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_e min(f_e, 1/E)``: the share of load that a uniform router would also place.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [1/E, 1]; 1 = uniform.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    f = fractions(c)
    return per_layer(np.minimum(f, 1.0 / f.shape[1]).sum(axis=1), layered)


def load_entropy(counts_DE: ArrayLike) -> float | np.ndarray:
    """Normalized entropy of the load, ``-sum_e f_e log f_e / log E``.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1];
    1 = uniform. Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    log_e = log_num_experts(c.shape[2], "load_entropy")
    return per_layer(entropy(fractions(c)) / log_e, layered)


def max_violation(counts_DE: ArrayLike) -> float | np.ndarray:
    """MaxVio, ``E * max_e f_e - 1``.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [0, E - 1];
    0 = uniform. Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    f = fractions(c)
    return per_layer(f.shape[1] * f.max(axis=1) - 1.0, layered)


def load_cv(counts_DE: ArrayLike) -> float | np.ndarray:
    """Coefficient of variation of the load: population std of f over its mean (1/E).

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) >= 0; 0 = uniform.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    f = fractions(c)
    return per_layer(f.std(axis=1) / f.mean(axis=1), layered)


def dead_experts(counts_DE: ArrayLike, threshold: float = 0.01) -> int | np.ndarray:
    """Number of experts with ``E * f_e < threshold`` (load below 1% of uniform by default).

    Args: ``counts_DE`` (D, E) or (L, D, E); ``threshold`` relative to the uniform share.
    Returns: int (int array (L,)) in [0, E - 1]; ideal 0.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    f = fractions(c)
    return per_layer((f.shape[1] * f < threshold).sum(axis=1).astype(np.int64), layered)


def drop_rate(requested_E: ArrayLike, kept_E: ArrayLike) -> float | np.ndarray:
    """Share of requested selections dropped by capacity, ``1 - sum kept / sum requested``.

    Args: ``requested_E`` and ``kept_E`` of the same shape: (E,) or (D, E) for one layer,
    (L, D, E) for one value per layer; ``kept <= requested`` elementwise.
    Returns: float (array (L,)) in [0, 1]; 0 = dropless.
    Raises: ValueError on wrong rank, shape mismatch, negative counts, kept > requested or an
    all-zero ``requested``.
    """
    what = "1-D (E,), 2-D (D, E) or 3-D (L, D, E)"
    req = check_numeric(requested_E, "requested_E", (1, 2, 3), what).astype(np.float64)
    kept = check_numeric(kept_E, "kept_E", (1, 2, 3), what).astype(np.float64)
    if req.shape != kept.shape:
        raise ValueError(f"kept_E must have the shape of requested_E {req.shape}, got {kept.shape}")
    if np.any(kept > req):
        raise ValueError("kept_E must be <= requested_E elementwise, got kept > requested")
    layered = req.ndim == 3
    axes = (1, 2) if layered else None
    r_sum = np.atleast_1d(req.sum(axis=axes))
    if np.any(r_sum <= 0):
        raise ValueError("requested_E is empty (all zeros); expected at least one selection")
    return per_layer(1.0 - np.atleast_1d(kept.sum(axis=axes)) / r_sum, layered)
