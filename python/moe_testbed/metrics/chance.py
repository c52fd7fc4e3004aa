"""Specialization against chance: permutation null, chance correction, random-router draws.

Definitions in ``docs/METRICS.md`` ("Specialization against chance"). Every quantity starts
from per-sequence counts ``counts_LNE`` (top-k selections of each validation sequence's tokens
per expert) and the sequence's domain ``domain_N``: the domain counts are
``C[l, d, e] = sum_{n: domain(n) = d} counts[l, n, e]``. Legend: L MoE layers, N validation
sequences, D domains, E experts, R random-router draws, P permutations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moe_testbed.metrics.specialization import (
    domain_isolation,
    nmi,
    normalized_effective_rank,
    purity,
    reference_agreement,
    routing_specialization,
    specialization_score,
)

# The label-dependent specialization metrics, each (L, D, E) -> (L,).
CHANCE_METRICS: dict[str, Callable] = {
    "purity": purity,
    "nmi": nmi,
    "matched_agreement": reference_agreement,
    "specialization_score": specialization_score,
    "routing_specialization": routing_specialization,
    "normalized_effective_rank": normalized_effective_rank,
    "domain_isolation": domain_isolation,
}


def domain_counts(counts_LNE: np.ndarray, domain_N: np.ndarray, num_domains: int) -> np.ndarray:
    """(L, D, E) domain counts of per-sequence counts. Raises ValueError on mismatched shapes
    or a domain id outside [0, num_domains)."""
    counts_LNE, domain_N = np.asarray(counts_LNE, dtype=np.float64), np.asarray(domain_N)
    if counts_LNE.ndim != 3 or domain_N.shape != (counts_LNE.shape[1],):
        raise ValueError(
            f"counts_LNE (L, N, E) and domain_N (N,) must agree, got {counts_LNE.shape} and "
            f"{domain_N.shape}"
        )
    if domain_N.size and (domain_N.min() < 0 or domain_N.max() >= num_domains):
        raise ValueError(f"domain_N: expected ids in [0, {num_domains}), got {domain_N}")
    onehot_ND = np.eye(num_domains)[domain_N]
    return np.einsum("nd,lne->lde", onehot_ND, counts_LNE)


def applicable(num_domains: int, num_experts: int) -> list[str]:
    """The chance metrics defined for D domains and E experts: matched agreement and the
    specialization score need E % D == 0 and D >= 2, domain isolation D >= 2."""
    skip = set()
    if num_domains < 2 or num_experts % num_domains:
        skip |= {"matched_agreement", "specialization_score"}
    if num_domains < 2:
        skip.add("domain_isolation")
    return [k for k in CHANCE_METRICS if k not in skip]


def metric_values(counts_LDE: np.ndarray) -> dict[str, float]:
    """Every applicable chance metric of (L, D, E) counts, averaged over layers."""
    names = applicable(counts_LDE.shape[1], counts_LDE.shape[2])
    return {k: float(np.mean(CHANCE_METRICS[k](counts_LDE))) for k in names}


def corrected(value: float, null: float) -> float:
    """Chance-corrected score ``(s - s_null) / (1 - s_null)``: 0 = chance, 1 = the maximum
    (every metric here is at most 1); NaN when the null is already 1."""
    return (value - null) / (1.0 - null) if null < 1.0 - 1e-12 else float("nan")


def permutation_null(
    counts_LNE: np.ndarray,
    domain_N: np.ndarray,
    num_domains: int,
    *,
    permutations: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each metric with the domain labels shuffled across sequences, ``permutations`` times:
    ``{metric: {"mean", "p95", "std"}}`` over the permutations. The shuffle keeps each
    domain's number of sequences, so it removes only the link between routing and domain."""
    if permutations < 1:
        raise ValueError(f"permutations: expected >= 1, got {permutations}")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(permutations):
        shuffled = rng.permutation(np.asarray(domain_N))
        for k, v in metric_values(domain_counts(counts_LNE, shuffled, num_domains)).items():
            draws.setdefault(k, []).append(v)
    return {
        k: {
            "mean": float(np.mean(v)),
            "p95": float(np.percentile(v, 95)),
            "std": float(np.std(v)),
        }
        for k, v in draws.items()
    }


