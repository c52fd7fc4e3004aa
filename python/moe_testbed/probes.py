"""Evaluation probes of routing behaviour, independent of any model code.

The trainer hands in a ``route_fn(tokens_BS, labels_BS) -> list over layers of experts_TK``
(T = B * S, row-major over batch then position) and the probes return per-layer numbers from
``moe_testbed.metrics``. :func:`run_probes` is what the trainer runs at every evaluation; its
values are named by ``moe_testbed.logging`` (``probe/layer0/stiffness``).

Legend: B sequences, S positions, T = B * S tokens, K top-k slots, L MoE layers, E experts.

Context-perturbation probe (``routing_stiffness`` case (b) in docs/METRICS.md):

* ``perturb_context`` replaces ``round(frac * (S - 1))`` positions of each sequence, drawn
  uniformly without replacement from positions ``0 .. S-2`` (the last position is never
  replaced), by tokens drawn uniformly from the pool of the same domain as the replaced
  position. The replacement may happen to equal the original token.
* Stiffness is measured on the *probe positions*: the last quarter of each sequence
  (``position >= S - max(1, S // 4)``) minus the positions that were themselves replaced. Every
  probe token keeps its own id and sees about ``frac`` of its preceding context replaced, so a
  change in its routing comes from the context alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from moe_testbed import logging as names
from moe_testbed import metrics

RouteFn = Callable[[torch.Tensor, torch.Tensor], Sequence[Any]]

__all__ = [
    "ProbeResult",
    "probe_batch",
    "run_probes",
    "saturation_curves",
    "perturb_context",
    "probe_mask",
    "stiffness_under_perturbation",
    "saturation",
    "ngram_ids",
]


def _check_tokens(tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> None:
    if not isinstance(tokens_BS, torch.Tensor) or tokens_BS.dim() != 2:
        shape = tuple(tokens_BS.shape) if hasattr(tokens_BS, "shape") else type(tokens_BS)
        raise ValueError(f"tokens_BS must be a 2-D (B, S) tensor, got {shape}")
    if tokens_BS.dtype.is_floating_point or tokens_BS.dtype == torch.bool:
        raise ValueError(f"tokens_BS must hold integer token ids, got dtype {tokens_BS.dtype}")
    if labels_BS is not None and tuple(labels_BS.shape) != tuple(tokens_BS.shape):
        raise ValueError(
            f"labels_BS must have the shape of tokens_BS {tuple(tokens_BS.shape)}, "
            f"got {tuple(labels_BS.shape)}"
        )


def probe_mask(seq_len: int, replaced_BS: torch.Tensor) -> torch.Tensor:
    """Positions where context-perturbation stiffness is measured.

    Args: ``seq_len`` S; ``replaced_BS`` (B, S) bool, True where ``perturb_context`` replaced
    the token. Returns: (B, S) bool, True on the last ``max(1, S // 4)`` positions that were
    not replaced.
    """
    start = seq_len - max(1, seq_len // 4)
    last_quarter = torch.arange(seq_len, device=replaced_BS.device) >= start
    return last_quarter[None, :] & ~replaced_BS


def perturb_context(
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    pool_by_domain: Mapping[int, Any],
    frac: float = 0.10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``frac`` of the context positions of each sequence with same-domain tokens.

    Replaced: ``round(frac * (S - 1))`` positions per sequence, uniform without replacement
    over ``0 .. S-2``; each new token is drawn uniformly from ``pool_by_domain[label]`` of the
    position's own domain label.

    Args: ``tokens_BS`` (B, S) integer ids; ``labels_BS`` (B, S) integer domain ids;
    ``pool_by_domain`` domain id -> 1-D array/tensor of token ids; ``frac`` in [0, 1];
    ``generator`` a CPU ``torch.Generator`` (None: torch's global RNG).
    Returns: ``(perturbed_BS, replaced_BS)``: a new token tensor (same dtype and device) and a
    bool mask of the replaced positions.
    Raises: ValueError on wrong shapes, ``frac`` outside [0, 1], or a domain without a
    non-empty pool.
    """
    _check_tokens(tokens_BS, labels_BS)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    batch, seq_len = tokens_BS.shape
    device = tokens_BS.device
    num_replace = int(round(frac * max(seq_len - 1, 0)))
    replaced = torch.zeros(batch, seq_len, dtype=torch.bool)
    if num_replace:
        order = torch.rand(batch, seq_len - 1, generator=generator).argsort(dim=1)
        replaced[:, : seq_len - 1].scatter_(1, order[:, :num_replace], True)
    out = tokens_BS.detach().cpu().clone()
    labels = labels_BS.detach().cpu()
    for domain in torch.unique(labels[replaced]).tolist():
        pool = torch.as_tensor(np.asarray(_pool(pool_by_domain, domain)), dtype=out.dtype)
        where = replaced & (labels == domain)
        pick = torch.randint(pool.numel(), (int(where.sum()),), generator=generator)
        out[where] = pool[pick]
    return out.to(device), replaced.to(device)


def _pool(pool_by_domain: Mapping[int, Any], domain: int) -> Any:
    pool = pool_by_domain.get(domain)
    if pool is None or len(pool) == 0:
        raise ValueError(
            f"pool_by_domain has no tokens for domain {domain}; keys: {sorted(pool_by_domain)}"
        )
    return pool.cpu() if isinstance(pool, torch.Tensor) else pool


def _stack_layers(layers: Sequence[Any], name: str) -> np.ndarray:
    if len(layers) == 0:
        raise ValueError(f"{name} must hold at least one layer, got none")
    arrays = [metrics.as_numpy(x) for x in layers]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name} layers must share one (T, K) shape, got {sorted(shapes)}")
    return np.stack(arrays)


