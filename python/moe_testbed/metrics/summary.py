"""Every count-based metric of a run's routing counts as one flat dict of named values.

Names come from :mod:`moe_testbed.logging` (``val/layer3/max_violation@global_batch``).
Legend: L MoE layers, D domains, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_testbed import logging as names
from moe_testbed.metrics._arrays import ArrayLike, check_counts
from moe_testbed.metrics.balance import (
    dead_experts,
    drop_rate,
    load_cv,
    load_entropy,
    max_violation,
    utilization,
)
from moe_testbed.metrics.specialization import (
    conditional_entropy,
    domain_isolation,
    nmi,
    normalized_effective_rank,
    purity,
    reference_agreement,
    routing_specialization,
    specialization_score,
)

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
) -> dict[tuple[str, str | None], np.ndarray]:
    """(metric, scope) -> per-layer values (L,) for validated counts ``c`` (L, D, E)."""
    table: dict[tuple[str, str | None], np.ndarray] = {}
    for fn in _BALANCE:
        table[fn.__name__, scope] = fn(c)
    for fn in _SPECIALIZATION:
        table[fn.__name__, None] = fn(c)
    num_domains, num_experts = c.shape[1:]
    if groups is not None:
        table["reference_agreement", None] = reference_agreement(c, groups)
    elif num_experts % num_domains == 0:
        table["reference_agreement", None] = reference_agreement(c)
    if num_domains >= 2 and num_experts % num_domains == 0:
        table["specialization_score", None] = specialization_score(c)
    if np.all((c.sum(axis=2) > 0).sum(axis=1) >= 2):
        table["domain_isolation", None] = domain_isolation(c)
    return table


def summarize(
    counts_LDE: ArrayLike,
    *,
    kept_LDE: ArrayLike | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    scope: str | None = None,
    split: str | None = None,
) -> dict[str, float]:
    """Every count-based metric, per layer and overall, as a flat name -> float dict.

    Names (``moe_testbed.logging.name``): ``[split/]layer{l}/{metric}`` and
    ``[split/]all/{metric}`` (mean over layers). Balance metrics (utilization, load_entropy,
    max_violation, load_cv, dead_experts) carry ``@{scope}`` when ``scope`` is given, e.g.
    ``layer3/max_violation@global_batch``. With ``kept_LDE`` the same metrics of the kept counts
    follow under a ``kept_`` prefix (``layer3/kept_max_violation@global_batch``) together with
    ``layer3/drop_rate``. ``reference_agreement`` uses ``groups`` when given, else the matched
    groups; it and ``specialization_score`` are left out when they are undefined (E % D != 0,
    or D < 2 for the score), as is ``domain_isolation`` when a layer has fewer than two domains
    with selections.

    Args: ``counts_LDE`` (L, D, E) (or (D, E) for one layer, named layer0) requested counts;
    ``kept_LDE`` the kept counts, same shape; ``groups`` D reference expert groups;
    ``scope`` the balancing scope name; ``split`` ``"train"``, ``"val"``, ``"probe"`` or None.
    Raises: ValueError as the metrics do (wrong rank, negative or all-zero counts, kept >
    requested, shape mismatch) and for an unknown split.
    """
    c, _ = check_counts(counts_LDE, "counts_LDE")
    table = _metric_table(c, groups, scope)
    if kept_LDE is not None:
        kept, _ = check_counts(kept_LDE, "kept_LDE")
        if kept.shape != c.shape:
            raise ValueError(
                f"kept_LDE must have the shape of counts_LDE {c.shape}, got {kept.shape}"
            )
        table["drop_rate", None] = np.atleast_1d(drop_rate(c, kept))
        for (metric, at), values in _metric_table(kept, groups, scope).items():
            table[names.kept(metric), at] = values
    out: dict[str, float] = {}
    for (metric, at), values in table.items():
        out.update(names.layer_values(metric, values, split=split, scope=at))
    return out


def summarize_stats(
    sums: dict[str, Any],
    *,
    scope: str | None,
    split: str | None,
    groups: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """:func:`summarize` of summed ``moe_kernels.stats.read`` output, plus ``router_entropy``
    and ``router_confidence`` per layer (the sums over tokens divided by the token count).

    Args: ``sums`` with ``requested_LDE``, ``kept_LDE``, ``entropy_sum_L``, ``max_prob_sum_L``
    and ``tokens_L``; ``scope``, ``split`` and ``groups`` as in :func:`summarize`.
    Returns {} when there is no selection to summarise.
    """
    if not sums or np.asarray(sums["requested_LDE"]).sum() == 0:
        return {}
    out = summarize(
        sums["requested_LDE"], kept_LDE=sums["kept_LDE"], groups=groups, scope=scope, split=split
    )
    tokens = np.maximum(sums["tokens_L"], 1)
    for metric, key in (
        ("router_entropy", "entropy_sum_L"),
        ("router_confidence", "max_prob_sum_L"),
    ):
        out.update(names.layer_values(metric, sums[key] / tokens, split=split))
    return out
