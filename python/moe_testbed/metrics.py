"""Routing and specialization metrics, exactly as defined in ``shared/METRICS.md``.

Every function is pure: it takes numpy arrays or torch tensors (any device, any numeric dtype)
and returns a Python float, or a numpy array for the per-expert ones. A leading layer dimension
gives one value per layer, as a numpy array of length L.

Legend:
    L  MoE layers             D  domains (label groups)       E  routed experts
    T  tokens                 K  top-k slots per token

``C[d, e]`` (``counts_DE``) is the number of top-k selections (token, slot) of domain-d tokens
that chose expert e; ``n = sum C``; load ``f_e = sum_d C[d, e] / n``; domain share
``pi_d = sum_e C[d, e] / n``; domain routing distribution ``q_d = C[d, :] / sum_e C[d, e]``.
Natural logarithms, ``0 log 0 = 0``.

Domains with no selections at all (a domain absent from an evaluation) have ``pi_d = 0`` and no
``q_d``: they are left out of the per-domain averages, the pairs of ``domain_isolation`` and the
``min(D, E)`` of ``normalized_effective_rank``.

Errors: a wrong rank, a negative or non-finite count, or an all-zero input (per layer) raise
``ValueError`` naming the argument, the expected and the actual value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

ArrayLike = Any  # numpy array, torch tensor (any device) or nested sequence

__all__ = [
    "load_fractions",
    "utilization",
    "load_entropy",
    "max_violation",
    "load_cv",
    "dead_experts",
    "drop_rate",
    "purity",
    "nmi",
    "conditional_entropy",
    "matched_groups",
    "reference_agreement",
    "specialization_score",
    "routing_specialization",
    "normalized_effective_rank",
    "domain_isolation",
    "routing_stiffness",
    "ngram_expertise",
    "router_entropy",
    "router_confidence",
    "coactivation",
    "summarize",
]


# ----------------------------------------------------------------------------- input handling


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view/copy of ``x``; torch tensors come to host (bf16/fp16 widened first)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach()
        if t.is_floating_point():
            t = t.double()
        return t.cpu().numpy()
    return np.asarray(x)


def _numeric(x: ArrayLike, name: str, ranks: tuple[int, ...], what: str) -> np.ndarray:
    a = _to_numpy(x)
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


def _counts(x: ArrayLike, name: str = "counts") -> tuple[np.ndarray, bool]:
    """Validated counts as float64 ``(L, D, E)`` and whether the input had a layer dim."""
    a = _numeric(x, name, (2, 3), "2-D (D, E) or 3-D (L, D, E)")
    layered = a.ndim == 3
    c = a.astype(np.float64).reshape((-1,) + a.shape[-2:])
    totals = c.sum(axis=(1, 2))
    if np.any(totals <= 0):
        where = f" in layer {int(np.argmax(totals <= 0))}" if layered else ""
        raise ValueError(f"{name} is empty (all zeros){where}; expected at least one selection")
    return c, layered


def _experts(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """Validated expert ids as int64 ``(L, T, K)`` and whether the input had a layer dim."""
    a = _to_numpy(x)
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


def _out(values_L: np.ndarray, layered: bool) -> Any:
    if layered:
        return np.asarray(values_L)
    v = values_L[0]
    return np.asarray(v) if np.ndim(v) else v.item()


def _require_log_e(num_experts: int, name: str) -> float:
    if num_experts < 2:
        raise ValueError(f"{name} is normalized by log E and needs E >= 2, got E = {num_experts}")
    return math.log(num_experts)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of distributions along ``axis``; 0 log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=axis)


def _domain_rows(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pi_LD, q_LDE, active_LD)``; q rows of empty domains are all zero."""
    row = c.sum(axis=2)
    pi = row / row.sum(axis=1, keepdims=True)
    active = row > 0
    q = c / np.where(active, row, 1.0)[:, :, None]
    return pi, q, active


