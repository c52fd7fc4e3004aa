"""Routing and specialization metrics, exactly as defined in ``docs/METRICS.md``.

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

Modules: ``balance`` (load and utilization), ``specialization`` (specialization and the
count-based DBES metrics), ``traces`` (metrics of per-token expert sets and router scores) and
``summary`` (every count-based metric under its logged name); all names are importable from
here.
"""

from __future__ import annotations

from moe_testbed.metrics._arrays import as_numpy
from moe_testbed.metrics.balance import (
    dead_experts,
    drop_rate,
    load_cv,
    load_entropy,
    load_fractions,
    max_violation,
    utilization,
)
from moe_testbed.metrics.specialization import (
    conditional_entropy,
    domain_isolation,
    matched_groups,
    nmi,
    normalized_effective_rank,
    purity,
    reference_agreement,
    routing_specialization,
    specialization_score,
)
from moe_testbed.metrics.summary import summarize, summarize_stats
from moe_testbed.metrics.traces import (
    coactivation,
    ngram_expertise,
    router_confidence,
    router_entropy,
    routing_stiffness,
)

__all__ = [
    "as_numpy",
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
    "summarize_stats",
]
