"""Metrics of routing traces: the expert sets and router scores of individual tokens.

Definitions in ``docs/METRICS.md`` (``routing_stiffness`` and ``ngram_expertise`` of the DBES
suite; "Router health and structure"). Legend: L MoE layers, T tokens, K top-k slots, E experts.
"""

from __future__ import annotations

import numpy as np

from moe_testbed.metrics._arrays import (
    ArrayLike,
    as_numpy,
    check_experts,
    check_numeric,
    entropy,
    log_num_experts,
    per_layer,
)


def routing_stiffness(sets_a_TK: ArrayLike, sets_b_TK: ArrayLike) -> float | np.ndarray:
    """``mean_t |S_a(t) ∩ S_b(t)| / k`` for the same T tokens routed twice.

    Args: ``sets_a_TK``, ``sets_b_TK`` integer expert ids of the same shape, (T, K) or
    (L, T, K); each row holds K distinct experts.
    Returns: float (array (L,)) in [0, 1]; 1 = identical expert sets.
    Raises: ValueError on wrong rank, shape mismatch, non-integer or negative ids, T = 0.
    """
    a, layered = check_experts(sets_a_TK, "sets_a_TK")
    b, _ = check_experts(sets_b_TK, "sets_b_TK")
    if a.shape != b.shape:
        raise ValueError(f"sets_b_TK must have the shape of sets_a_TK {a.shape}, got {b.shape}")
    shared = (a[..., :, None] == b[..., None, :]).any(axis=-1).sum(axis=-1)
    return per_layer(shared.mean(axis=1) / a.shape[2], layered)


def ngram_expertise(
    gram_ids_T: ArrayLike, experts_TK: ArrayLike, min_count: int = 5
) -> float | np.ndarray:
    """``I(E; G) / H(E)`` over (token slot, expert) pairs, G = the n-gram ending at the token.

    N-grams seen fewer than ``min_count`` times (in tokens) share one bucket. Tokens with a
    negative gram id (no complete n-gram, see ``probes.ngram_ids``) are left out.
    Args: ``gram_ids_T`` (T,) integer ids; ``experts_TK`` (T, K) or (L, T, K) expert ids.
    Returns: float (array (L,)) in [0, 1]; 0 when H(E) = 0.
    Raises: ValueError on wrong rank, T mismatch, no usable token, or negative expert ids.
    """
    g = as_numpy(gram_ids_T)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"gram_ids_T must be 1-D integer, got shape {g.shape}, dtype {g.dtype}")
    ex, layered = check_experts(experts_TK, "experts_TK")
    if ex.shape[1] != g.shape[0]:
        raise ValueError(f"experts_TK must have T = {g.shape[0]} rows, got {ex.shape[1]}")
    keep = g >= 0
    if not keep.any():
        raise ValueError("gram_ids_T has no token with a complete n-gram (all ids negative)")
    uniq, inverse, seen = np.unique(g[keep], return_inverse=True, return_counts=True)
    common = seen >= min_count
    bucket_of = np.where(common, np.cumsum(common) - 1, common.sum())
    buckets = bucket_of[inverse.reshape(-1)]
    num_buckets = int(common.sum()) + 1
    ex = ex[:, keep, :]
    num_layers, _, k = ex.shape
    num_e = int(ex.max()) + 1
    flat = (np.repeat(buckets, k)[None, :] * num_e + ex.reshape(num_layers, -1)) + (
        np.arange(num_layers)[:, None] * num_buckets * num_e
    )
    joint = np.bincount(flat.ravel(), minlength=num_layers * num_buckets * num_e)
    p = joint.reshape(num_layers, num_buckets * num_e).astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    p3 = p.reshape(num_layers, num_buckets, num_e)
    h_e = entropy(p3.sum(axis=1))
    mutual = entropy(p3.sum(axis=2)) + h_e - entropy(p)
    ok = h_e > 1e-12
    value = np.where(ok, mutual / np.where(ok, h_e, 1.0), 0.0)
    return per_layer(np.clip(value, 0.0, 1.0), layered)


# ----------------------------------------------------------------------------- router health


def _distributions(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """Scores ``(L, T, E)`` normalised per token to sum 1, and whether ``x`` had a layer dim."""
    s = check_numeric(x, name, (2, 3), "2-D (T, E) or 3-D (L, T, E)").astype(np.float64)
    layered = s.ndim == 3
    s = s.reshape((-1,) + s.shape[-2:])
    total = s.sum(axis=2, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"{name} has a token whose scores are all zero")
    return s / total, layered


def router_entropy(scores_TE: ArrayLike) -> float | np.ndarray:
    """Mean over tokens of ``H(p_t) / log E``, ``p_t = s_t / sum_e s_t``.

    Scores are normalised per token to sum 1 first: softmax scores are unchanged, sigmoid
    scores become the distribution the balancing losses use. This is the value the trainer logs
    as ``router_entropy`` (``moe_kernels.stats`` accumulates the same quantity on device).
    Args: ``scores_TE`` (T, E) or (L, T, E) non-negative, E >= 2.
    Returns: float (array (L,)) in [0, 1]; 1 = uniform scores.
    Raises: ValueError on wrong rank, negative/non-finite scores, an all-zero row or E < 2.
    """
    p, layered = _distributions(scores_TE, "scores_TE")
    log_e = log_num_experts(p.shape[2], "router_entropy")
    return per_layer((entropy(p) / log_e).mean(axis=1), layered)


def router_confidence(scores_TE: ArrayLike) -> float | np.ndarray:
    """Mean over tokens of ``max_e p_t``, ``p_t = s_t / sum_e s_t``.

    Normalised per token like :func:`router_entropy` (softmax unchanged, sigmoid scores as a
    distribution), so it equals the logged ``router_confidence`` for every score function.
    Args: ``scores_TE`` (T, E) or (L, T, E) non-negative.
    Returns: float (array (L,)) in [1/E, 1]; 1 = all of a token's score on one expert.
    Raises: ValueError on wrong rank, negative/non-finite scores or an all-zero row.
    """
    p, layered = _distributions(scores_TE, "scores_TE")
    return per_layer(p.max(axis=2).mean(axis=1), layered)


def coactivation(experts_TK: ArrayLike, num_experts: int) -> np.ndarray:
    """``M[i, j] = N(i and j both selected) / N(i selected)``, counted over tokens.

    Each token contributes every one of its k-choose-2 expert pairs (in both orders). The
    diagonal is 1 for experts that were selected; rows of never-selected experts are 0.
    Args: ``experts_TK`` (T, K) or (L, T, K) ids in [0, E); ``num_experts`` E.
    Returns: float64 array (E, E) or (L, E, E); row i is P(j selected | i selected).
    Raises: ValueError on wrong rank, non-integer ids, or ids outside [0, E).
    """
    ex, layered = check_experts(experts_TK, "experts_TK")
    if ex.max() >= num_experts:
        raise ValueError(f"experts_TK ids must be < num_experts = {num_experts}, got {ex.max()}")
    num_layers, num_tokens, _ = ex.shape
    onehot = np.zeros((num_layers, num_tokens, num_experts), dtype=np.float64)
    np.put_along_axis(onehot, ex, 1.0, axis=2)
    joint = np.einsum("lte,ltf->lef", onehot, onehot)
    single = np.diagonal(joint, axis1=1, axis2=2)
    matrix = joint / np.where(single > 0, single, 1.0)[:, :, None]
    return matrix if layered else matrix[0]
