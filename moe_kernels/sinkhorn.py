"""Sinkhorn balancing (S-BASE, Clark et al. 2022; Sinkhorn-Knopp scaling): which experts each
token uses when the selection is made on a balanced version of the router logits.

Legend: G scope groups (sequences for ``scope="sequence"``, one group for ``micro_batch``),
S tokens per group, E experts, K top-k.

Over each group's S x E matrix ``exp(z)`` of router logits, Sinkhorn-Knopp alternates

    u_s = log k        - logsumexp_e (z_se + v_e)     (every token's row sums to k)
    v_e = log (S k / E) - logsumexp_s (z_se + u_s)    (every expert's column sums to S k / E)

for ``iters`` rounds starting from v = 0, in log space and fp32. The balanced matrix is
``P = exp(z + u + v)``: after the last round its columns hold exactly ``S k / E`` and its rows
approach ``k`` (:func:`marginal_error` measures how far). Each token then takes the top-k of its
row of P, which is the top-k of ``z + v`` (a row's scale changes no order): the column duals v
act like a per-group expert bias that lowers the over-demanded experts. The selection is
discrete and carries no gradient; the gate weights are the router's own scores at the selected
experts (``moe_kernels.balanced.balanced_decision``).
"""

from __future__ import annotations

import math

import torch


def sinkhorn_duals(
    logits_GSE: torch.Tensor, k: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-scalings ``(u_GS, v_GE)`` of ``exp(logits)`` after ``iters`` rounds.

    Rows target k, columns S k / E (see the module docstring). fp32, no gradient.
    """
    z = logits_GSE.detach().float()
    G, S, E = z.shape
    v = z.new_zeros(G, 1, E)
    u = z.new_zeros(G, S, 1)
    if S == 0:
        return u.squeeze(-1), v.squeeze(1)
    log_row, log_col = math.log(k), math.log(S * k / E)
    for _ in range(iters):
        u = log_row - torch.logsumexp(z + v, dim=2, keepdim=True)
        v = log_col - torch.logsumexp(z + u, dim=1, keepdim=True)
    return u.squeeze(-1), v.squeeze(1)


def balanced_matrix(logits_GSE: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """The Sinkhorn-balanced matrix P (G, S, E) fp32 (columns sum to S k / E exactly, rows to k
    within :func:`marginal_error`)."""
    u, v = sinkhorn_duals(logits_GSE, k, iters)
    return torch.exp(logits_GSE.detach().float() + u.unsqueeze(-1) + v.unsqueeze(1))


def marginal_error(P_GSE: torch.Tensor, k: int) -> float:
    """Largest relative deviation of P's row sums from k and column sums from S k / E."""
    S, E = P_GSE.shape[1], P_GSE.shape[2]
    if S == 0:
        return 0.0
    rows = (P_GSE.sum(2) / k - 1).abs().max()
    cols = (P_GSE.sum(1) / (S * k / E) - 1).abs().max()
    return float(torch.maximum(rows, cols))


def sinkhorn_select(logits_GSE: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Expert ids (G, S, K) int64: each token's top-k of the balanced matrix of its group."""
    _, v = sinkhorn_duals(logits_GSE, k, iters)
    return torch.topk(logits_GSE.detach().float() + v.unsqueeze(1), k, dim=-1).indices
