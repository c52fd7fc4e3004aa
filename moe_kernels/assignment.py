"""Balanced assignment (BASE layers, Lewis et al. 2021): every expert takes exactly its share
of the scope's token slots, chosen to maximise the total router logit.

Legend: G scope groups (sequences for ``scope="sequence"``, one group for ``micro_batch``),
S tokens per group, E experts, K top-k.

Shares: a group has S k slots; with ``q, r = divmod(S k, E)`` every expert takes q slots and the
r experts with the largest summed logit over the group take one more (ties: the lower id), so
the shares are the balanced ``S k / E`` whenever E divides S k and differ by at most one
otherwise.

Solver: greedy, not exact. All (token, expert) pairs are visited in order of decreasing logit
and a pair is taken while its token still lacks experts and its expert still has free slots.
With k = 1 this always fills every slot. With k > 1 a token can end up lacking an expert while
only experts it already holds have free slots; a repair step then moves another token u from a
full expert e that the token lacks to a free expert f (u holding e and not f, the u losing the
least logit), and gives e to the token. Such a u always exists because shares differ by at most
one. The result meets every share exactly and is a 1/2-approximation of the maximal total logit
(greedy b-matching); the objective is the raw logit z (the token-expert affinity of BASE layers).
An exact solver (linear programming over this totally unimodular problem) took over a minute for
one 2048-token micro-batch on a CPU core, far too slow to run per layer per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch


def expert_shares(logits_SE: torch.Tensor, k: int) -> torch.Tensor:
    """Slots per expert (E,) int64 for one group: ``S k // E`` each, plus one for the
    ``S k mod E`` experts with the largest summed logit (ties: lower id)."""
    S, E = logits_SE.shape
    q, r = divmod(S * k, E)
    shares = torch.full((E,), q, dtype=torch.int64)
    if r:
        total = logits_SE.detach().float().sum(0).cpu()
        order = sorted(range(E), key=lambda e: (-float(total[e]), e))
        shares[order[:r]] += 1
    return shares


def _assign_group(z_SE: np.ndarray, k: int, shares_E: np.ndarray) -> np.ndarray:
    """0/1 matrix (S, E) of the greedy balanced assignment of one group (see the module)."""
    S, E = z_SE.shape
    held = np.zeros((S, E), dtype=bool)
    need, free = [k] * S, shares_E.tolist()
    left = S * k
    for idx in np.argsort(-z_SE, axis=None, kind="stable").tolist():
        s, e = divmod(idx, E)
        if need[s] and free[e]:
            held[s, e] = True
            need[s] -= 1
            free[e] -= 1
            left -= 1
            if not left:
                break
    for t in (s for s in range(S) if need[s]):
        while need[t]:
            f = next(e for e in range(E) if free[e])  # free, so t holds it (greedy stopped)
            lacking = np.flatnonzero(~held[t])
            e = int(lacking[np.argmax(z_SE[t, lacking])])  # full: t's best expert it lacks
            movable = np.flatnonzero(held[:, e] & ~held[:, f])
            u = int(movable[np.argmax(z_SE[movable, f] - z_SE[movable, e])])
            held[u, e], held[u, f] = False, True
            held[t, e] = True
            need[t] -= 1
            free[f] -= 1
    return held


def assign_select(logits_GSE: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ids (G, S, K) int64 of the balanced assignment of each group, each token's experts
    ordered by logit (highest first). Runs on the CPU; the result is on the logits' device."""
    z = logits_GSE.detach().float()
    G, S, E = z.shape
    if G * S == 0:
        return torch.zeros(G, S, k, dtype=torch.int64, device=z.device)
    z_cpu = z.cpu()
    mask = torch.zeros(G, S, E, dtype=torch.bool)
    for g in range(G):
        shares = expert_shares(z_cpu[g], k).numpy()
        mask[g] = torch.from_numpy(_assign_group(z_cpu[g].double().numpy(), k, shares))
    ranked = torch.where(mask, z_cpu, torch.full_like(z_cpu, float("-inf")))
    return torch.topk(ranked, k, dim=-1).indices.to(z.device)