def _fractions(c: np.ndarray) -> np.ndarray:
    col = c.sum(axis=1)
    return col / col.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- load


def load_fractions(counts_DE: ArrayLike) -> np.ndarray:
    """Load share of each expert, ``f_e = sum_d C[d, e] / n``.

    Args: ``counts_DE`` (D, E) or (L, D, E) non-negative counts.
    Returns: float64 array (E,) or (L, E); each row sums to 1.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    return _fractions(c) if layered else _fractions(c)[0]


def utilization(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_e min(f_e, 1/E)``: the share of load that a uniform router would also place.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [1/E, 1]; 1 = uniform.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    f = _fractions(c)
    return _out(np.minimum(f, 1.0 / f.shape[1]).sum(axis=1), layered)


def load_entropy(counts_DE: ArrayLike) -> float | np.ndarray:
    """Normalized entropy of the load, ``-sum_e f_e log f_e / log E``.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1];
    1 = uniform. Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    log_e = _require_log_e(c.shape[2], "load_entropy")
    return _out(_entropy(_fractions(c)) / log_e, layered)


def max_violation(counts_DE: ArrayLike) -> float | np.ndarray:
    """MaxVio, ``E * max_e f_e - 1``.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [0, E - 1];
    0 = uniform. Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    f = _fractions(c)
    return _out(f.shape[1] * f.max(axis=1) - 1.0, layered)


def load_cv(counts_DE: ArrayLike) -> float | np.ndarray:
    """Coefficient of variation of the load: population std of f over its mean (1/E).

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) >= 0; 0 = uniform.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    f = _fractions(c)
    return _out(f.std(axis=1) / f.mean(axis=1), layered)


def dead_experts(counts_DE: ArrayLike, threshold: float = 0.01) -> int | np.ndarray:
    """Number of experts with ``E * f_e < threshold`` (load below 1% of uniform by default).

    Args: ``counts_DE`` (D, E) or (L, D, E); ``threshold`` relative to the uniform share.
    Returns: int (int array (L,)) in [0, E - 1]; ideal 0.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    f = _fractions(c)
    return _out((f.shape[1] * f < threshold).sum(axis=1).astype(np.int64), layered)


def drop_rate(requested_E: ArrayLike, kept_E: ArrayLike) -> float | np.ndarray:
    """Share of requested selections dropped by capacity, ``1 - sum kept / sum requested``.

    Args: ``requested_E`` and ``kept_E`` of the same shape: (E,) or (D, E) for one layer,
    (L, D, E) for one value per layer; ``kept <= requested`` elementwise.
    Returns: float (array (L,)) in [0, 1]; 0 = dropless.
    Raises: ValueError on wrong rank, shape mismatch, negative counts, kept > requested or an
    all-zero ``requested``.
    """
    what = "1-D (E,), 2-D (D, E) or 3-D (L, D, E)"
    req = _numeric(requested_E, "requested_E", (1, 2, 3), what).astype(np.float64)
    kept = _numeric(kept_E, "kept_E", (1, 2, 3), what).astype(np.float64)
    if req.shape != kept.shape:
        raise ValueError(f"kept_E must have the shape of requested_E {req.shape}, got {kept.shape}")
    if np.any(kept > req):
        raise ValueError("kept_E must be <= requested_E elementwise, got kept > requested")
    layered = req.ndim == 3
    axes = (1, 2) if layered else None
    r_sum = np.atleast_1d(req.sum(axis=axes))
    if np.any(r_sum <= 0):
        raise ValueError("requested_E is empty (all zeros); expected at least one selection")
    return _out(1.0 - np.atleast_1d(kept.sum(axis=axes)) / r_sum, layered)


# ----------------------------------------------------------------------------- specialization


def purity(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_e max_d C[d, e] / n``: share of selections from each expert's majority domain.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [max_d pi_d, 1];
    1 = every expert serves one domain. Raises: ValueError on wrong rank, negative or all-zero.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    return _out(c.max(axis=1).sum(axis=1) / c.sum(axis=(1, 2)), layered)


def nmi(counts_DE: ArrayLike) -> float | np.ndarray:
    """Normalized mutual information ``I(D; E) / sqrt(H(D) H(E))`` of ``p(d, e) = C[d, e] / n``.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [0, 1]; 0 when
    H(D) or H(E) is 0. Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    p = c / c.sum(axis=(1, 2), keepdims=True)
    h_d = _entropy(p.sum(axis=2))
    h_e = _entropy(p.sum(axis=1))
    h_de = _entropy(p.reshape(p.shape[0], -1))
    denom = np.sqrt(h_d * h_e)
    ok = denom > 1e-12
    value = np.where(ok, (h_d + h_e - h_de) / np.where(ok, denom, 1.0), 0.0)
    return _out(np.clip(value, 0.0, 1.0), layered)


