"""Input handling shared by the metric modules: conversion, validation, per-layer output.

Legend: L MoE layers, D domains, E experts, T tokens, K top-k slots.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ArrayLike = Any  # numpy array, torch tensor (any device) or nested sequence


def as_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view/copy of ``x``; torch tensors come to host (floating dtypes as float64)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach()
        if t.is_floating_point():
            t = t.double()
        return t.cpu().numpy()
    return np.asarray(x)


def check_numeric(x: ArrayLike, name: str, ranks: tuple[int, ...], what: str) -> np.ndarray:
    a = as_numpy(x)
    if a.ndim not in ranks:
        raise ValueError(f"{name} must be {what}, got a {a.ndim}-D array of shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if a.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {a.min()}")
    return a


def check_counts(x: ArrayLike, name: str = "counts") -> tuple[np.ndarray, bool]:
    """Validated counts as float64 ``(L, D, E)`` and whether the input had a layer dim."""
    a = check_numeric(x, name, (2, 3), "2-D (D, E) or 3-D (L, D, E)")
    layered = a.ndim == 3
    c = a.astype(np.float64).reshape((-1,) + a.shape[-2:])
    totals = c.sum(axis=(1, 2))
    if np.any(totals <= 0):
        where = f" in layer {int(np.argmax(totals <= 0))}" if layered else ""
        raise ValueError(f"{name} is empty (all zeros){where}; expected at least one selection")
    return c, layered


def check_experts(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """Validated expert ids as int64 ``(L, T, K)`` and whether the input had a layer dim."""
    a = as_numpy(x)
    if a.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D (T, K) or 3-D (L, T, K), got a {a.ndim}-D array of shape {a.shape}"
        )
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids, got dtype {a.dtype}")
    if a.shape[-2] == 0 or a.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); expected T >= 1 and K >= 1")
    if a.min() < 0:
        raise ValueError(f"{name} must hold expert ids >= 0, got minimum {a.min()}")
    return a.astype(np.int64).reshape((-1,) + a.shape[-2:]), a.ndim == 3


def per_layer(values_L: np.ndarray, layered: bool) -> Any:
    if layered:
        return np.asarray(values_L)
    v = values_L[0]
    return np.asarray(v) if np.ndim(v) else v.item()


def log_num_experts(num_experts: int, name: str) -> float:
    if num_experts < 2:
        raise ValueError(f"{name} is normalized by log E and needs E >= 2, got E = {num_experts}")
    return math.log(num_experts)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of distributions along ``axis``; 0 log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=axis)


def domain_rows(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pi_LD, q_LDE, active_LD)``; q rows of empty domains are all zero."""
    row = c.sum(axis=2)
    pi = row / row.sum(axis=1, keepdims=True)
    active = row > 0
    q = c / np.where(active, row, 1.0)[:, :, None]
    return pi, q, active


def fractions(c: np.ndarray) -> np.ndarray:
    col = c.sum(axis=1)
    return col / col.sum(axis=1, keepdims=True)
