"""Routing strategies: which experts each token uses, and with what gate weight.

Legend: T tokens, D model dim, E experts, K top-k, G label groups (domains), B sequences,
S tokens per sequence. Router logits and scores are fp32 (autocast is switched off inside the
router), ``weights_TK`` fp32, ``experts_TK`` int32.

Router kinds (``shared/ROUTING.md``), all one :class:`Router` with a ``kind``:

- ``learned``: top-k of the scores of a linear router ``logits = x @ weight_ED.T``.
- ``frozen``: the same, with the router weight fixed at its random init (``requires_grad=False``).
- ``random``: a random router weight (a non-persistent buffer), re-drawn by :meth:`Router.redraw`
  (``moe_kernels.update_routers`` calls it after every optimizer step).
- ``hash``: experts ``(h(token_id) + j) mod E`` for j < k with a fixed integer hash; weights 1/k.
- ``reference``: labels (domains) d in [0, G) pick the disjoint group of experts
  ``[d*E/G, (d+1)*E/G)``; a learned router masked to that group picks the top-k inside it.
  Label -1 (padding) routes like domain 0.
- ``expert_choice``: every expert takes its top-C tokens by score; the router returns all E
  (token, expert) pairs with their scores and the layer keeps C per expert (``route`` with
  ``drop="score"``), so tokens get a variable number of experts (non-causal).
- ``sequence``: one decision per sequence from the mean of the layer input over the sequence;
  input must be (B, S, D).
- ``shared_router``: a learned router whose decision is reused by later layers (see
  ``moe_kernels.share_router``); on its own it behaves like ``learned``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.ops import topk_gating

ROUTERS = (
    "learned",
    "frozen",
    "random",
    "hash",
    "reference",
    "expert_choice",
    "sequence",
    "shared_router",
)
SCORES = ("softmax", "sigmoid")
# A logit this low gives score 0 (softmax and sigmoid, fp32) yet keeps the logits finite, which
# topk_gating requires.
_MASKED_LOGIT = -1.0e9


class RouterDecision(NamedTuple):
    """weights_TK (T, K) fp32 gate weights; experts_TK (T, K) int32 ids; scores_TE (T, E) fp32
    score of every expert (zero outside the selected set for content-free routers); logits_TE
    (T, E) fp32 or None (hash)."""

    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor | None


def hash_experts(token_ids_T: torch.Tensor, num_experts: int, k: int) -> torch.Tensor:
    """Fixed, content-free expert ids for token ids: k consecutive experts (mod E) starting at a
    32-bit integer hash of the id. Shape (T, k) int32; distinct within a token."""
    h = token_ids_T.long() & 0xFFFFFFFF
    # Two multiply-xorshift rounds (wrapping int64 products keep the low 32 bits exact).
    h = ((h * 0x9E3779B1) & 0xFFFFFFFF) ^ (h >> 15)
    h = ((h * 0x85EBCA77) & 0xFFFFFFFF) ^ (h >> 13)
    start = h % num_experts
    j = torch.arange(k, device=h.device)
    return ((start.unsqueeze(-1) + j) % num_experts).to(torch.int32)


def reference_groups(num_experts: int, num_groups: int) -> list[list[int]]:
    """Expert group of each domain: domain d owns experts [d*E/G, (d+1)*E/G)."""
    n = num_experts // num_groups
    return [list(range(d * n, (d + 1) * n)) for d in range(num_groups)]


def _scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    return torch.softmax(logits_TE, -1) if score == "softmax" else torch.sigmoid(logits_TE)


class Router(nn.Module):
    """Maps layer inputs to a :class:`RouterDecision`.

    Args:
        d_model, num_experts, top_k: D, E, K.
        kind: one of ``ROUTERS``.
        score: ``"softmax"`` or ``"sigmoid"``.
        normalize: renormalise the k gate weights to sum 1 (token-choice routers).
        jitter: multiplicative input noise U(1 - jitter, 1 + jitter) during training (Switch).
        num_groups: G, the number of domains (``reference`` only).
    The weight ``weight_ED`` (E, D) has the layout of ``nn.Linear(D, E).weight`` (HF ``gate``).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        kind: str = "learned",
        score: str = "softmax",
        normalize: bool = True,
        jitter: float = 0.0,
        num_groups: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.kind, self.score, self.normalize, self.jitter = kind, score, normalize, jitter
        self.num_groups = num_groups
        self._draws = 0
        if kind == "hash":
            self.weight_ED = None
        elif kind == "random":
            self._seed = int(torch.randint(0, 2**31 - 1, ()).item())
            self.register_buffer("weight_ED", self._draw(), persistent=False)
        else:
            w = self._draw()
            self.weight_ED = nn.Parameter(w, requires_grad=kind != "frozen")
        if kind == "reference":
            group_E = torch.arange(num_experts) // (num_experts // num_groups)
            self.register_buffer("group_E", group_E, persistent=False)

    def _draw(self, device=None) -> torch.Tensor:
        # std D^-1/2 gives logits of unit scale for unit-scale inputs, so frozen and random
        # routers make content-dependent, non-degenerate choices.
        std = self.d_model**-0.5
        if self.kind != "random":
            return torch.randn(self.num_experts, self.d_model, device=device) * std
        g = torch.Generator(device="cpu").manual_seed(self._seed * 1_000_003 + self._draws)
        return (torch.randn(self.num_experts, self.d_model, generator=g) * std).to(device)

    @torch.no_grad()
    def redraw(self) -> None:
        """New random router weight (``random`` kind only; identical on every rank since the draw
        depends only on the construction-time seed and the number of draws)."""
        if self.kind != "random":
            return
        self._draws += 1
        self.weight_ED.copy_(self._draw(self.weight_ED.device))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 router logits (T, E); autocast off; jitter on the input in training."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x = x_TD.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight_ED.float())

    def forward(
        self,
        x: torch.Tensor,
        *,
        labels_T: torch.Tensor | None = None,
        token_ids_T: torch.Tensor | None = None,
        bias_E: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> RouterDecision:
        """Route ``x`` (..., D) (``sequence``: (B, S, D)). Raises ValueError naming ``x``,
        ``labels`` or ``token_ids`` when the kind needs what is missing or misshapen."""
        E, K = self.num_experts, self.top_k
        x_TD = x.reshape(-1, x.shape[-1])
        if self.kind == "hash":
            experts = hash_experts(token_ids_T, E, K)
            w = torch.full(experts.shape, 1.0 / K, device=x.device)
            scores = torch.zeros(x_TD.shape[0], E, device=x.device).scatter_(1, experts.long(), w)
            return RouterDecision(w, experts, scores, None)
        if self.kind == "sequence":
            Bn, S = x.shape[0], x.shape[1]
            lg = self.logits(x.mean(1))
            logits = lg.unsqueeze(1).expand(Bn, S, E).reshape(Bn * S, E)
        else:
            logits = self.logits(x_TD)
        if self.kind == "reference":
            lab = labels_T.long().clamp_min(0)
            mask = self.group_E.unsqueeze(0) == lab.unsqueeze(1)
            logits = torch.where(mask, logits, torch.full_like(logits, _MASKED_LOGIT))
        logits = logits.contiguous()
        scores = _scores(logits, self.score)
        if self.kind == "expert_choice":
            experts = torch.arange(E, device=x.device, dtype=torch.int32).expand(x_TD.shape[0], E)
            return RouterDecision(scores, experts.contiguous(), scores, logits)
        w, experts = topk_gating(
            logits, K, score=self.score, bias_E=bias_E, normalize=self.normalize, backend=backend
        )
        return RouterDecision(w, experts, scores, logits)

    def expert_choice_capacity(self, T: int, capacity_factor: float | None) -> int:
        """Tokens per expert for ``expert_choice``: ceil(cf * T * k / E), cf = 1 by default."""
        cf = 1.0 if capacity_factor is None else capacity_factor
        return min(T, math.ceil(cf * T * self.top_k / self.num_experts))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, score={self.score}, E={self.num_experts}, k={self.top_k}"
