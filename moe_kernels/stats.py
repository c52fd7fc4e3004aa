"""On-device routing statistics, accumulated in every ``MoE`` layer at full training speed.

Legend: L MoE layers (module order), G label groups (domains), E experts, T tokens, K top-k.

Usage::

    stats.enable(model, num_labels=G)     # allocate accumulators on each layer's device
    ...forward passes with labels=...      # accumulate without host synchronisation
    s = stats.read(model, reset=True)     # one host synchronisation
    stats.disable(model)

Per layer, for tokens with label in [0, G) (label -1 = padding, ignored; no labels = label 0):

- ``requested_GE`` int64: top-k selections (token, slot) by label x expert, before capacity.
- ``kept_GE`` int64: the selections kept after capacity (expert choice: the taken pairs).
- ``weight_sum_GE`` fp32: sum of the gate weights of the requested selections.
- ``entropy_sum``: sum over tokens of H(s_t) / log E (so entropy_sum / tokens is
  ``router_entropy``); ``max_prob_sum``: sum of max_e s_t (``router_confidence``); sigmoid scores
  are normalised to sum 1 per token first; ``tokens``: the number of counted tokens.

Accumulators are plain tensors held by the layer, not ``nn.Module`` buffers: they are rank-local
(DDP's buffer broadcast must not overwrite them) and not part of checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_kernels.balancing import _dist_ready, _in_backward, balance_scores
from moe_kernels.ops import routing_histogram

_INT_FIELDS = ("requested_GE", "kept_GE", "tokens")
_FLOAT_FIELDS = ("weight_sum_GE", "entropy_sum", "max_prob_sum")


class RoutingStats:
    """Accumulators of one layer (see the module docstring)."""

    def __init__(self, num_labels: int, num_experts: int, device=None) -> None:
        G, E = num_labels, num_experts
        self.num_labels, self.num_experts = G, E
        self.requested_GE = torch.zeros(G, E, dtype=torch.int64, device=device)
        self.kept_GE = torch.zeros(G, E, dtype=torch.int64, device=device)
        self.weight_sum_GE = torch.zeros(G, E, dtype=torch.float32, device=device)
        self.entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.max_prob_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def apply(self, fn) -> None:
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            getattr(self, name).zero_()

    def record(
        self,
        experts_TK: torch.Tensor,
        kept_experts_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        scores_TE: torch.Tensor,
        score: str,
        labels_T: torch.Tensor | None,
    ) -> None:
        """Accumulate one forward's routing (in place, no host sync). Skipped while autograd
        recomputes a checkpointed forward, so nothing is counted twice."""
        if _in_backward():
            return
        if labels_T is None:
            labels_T = torch.zeros(experts_TK.shape[0], dtype=torch.int64, device=experts_TK.device)
        labels_T = labels_T.reshape(-1).long()
        routing_histogram(
            experts_TK, labels_T, self.requested_GE, weights_TK.detach(), self.weight_sum_GE
        )
        routing_histogram(kept_experts_TK, labels_T, self.kept_GE)
        with torch.no_grad():
            valid = (labels_T >= 0).to(torch.float64)
            p = balance_scores(scores_TE.detach(), score)
            if self.num_experts > 1:
                ent = -torch.special.xlogy(p, p).sum(-1) / math.log(self.num_experts)
                self.entropy_sum.add_((ent.double() * valid).sum())
            self.max_prob_sum.add_((p.max(-1).values.double() * valid).sum())
            self.tokens.add_((labels_T >= 0).sum())


def _layers(model: torch.nn.Module) -> list:
    """Modules that record routing: ``MoE`` layers and converted HF sparse blocks, in order."""
    return [m for m in model.modules() if getattr(type(m), "_records_routing", False)]


def enable(model: torch.nn.Module, num_labels: int = 1) -> None:
    """Allocate (zeroed) accumulators in every MoE layer of ``model`` on that layer's device.

    Raises ValueError for ``num_labels < 1`` or a model without MoE layers.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels: expected an int >= 1, got {num_labels!r}")
    layers = _layers(model)
    if not layers:
        raise ValueError("model: expected at least one moe_kernels.MoE module, found none")
    for m in layers:
        m._stats = RoutingStats(num_labels, m.num_experts, device=m.device)


def disable(model: torch.nn.Module) -> None:
    """Drop the accumulators of every MoE layer (forward stops recording)."""
    for m in _layers(model):
        m._stats = None


def read(model: torch.nn.Module, reset: bool = True, all_reduce: bool = False) -> dict:
    """Statistics of every MoE layer with stats enabled, stacked over layers, as numpy arrays.

    Returns ``{"requested_LDE": int64 [L,G,E], "kept_LDE": int64 [L,G,E], "weight_sum_LDE":
    float32 [L,G,E], "entropy_sum_L": float64 [L], "max_prob_sum_L": float64 [L], "tokens_L":
    int64 [L], "bias_LE": float32 [L,E] or None}`` (``bias_LE`` when any layer uses the
    aux-loss-free bias; zeros for layers without one). One host synchronisation; with
    ``all_reduce=True`` the counts and sums (not the bias) are summed over torch.distributed
    ranks first (every rank must call). ``reset`` zeroes the accumulators afterwards.

    Raises ValueError when no layer has stats enabled (call ``stats.enable`` first).
    """
    layers = [m for m in _layers(model) if m._stats is not None]
    if not layers:
        raise ValueError(
            "model: no MoE layer has statistics enabled; call stats.enable(model) first"
        )
    sts = [m._stats for m in layers]
    L, G, E = len(sts), sts[0].num_labels, sts[0].num_experts
    if any(s.num_labels != G or s.num_experts != E for s in sts):
        raise ValueError(
            "model: MoE layers differ in num_experts or num_labels; read them one by one"
        )
    dev = sts[0].requested_GE.device
    ints = torch.cat([getattr(s, f).reshape(-1).to(dev) for f in _INT_FIELDS for s in sts])
    floats = torch.cat(
        [getattr(s, f).reshape(-1).double().to(dev) for f in _FLOAT_FIELDS for s in sts]
    )
    if all_reduce and _dist_ready():
        torch.distributed.all_reduce(ints)
        torch.distributed.all_reduce(floats)
    has_bias = any(m.bias_E is not None for m in layers)
    parts = [ints, floats.view(torch.int64)]
    if has_bias:
        bias = torch.stack(
            [
                m.bias_E.detach().double()
                if m.bias_E is not None
                else torch.zeros(m.num_experts, dtype=torch.float64, device=m.device)
                for m in layers
            ]
        ).to(dev)
        parts.append(bias.reshape(-1).view(torch.int64))
    host = torch.cat(parts).cpu().numpy()  # the one synchronisation
    n_i, n_f = ints.numel(), floats.numel()
    iv, fv = host[:n_i], host[n_i : n_i + n_f].view(np.float64)
    LGE = L * G * E
    out = {
        "requested_LDE": iv[:LGE].reshape(L, G, E).copy(),
        "kept_LDE": iv[LGE : 2 * LGE].reshape(L, G, E).copy(),
        "tokens_L": iv[2 * LGE :].copy(),
        "weight_sum_LDE": fv[:LGE].reshape(L, G, E).astype(np.float32),
        "entropy_sum_L": fv[LGE : LGE + L].copy(),
        "max_prob_sum_L": fv[LGE + L :].copy(),
        "bias_LE": host[n_i + n_f :].view(np.float64).reshape(L, E).astype(np.float32)
        if has_bias
        else None,
    }
    if reset:
        for s in sts:
            s.reset()
    return out