def conditional_entropy(counts_DE: ArrayLike) -> float | np.ndarray:
    """``H(E | D) / log E = sum_d pi_d H(q_d) / log E``.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1];
    ``log(E/D) / log E`` for the reference router spreading top-1 evenly in its group.
    Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    log_e = _require_log_e(c.shape[2], "conditional_entropy")
    pi, q, _ = _domain_rows(c)
    return _out((pi * _entropy(q)).sum(axis=1) / log_e, layered)


def _group_mask(groups: Sequence[Sequence[int]], num_domains: int, num_experts: int) -> np.ndarray:
    if len(groups) != num_domains:
        raise ValueError(f"groups must hold one list per domain ({num_domains}), got {len(groups)}")
    mask = np.zeros((num_domains, num_experts), dtype=bool)
    for d, group in enumerate(groups):
        ids = np.asarray(list(group), dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"groups[{d}] is empty; expected at least one expert id")
        if ids.min() < 0 or ids.max() >= num_experts:
            raise ValueError(f"groups[{d}] must hold expert ids in [0, {num_experts}), got {ids}")
        if mask[:, ids].any() or len(set(ids.tolist())) != ids.size:
            raise ValueError(f"groups must be disjoint; expert(s) of groups[{d}] appear twice")
        mask[d, ids] = True
    return mask


def matched_groups(counts_DE: ArrayLike) -> list[list[int]]:
    """The assignment of E/D experts per domain that maximizes ``reference_agreement``.

    Solved exactly with ``scipy.optimize.linear_sum_assignment`` over the domains repeated E/D
    times (rows) and the experts (columns).

    Args: ``counts_DE`` (D, E), one layer. Returns: D sorted lists of E/D expert ids.
    Raises: ValueError on wrong rank, negative or all-zero counts, or E % D != 0.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    if layered:
        raise ValueError(f"counts_DE must be 2-D (D, E) here, got shape {c.shape}")
    num_domains, num_experts = c.shape[1:]
    if num_experts % num_domains:
        raise ValueError(
            f"matched groups need E % D == 0, got E = {num_experts}, D = {num_domains}"
        )
    per = num_experts // num_domains
    rows, cols = linear_sum_assignment(np.repeat(c[0], per, axis=0), maximize=True)
    groups: list[list[int]] = [[] for _ in range(num_domains)]
    for r, e in zip(rows.tolist(), cols.tolist()):
        groups[r // per].append(e)
    return [sorted(g) for g in groups]


def reference_agreement(
    counts_DE: ArrayLike, groups: Sequence[Sequence[int]] | None = None
) -> float | np.ndarray:
    """Share of selections that land in their domain's expert group, ``sum_d C[d, G(d)] / n``.

    Args: ``counts_DE`` (D, E) or (L, D, E); ``groups``: D disjoint lists of expert ids (the
    reference assignment, the same for every layer), or None for the per-layer assignment of
    E/D experts per domain that maximizes the value (see ``matched_groups``).
    Returns: float (array (L,)) in [0, 1]; 1 = the reference router.
    Raises: ValueError on wrong rank, negative or all-zero counts, malformed groups, or
    ``groups=None`` with E % D != 0.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    num_layers, num_domains, num_experts = c.shape
    if groups is not None:
        mask = _group_mask(groups, num_domains, num_experts)
        masks = np.broadcast_to(mask, c.shape)
    else:
        masks = np.stack(
            [_group_mask(matched_groups(c[i]), num_domains, num_experts) for i in range(num_layers)]
        )
    return _out((c * masks).sum(axis=(1, 2)) / c.sum(axis=(1, 2)), layered)


def specialization_score(counts_DE: ArrayLike) -> float | np.ndarray:
    """``(reference_agreement(C) - 1/D) / (1 - 1/D)`` with matched groups.

    Args: ``counts_DE`` (D, E) or (L, D, E), D >= 2, E % D == 0.
    Returns: float (array (L,)) in [0, 1] (the matched agreement is at least its mean over
    random balanced assignments, 1/D); 0 = no better than domain-blind, 1 = the reference router.
    Raises: ValueError on wrong rank, negative or all-zero counts, D < 2 or E % D != 0.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    num_domains = c.shape[1]
    if num_domains < 2:
        raise ValueError(f"specialization_score needs D >= 2 domains, got D = {num_domains}")
    ra = np.atleast_1d(reference_agreement(c))
    return _out((ra - 1.0 / num_domains) / (1.0 - 1.0 / num_domains), layered)


# ----------------------------------------------------------------------------- DBES suite


def routing_specialization(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_d pi_d (1 - H(q_d) / log E)``: how concentrated each domain's routing is.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1].
    Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    log_e = _require_log_e(c.shape[2], "routing_specialization")
    pi, q, _ = _domain_rows(c)
    return _out((pi * (1.0 - _entropy(q) / log_e)).sum(axis=1), layered)


def normalized_effective_rank(counts_DE: ArrayLike) -> float | np.ndarray:
    """Effective rank of the D x E matrix of rows q_d over ``min(D, E)``.

    Singular values s, ``p = s / sum s``, value ``exp(-sum p log p) / min(D, E)``; D counts
    only domains with selections.
    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in (0, 1]; high =
    domains use distinct expert directions.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    _, q, active = _domain_rows(c)
    s = np.linalg.svd(q, compute_uv=False)  # zero rows add zero singular values only
    p = s / s.sum(axis=1, keepdims=True)
    rank = np.exp(_entropy(p)) / np.minimum(active.sum(axis=1), c.shape[2])
    return _out(rank, layered)


def domain_isolation(counts_DE: ArrayLike) -> float | np.ndarray:
    """``1 - mean over pairs d < d' of sum_e min(q_d(e), q_d'(e))``.

    Args: ``counts_DE`` (D, E) or (L, D, E) with at least two domains with selections (per
    layer). Returns: float (array (L,)) in [0, 1]; 1 = disjoint expert sets.
    Raises: ValueError on wrong rank, negative or all-zero counts, or fewer than two domains.
    """
    c, layered = _counts(counts_DE, "counts_DE")
    _, q, active = _domain_rows(c)
    pairs = np.triu(np.ones((c.shape[1], c.shape[1]), dtype=bool), k=1)
    pairs = pairs[None] & active[:, :, None] & active[:, None, :]
    num_pairs = pairs.sum(axis=(1, 2))
    if np.any(num_pairs == 0):
        raise ValueError(
            f"domain_isolation needs >= 2 domains with selections, got {int(active.sum(1).min())}"
        )
    overlap = np.minimum(q[:, :, None, :], q[:, None, :, :]).sum(axis=3)
    return _out(1.0 - (overlap * pairs).sum(axis=(1, 2)) / num_pairs, layered)


def routing_stiffness(sets_a_TK: ArrayLike, sets_b_TK: ArrayLike) -> float | np.ndarray:
    """``mean_t |S_a(t) ∩ S_b(t)| / k`` for the same T tokens routed twice.

    Args: ``sets_a_TK``, ``sets_b_TK`` integer expert ids of the same shape, (T, K) or
    (L, T, K); each row holds K distinct experts.
    Returns: float (array (L,)) in [0, 1]; 1 = identical expert sets.
    Raises: ValueError on wrong rank, shape mismatch, non-integer or negative ids, T = 0.
    """
    a, layered = _experts(sets_a_TK, "sets_a_TK")
    b, _ = _experts(sets_b_TK, "sets_b_TK")
    if a.shape != b.shape:
        raise ValueError(f"sets_b_TK must have the shape of sets_a_TK {a.shape}, got {b.shape}")
    shared = (a[..., :, None] == b[..., None, :]).any(axis=-1).sum(axis=-1)
    return _out(shared.mean(axis=1) / a.shape[2], layered)


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
    g = _to_numpy(gram_ids_T)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"gram_ids_T must be 1-D integer, got shape {g.shape}, dtype {g.dtype}")
    ex, layered = _experts(experts_TK, "experts_TK")
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
    h_e = _entropy(p3.sum(axis=1))
    mutual = _entropy(p3.sum(axis=2)) + h_e - _entropy(p)
    ok = h_e > 1e-12
    value = np.where(ok, mutual / np.where(ok, h_e, 1.0), 0.0)
    return _out(np.clip(value, 0.0, 1.0), layered)


# ----------------------------------------------------------------------------- router health


def _scores(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    s = _numeric(x, name, (2, 3), "2-D (T, E) or 3-D (L, T, E)").astype(np.float64)
    return s.reshape((-1,) + s.shape[-2:]), s.ndim == 3


def router_entropy(scores_TE: ArrayLike) -> float | np.ndarray:
    """Mean over tokens of ``H(s_t) / log E``.

    Scores are renormalized per token to sum to 1 (a no-op for softmax; sigmoid scores become
    a distribution). Args: ``scores_TE`` (T, E) or (L, T, E) non-negative, E >= 2.
    Returns: float (array (L,)) in [0, 1]; 1 = uniform scores.
    Raises: ValueError on wrong rank, negative/non-finite scores, an all-zero row or E < 2.
    """
    s, layered = _scores(scores_TE, "scores_TE")
    log_e = _require_log_e(s.shape[2], "router_entropy")
    total = s.sum(axis=2, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("scores_TE has a token whose scores are all zero")
    return _out((_entropy(s / total) / log_e).mean(axis=1), layered)


def router_confidence(scores_TE: ArrayLike) -> float | np.ndarray:
    """Mean over tokens of ``max_e s_t`` (raw scores, not renormalized).

    Args: ``scores_TE`` (T, E) or (L, T, E) non-negative. Returns: float (array (L,)); in
    [1/E, 1] for softmax scores. Raises: ValueError on wrong rank or negative/non-finite scores.
    """
    s, layered = _scores(scores_TE, "scores_TE")
    return _out(s.max(axis=2).mean(axis=1), layered)


def coactivation(experts_TK: ArrayLike, num_experts: int) -> np.ndarray:
    """``M[i, j] = N(i and j both selected) / N(i selected)``, counted over tokens.

    Each token contributes every one of its k-choose-2 expert pairs (in both orders). The
    diagonal is 1 for experts that were selected; rows of never-selected experts are 0.
    Args: ``experts_TK`` (T, K) or (L, T, K) ids in [0, E); ``num_experts`` E.
    Returns: float64 array (E, E) or (L, E, E); row i is P(j selected | i selected).
    Raises: ValueError on wrong rank, non-integer ids, or ids outside [0, E).
    """
    ex, layered = _experts(experts_TK, "experts_TK")
    if ex.max() >= num_experts:
        raise ValueError(f"experts_TK ids must be < num_experts = {num_experts}, got {ex.max()}")
    num_layers, num_tokens, _ = ex.shape
    onehot = np.zeros((num_layers, num_tokens, num_experts), dtype=np.float64)
    np.put_along_axis(onehot, ex, 1.0, axis=2)
    joint = np.einsum("lte,ltf->lef", onehot, onehot)
    single = np.diagonal(joint, axis1=1, axis2=2)
    matrix = joint / np.where(single > 0, single, 1.0)[:, :, None]
    return matrix if layered else matrix[0]


# ----------------------------------------------------------------------------- summary

_BALANCE = (utilization, load_entropy, max_violation, load_cv, dead_experts)
_SPECIALIZATION = (
    purity,
    nmi,
    conditional_entropy,
    routing_specialization,
    normalized_effective_rank,
)


def _metric_table(
    c: np.ndarray, groups: Sequence[Sequence[int]] | None, scope: str | None
) -> dict[str, np.ndarray]:
    """Metric name -> per-layer values (L,) for validated counts ``c`` (L, D, E)."""
    at = f"@{scope}" if scope else ""
    table: dict[str, np.ndarray] = {}
    for fn in _BALANCE:
        table[fn.__name__ + at] = fn(c)
    for fn in _SPECIALIZATION:
        table[fn.__name__] = fn(c)
    num_domains, num_experts = c.shape[1:]
    if groups is not None:
        table["reference_agreement"] = reference_agreement(c, groups)
    elif num_experts % num_domains == 0:
        table["reference_agreement"] = reference_agreement(c)
    if num_domains >= 2 and num_experts % num_domains == 0:
        table["specialization_score"] = specialization_score(c)
    if np.all((c.sum(axis=2) > 0).sum(axis=1) >= 2):
        table["domain_isolation"] = domain_isolation(c)
    return table


def summarize(
    counts_LDE: ArrayLike,
    *,
    kept_LDE: ArrayLike | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    scope: str | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Every count-based metric, per layer and overall, as a flat name -> float dict.

    Names: ``{prefix}layer{l}/{metric}`` and ``{prefix}all/{metric}`` (mean over layers).
    Balance metrics (utilization, load_entropy, max_violation, load_cv, dead_experts) carry
    ``@{scope}`` when ``scope`` is given, e.g. ``layer3/max_violation@global_batch``. With
    ``kept_LDE`` the same metrics of the kept counts follow under a ``kept_`` prefix
    (``layer3/kept_max_violation@global_batch``) together with ``layer3/drop_rate``.
    ``reference_agreement`` uses ``groups`` when given, else the matched groups; it and
    ``specialization_score`` are left out when they are undefined (E % D != 0, or D < 2 for the
    score), as is ``domain_isolation`` when a layer has fewer than two domains with selections.

    Args: ``counts_LDE`` (L, D, E) (or (D, E) for one layer, named layer0) requested counts;
    ``kept_LDE`` the kept counts, same shape; ``groups`` D reference expert groups;
    ``scope`` the balancing scope name; ``prefix`` prepended to every name (e.g. ``"val/"``).
    Raises: ValueError as the metrics do (wrong rank, negative or all-zero counts, kept >
    requested, shape mismatch).
    """
    c, _ = _counts(counts_LDE, "counts_LDE")
    table = _metric_table(c, groups, scope)
    if kept_LDE is not None:
        kept, _ = _counts(kept_LDE, "kept_LDE")
        if kept.shape != c.shape:
            raise ValueError(
                f"kept_LDE must have the shape of counts_LDE {c.shape}, got {kept.shape}"
            )
        table["drop_rate"] = np.atleast_1d(drop_rate(c, kept))
        for name, values in _metric_table(kept, groups, scope).items():
            table["kept_" + name] = values
    out: dict[str, float] = {}
    for name, values in table.items():
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        for layer, v in enumerate(values):
            out[f"{prefix}layer{layer}/{name}"] = float(v)
        out[f"{prefix}all/{name}"] = float(values.mean())
    return out