def stiffness_under_perturbation(
    route_fn: RouteFn,
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    pool_by_domain: Mapping[int, Any],
    frac: float = 0.10,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Per-layer ``routing_stiffness`` of the probe tokens before and after ``perturb_context``.

    Args: ``route_fn(tokens_BS, labels_BS)`` -> list over layers of experts_TK (T = B * S);
    the other arguments as in ``perturb_context``.
    Returns: float64 array (L,) in [0, 1]; 1 = routing ignores the perturbed context.
    Raises: ValueError on bad inputs, a route_fn output of the wrong length, or no probe
    position left.
    """
    _check_tokens(tokens_BS, labels_BS)
    perturbed, replaced = perturb_context(tokens_BS, labels_BS, pool_by_domain, frac, generator)
    keep = probe_mask(tokens_BS.shape[1], replaced).reshape(-1).cpu().numpy()
    if not keep.any():
        raise ValueError("no probe position left: every last-quarter position was replaced")
    base = _stack_layers(route_fn(tokens_BS, labels_BS), "route_fn output")
    moved = _stack_layers(route_fn(perturbed, labels_BS), "route_fn output")
    if base.shape[1] != keep.size:
        raise ValueError(f"route_fn must return T = B * S = {keep.size} rows, got {base.shape[1]}")
    return np.atleast_1d(metrics.routing_stiffness(base[:, keep], moved[:, keep]))


def saturation(experts_a_layers: Sequence[Any], experts_b_layers: Sequence[Any]) -> np.ndarray:
    """Router saturation: per-layer ``routing_stiffness`` between two routings of the same tokens.

    Args: ``experts_a_layers`` (a checkpoint) and ``experts_b_layers`` (the final model): lists
    over layers of experts_TK, same length and shapes.
    Returns: float64 array (L,) in [0, 1]; 1 = the checkpoint already routes like the final one.
    Raises: ValueError on a layer-count or shape mismatch.
    """
    if len(experts_a_layers) != len(experts_b_layers):
        raise ValueError(
            f"experts_b_layers must have {len(experts_a_layers)} layers like experts_a_layers, "
            f"got {len(experts_b_layers)}"
        )
    a = _stack_layers(experts_a_layers, "experts_a_layers")
    b = _stack_layers(experts_b_layers, "experts_b_layers")
    return np.atleast_1d(metrics.routing_stiffness(a, b))


# Polynomial hash in wrapping uint64 arithmetic with an odd 64-bit multiplier; the top bit is
# dropped so ids stay non-negative int64 (collisions ~ 2**-63 per pair: negligible).
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_HASH_MASK = np.uint64((1 << 63) - 1)


def ngram_ids(tokens_BS: torch.Tensor, n: int) -> torch.Tensor:
    """Id of the n-gram ending at each token, for ``metrics.ngram_expertise``.

    The id of ``(x_{t-n+1}, ..., x_t)`` within one sequence is the token itself for n = 1 and a
    63-bit polynomial hash of the n ids otherwise (non-negative). Positions with
    fewer than n - 1 preceding tokens in their sequence (t < n - 1) have no complete n-gram
    and get -1, which ``ngram_expertise`` leaves out. N-grams never cross sequence boundaries.

    Args: ``tokens_BS`` (B, S) non-negative integer ids; ``n`` >= 1.
    Returns: int64 tensor (B, S) on the device of ``tokens_BS``.
    Raises: ValueError on a wrong shape/dtype, negative ids, or n < 1.
    """
    _check_tokens(tokens_BS)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = tokens_BS.detach().cpu().numpy().astype(np.int64)
    if tokens.size and tokens.min() < 0:
        raise ValueError(f"tokens_BS must hold non-negative ids, got minimum {tokens.min()}")
    batch, seq_len = tokens.shape
    out = np.full((batch, seq_len), -1, dtype=np.int64)
    if n == 1:
        out = tokens.copy()
    elif seq_len >= n:
        width = seq_len - n + 1
        h = np.zeros((batch, width), dtype=np.uint64)
        for j in range(n):
            h = h * _HASH_BASE + (tokens[:, j : j + width] + 1).astype(np.uint64)
        out[:, n - 1 :] = (h & _HASH_MASK).astype(np.int64)
    return torch.from_numpy(out).to(tokens_BS.device)


# ----------------------------------------------------------------------------- the trainer's probes


class ProbeResult(NamedTuple):
    """``record``: probe metric name -> value (per layer and mean over layers);
    ``coactivation_LEE`` float32 (L, E, E); ``routes_LTK`` int16 (L, T, K) expert ids of the
    probe tokens (kept for router saturation)."""

    record: dict[str, float]
    coactivation_LEE: np.ndarray
    routes_LTK: np.ndarray


def probe_batch(data: Any, max_sequences: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe tokens: the first validation sequences of every domain,
    ``max(1, max_sequences // D)`` per domain. ``data`` is a ``moe_testbed.sources.RunData``.
    Returns ``(tokens_BS, labels_BS)`` int64 without the shifted-target position."""
    num_domains = len(data.domains)
    per = max(1, max_sequences // num_domains)
    tokens_NS1, domain_N = data.val_sequences()
    rows = torch.cat([torch.nonzero(domain_N == d)[:per, 0] for d in range(num_domains)])
    tokens = tokens_NS1[rows]
    labels = domain_N[rows, None].expand_as(tokens)
    return tokens[:, :-1], labels[:, :-1].contiguous()


def run_probes(
    route_fn: RouteFn,
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    pool_by_domain: Mapping[int, Any],
    *,
    num_experts: int,
    generator: torch.Generator | None = None,
) -> ProbeResult:
    """Stiffness under context perturbation, n-gram expertise (n = 1, 2) and co-activation.

    Values per layer: ``stiffness`` (:func:`stiffness_under_perturbation`),
    ``ngram_expertise_n1`` / ``ngram_expertise_n2`` (``metrics.ngram_expertise`` of the probe
    tokens' n-grams) and ``coactivation_offdiag_max`` (largest off-diagonal entry of
    ``metrics.coactivation``: how strongly one expert pulls in another).
    Raises ValueError as the probes and metrics do.
    """
    stiff = stiffness_under_perturbation(
        route_fn, tokens_BS, labels_BS, pool_by_domain, generator=generator
    )
    experts = [metrics.as_numpy(e) for e in route_fn(tokens_BS, labels_BS)]
    values: dict[str, list[float]] = {"stiffness": list(stiff)}
    for n in (1, 2):
        grams = ngram_ids(tokens_BS.cpu(), n).reshape(-1)
        values[f"ngram_expertise_n{n}"] = [metrics.ngram_expertise(grams, e) for e in experts]
    coact = np.stack([metrics.coactivation(e, num_experts) for e in experts])
    off = ~np.eye(num_experts, dtype=bool)
    values["coactivation_offdiag_max"] = [float(c[off].max()) for c in coact]
    record: dict[str, float] = {}
    for metric, per_layer in values.items():
        record.update(names.layer_values(metric, per_layer, split="probe"))
    routes = np.stack(experts).astype(np.int16)
    return ProbeResult(record, coact.astype(np.float32), routes)


def saturation_curves(routes: Mapping[int, np.ndarray]) -> dict[str, list[float]]:
    """Router saturation over training: per evaluation step (as a string key, ascending), the
    per-layer :func:`saturation` of that step's probe routing against the last step's.
    ``routes``: step -> (L, T, K) expert ids. Returns {} for no routes."""
    if not routes:
        return {}
    final = routes[max(routes)]
    return {
        str(step): saturation(list(r), list(final)).tolist() for step, r in sorted(routes.items())
    }