def against_chance(
    counts_LNE: np.ndarray,
    domain_N: np.ndarray,
    num_domains: int,
    *,
    permutations: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "null_mean", "null_p95", "null_std", "corrected"}}`` of one set of
    per-sequence counts."""
    values = metric_values(domain_counts(counts_LNE, domain_N, num_domains))
    null = permutation_null(counts_LNE, domain_N, num_domains, permutations=permutations, seed=seed)
    return {
        k: {
            "value": values[k],
            "null_mean": null[k]["mean"],
            "null_p95": null[k]["p95"],
            "null_std": null[k]["std"],
            "corrected": corrected(values[k], null[k]["mean"]),
        }
        for k in values
    }


def over_draws(per_draw: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over draws of every entry of :func:`against_chance` results, plus ``draw_std`` of
    the value and of the corrected score, and ``draws``."""
    out: dict[str, dict[str, float]] = {}
    for k in per_draw[0]:
        entry = {f: float(np.mean([d[k][f] for d in per_draw])) for f in per_draw[0][k]}
        entry["value_draw_std"] = float(np.std([d[k]["value"] for d in per_draw]))
        entry["corrected_draw_std"] = float(np.std([d[k]["corrected"] for d in per_draw]))
        entry["draws"] = len(per_draw)
        out[k] = entry
    return out


def bootstrap_se(
    counts_LNE: np.ndarray,
    domain_N: np.ndarray,
    num_domains: int,
    *,
    resamples: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Standard error of every metric from resampling the sequences of each domain with
    replacement (``resamples`` times): how much the value would move on another validation set
    of the same size."""
    rng = np.random.default_rng([seed, 0x5E])
    domain_N = np.asarray(domain_N)
    groups = [np.flatnonzero(domain_N == d) for d in range(num_domains)]
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups if len(g)])
        sample = domain_counts(np.asarray(counts_LNE)[:, idx], domain_N[idx], num_domains)
        for k, v in metric_values(sample).items():
            draws.setdefault(k, []).append(v)
    return {k: float(np.std(v, ddof=1)) for k, v in draws.items()}


def random_router_weights(
    num_layers: int, num_experts: int, d_model: int, draws: int, seed: int
) -> torch.Tensor:
    """(R, L, E, D) fp32 random router weights at the routers' init scale ``D^-1/2``
    (``moe_kernels.routers.Router._init_weight``), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(draws, num_layers, num_experts, d_model, generator=g) * d_model**-0.5


def topk_counts(
    x_TD: torch.Tensor, weight_RED: torch.Tensor, k: int, seq_T: torch.Tensor, num_seqs: int
) -> torch.Tensor:
    """(R, N, E) top-k selection counts per sequence of the routers ``weight_RED`` on inputs
    ``x_TD`` whose token t belongs to sequence ``seq_T[t]`` (softmax and sigmoid are monotone,
    so the top-k of the logits is the top-k of the scores)."""
    draws, num_experts, _ = weight_RED.shape
    logits_RTE = torch.einsum("td,red->rte", x_TD.float(), weight_RED.to(x_TD.device).float())
    experts_RTK = logits_RTE.topk(k, dim=-1).indices
    flat = (seq_T.to(x_TD.device)[None, :, None] * num_experts + experts_RTK).reshape(draws, -1)
    out = torch.zeros(draws, num_seqs * num_experts, device=x_TD.device)
    out.scatter_add_(1, flat, torch.ones_like(flat, dtype=out.dtype))
    return out.view(draws, num_seqs, num_experts)
