"""Specialization metrics of routing counts and the count-based part of the DBES suite.

Definitions in ``docs/METRICS.md`` ("Specialization", "The DBES suite"). Legend: L MoE layers,
D domains, E experts; ``C[d, e]`` counts top-k selections, ``pi_d`` is the domain share and
``q_d`` the domain's routing distribution over experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from moe_testbed.metrics._arrays import (
    ArrayLike,
    check_counts,
    domain_rows,
    entropy,
    log_num_experts,
    per_layer,
)


def purity(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_e max_d C[d, e] / n``: share of selections from each expert's majority domain.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [max_d pi_d, 1];
    1 = every expert serves one domain. Raises: ValueError on wrong rank, negative or all-zero.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    return per_layer(c.max(axis=1).sum(axis=1) / c.sum(axis=(1, 2)), layered)


def nmi(counts_DE: ArrayLike) -> float | np.ndarray:
    """Normalized mutual information ``I(D; E) / sqrt(H(D) H(E))`` of ``p(d, e) = C[d, e] / n``.

    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in [0, 1]; 0 when
    H(D) or H(E) is 0. Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    p = c / c.sum(axis=(1, 2), keepdims=True)
    h_d = entropy(p.sum(axis=2))
    h_e = entropy(p.sum(axis=1))
    h_de = entropy(p.reshape(p.shape[0], -1))
    denom = np.sqrt(h_d * h_e)
    ok = denom > 1e-12
    value = np.where(ok, (h_d + h_e - h_de) / np.where(ok, denom, 1.0), 0.0)
    return per_layer(np.clip(value, 0.0, 1.0), layered)


def conditional_entropy(counts_DE: ArrayLike) -> float | np.ndarray:
    """``H(E | D) / log E = sum_d pi_d H(q_d) / log E``.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1];
    ``log(E/D) / log E`` for the reference router spreading top-1 evenly in its group.
    Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    log_e = log_num_experts(c.shape[2], "conditional_entropy")
    pi, q, _ = domain_rows(c)
    return per_layer((pi * entropy(q)).sum(axis=1) / log_e, layered)


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
    c, layered = check_counts(counts_DE, "counts_DE")
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
    c, layered = check_counts(counts_DE, "counts_DE")
    num_layers, num_domains, num_experts = c.shape
    if groups is not None:
        mask = _group_mask(groups, num_domains, num_experts)
        masks = np.broadcast_to(mask, c.shape)
    else:
        masks = np.stack(
            [_group_mask(matched_groups(c[i]), num_domains, num_experts) for i in range(num_layers)]
        )
    return per_layer((c * masks).sum(axis=(1, 2)) / c.sum(axis=(1, 2)), layered)


def specialization_score(counts_DE: ArrayLike) -> float | np.ndarray:
    """``(reference_agreement(C) - 1/D) / (1 - 1/D)`` with matched groups.

    Args: ``counts_DE`` (D, E) or (L, D, E), D >= 2, E % D == 0.
    Returns: float (array (L,)) in [0, 1] (the matched agreement is at least its mean over
    random balanced assignments, 1/D); 0 = no better than domain-blind, 1 = the reference router.
    Raises: ValueError on wrong rank, negative or all-zero counts, D < 2 or E % D != 0.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    num_domains = c.shape[1]
    if num_domains < 2:
        raise ValueError(f"specialization_score needs D >= 2 domains, got D = {num_domains}")
    ra = np.atleast_1d(reference_agreement(c))
    return per_layer((ra - 1.0 / num_domains) / (1.0 - 1.0 / num_domains), layered)


# ----------------------------------------------------------------------------- DBES suite


def routing_specialization(counts_DE: ArrayLike) -> float | np.ndarray:
    """``sum_d pi_d (1 - H(q_d) / log E)``: how concentrated each domain's routing is.

    Args: ``counts_DE`` (D, E) or (L, D, E), E >= 2. Returns: float (array (L,)) in [0, 1].
    Raises: ValueError on wrong rank, negative counts, all-zero input or E < 2.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    log_e = log_num_experts(c.shape[2], "routing_specialization")
    pi, q, _ = domain_rows(c)
    return per_layer((pi * (1.0 - entropy(q) / log_e)).sum(axis=1), layered)


def normalized_effective_rank(counts_DE: ArrayLike) -> float | np.ndarray:
    """Effective rank of the D x E matrix of rows q_d over ``min(D, E)``.

    Singular values s, ``p = s / sum s``, value ``exp(-sum p log p) / min(D, E)``; D counts
    only domains with selections.
    Args: ``counts_DE`` (D, E) or (L, D, E). Returns: float (array (L,)) in (0, 1]; high =
    domains use distinct expert directions.
    Raises: ValueError on wrong rank, negative counts or all-zero input.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    _, q, active = domain_rows(c)
    s = np.linalg.svd(q, compute_uv=False)  # zero rows add zero singular values only
    p = s / s.sum(axis=1, keepdims=True)
    rank = np.exp(entropy(p)) / np.minimum(active.sum(axis=1), c.shape[2])
    return per_layer(rank, layered)


def domain_isolation(counts_DE: ArrayLike) -> float | np.ndarray:
    """``1 - mean over pairs d < d' of sum_e min(q_d(e), q_d'(e))``.

    Args: ``counts_DE`` (D, E) or (L, D, E) with at least two domains with selections (per
    layer). Returns: float (array (L,)) in [0, 1]; 1 = disjoint expert sets.
    Raises: ValueError on wrong rank, negative or all-zero counts, or fewer than two domains.
    """
    c, layered = check_counts(counts_DE, "counts_DE")
    _, q, active = domain_rows(c)
    pairs = np.triu(np.ones((c.shape[1], c.shape[1]), dtype=bool), k=1)
    pairs = pairs[None] & active[:, :, None] & active[:, None, :]
    num_pairs = pairs.sum(axis=(1, 2))
    if np.any(num_pairs == 0):
        raise ValueError(
            f"domain_isolation needs >= 2 domains with selections, got {int(active.sum(1).min())}"
        )
    overlap = np.minimum(q[:, :, None, :], q[:, None, :, :]).sum(axis=3)
    return per_layer(1.0 - (overlap * pairs).sum(axis=(1, 2)) / num_pairs, layered)
