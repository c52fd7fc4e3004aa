"""Routing strategies: which experts each token uses, and with what gate weight.

Legend: T tokens, D model dim, E experts, K top-k, G label groups (domains), B sequences,
S tokens per sequence. Router logits and scores are fp32 (autocast is switched off inside the
router), ``weights_TK`` fp32, ``experts_TK`` int32.

One :class:`Router` subclass per kind (definitions in ``docs/ROUTING.md``; each class's docstring
states its rule), registered by name with :func:`register` in ``ROUTER_CLASSES``; ``ROUTERS`` is
the tuple of names (``MoEConfig.router``'s choices). A class owns everything about its kind: the
selection rule (``decide``), what it needs from the layer (``check_inputs``: labels, token ids,
(B, S, D) input), its capacity rule (``capacity``), which selections the balancing counts
(``selection``), its parameters and buffers, and its configuration checks (``check_config``).
Adding a router is adding one registered class: ``learned``, ``frozen``, ``random``, ``hash``,
``reference``, ``expert_choice``, ``sequence`` and ``shared_router`` are such classes.

Sharing a decision goes through a :class:`SharedDecision` holder: the owner's router publishes
into it, the followers' routers read from it. It is a plain object, not a module, so it is in no
state dict and moves with no ``.to()``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.ops import RoutingPlan, route, router_scores, topk_gating

if TYPE_CHECKING:
    from moe_kernels.config import MoEConfig

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


def top_k_decision(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias_E: torch.Tensor | None = None,
    backend: str | None = None,
) -> RouterDecision:
    """Token choice from router logits (T, E) fp32: ``topk_gating`` (the bias changes selection
    only) plus the scores of every expert. Raises what ``topk_gating`` raises."""
    logits_TE = logits_TE.contiguous()
    scores_TE = router_scores(logits_TE, score)
    weights_TK, experts_TK = topk_gating(
        logits_TE, k, score=score, bias_E=bias_E, normalize=normalize, backend=backend
    )
    return RouterDecision(weights_TK, experts_TK, scores_TE, logits_TE)


def plan_decision(
    dec: RouterDecision,
    num_experts: int,
    *,
    capacity: int | None = None,
    drop: str = "position",
    backend: str | None = None,
) -> RoutingPlan:
    """The routing plan of a decision: ``route`` with the gate weights as drop priority when
    ``drop="score"`` and a capacity is set (``capacity=None``: dropless)."""
    scored = drop == "score" and capacity is not None
    return route(
        dec.experts_TK,
        num_experts,
        capacity=capacity,
        weights_TK=dec.weights_TK.detach() if scored else None,
        drop=drop,
        backend=backend,
    )


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


class SharedDecision:
    """The routing decision one layer's router publishes every forward, for the routers of later
    layers to reuse (``moe_kernels.share_router``). Holds no parameters: not a module."""

    def __init__(self) -> None:
        self.decision: RouterDecision | None = None

    def read(self, num_tokens: int) -> RouterDecision:
        """The published decision; ValueError when it does not cover ``num_tokens`` tokens."""
        dec = self.decision
        if dec is None or dec.experts_TK.shape[0] != num_tokens:
            raise ValueError(
                "x: router='shared_router' reuses the decision of the first MoE layer of this "
                f"forward, which has not routed {num_tokens} tokens yet (call the owner layer "
                "first)"
            )
        return dec


class Router(nn.Module):
    """Base of every router kind: maps layer inputs to a :class:`RouterDecision`.

    Args:
        d_model, num_experts, top_k: D, E, K.
        score: ``"softmax"`` or ``"sigmoid"``.
        normalize: renormalise the k gate weights to sum 1 (token-choice routers).
        jitter: multiplicative input noise U(1 - jitter, 1 + jitter) during training (Switch).
        num_groups: G, the number of domains (``reference`` only).
    A router weight ``weight_ED`` (E, D) has the layout of ``nn.Linear(D, E).weight`` (HF
    ``gate``); content-free routers have ``weight_ED = None``.
    """

    name: ClassVar[str] = ""
    weight_ED: torch.Tensor | None
    # Selection is a top-k of scores, so the aux-loss-free bias can steer it.
    takes_bias: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "softmax",
        normalize: bool = True,
        jitter: float = 0.0,
        num_groups: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.score, self.normalize, self.jitter = score, normalize, jitter
        self.num_groups = num_groups
        self.publishes: SharedDecision | None = None  # where this router's decisions go
        self.follows: SharedDecision | None = None  # whose decisions this router reuses

    @classmethod
    def from_config(cls, config: MoEConfig, d_model: int) -> Router:
        """The router of ``config.router``'s class for a layer of width ``d_model``."""
        kw = {f: getattr(config, f) for f in ("score", "normalize", "jitter", "num_groups")}
        return ROUTER_CLASSES[config.router](d_model, config.num_experts, config.top_k, **kw)

    @classmethod
    def check_config(cls, config: MoEConfig) -> None:
        """Router-specific configuration checks; ValueError naming the field."""
        if config.balance == "aux_free" and not cls.takes_bias:
            raise ValueError(
                f"balance: 'aux_free' biases a token-choice top-k selection; "
                f"router={cls.name!r} has none (use balance='none')"
            )

    # ---- what the router needs from the layer ----------------------------------------------

    def check_inputs(
        self, x: torch.Tensor, labels_T: torch.Tensor | None, token_ids_T: torch.Tensor | None
    ) -> None:
        """ValueError naming ``x``, ``labels`` or ``token_ids`` when this kind needs what is
        missing or misshapen (the layer skips it when the router follows a shared decision)."""

    # ---- selection ---------------------------------------------------------------------------

    def _init_weight(self) -> torch.Tensor:
        # std D^-1/2 gives logits of unit scale for unit-scale inputs, so frozen and random
        # routers make content-dependent, non-degenerate choices.
        return torch.randn(self.num_experts, self.d_model) * self.d_model**-0.5

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 router logits (T, E); autocast off; jitter on the input in training."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x = x_TD.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight_ED.float())

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        """This kind's selection rule for ``x`` (..., D) with ``labels_T`` / ``token_ids_T``
        (T,) integer tensors or None, ``bias_E`` the aux-free selection bias or None and
        ``backend`` the forced op backend or None."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        *,
        labels_T: torch.Tensor | None = None,
        token_ids_T: torch.Tensor | None = None,
        bias_E: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> RouterDecision:
        """Route ``x`` (..., D) (``sequence``: (B, S, D)); a follower returns the published
        decision. Raises ValueError naming ``x`` when a follower's owner has not routed yet."""
        if self.follows is not None:
            return self.follows.read(x.numel() // self.d_model)
        dec = self.decide(
            x, labels_T=labels_T, token_ids_T=token_ids_T, bias_E=bias_E, backend=backend
        )
        if self.publishes is not None:
            self.publishes.decision = dec
        return dec

    # ---- capacity and balancing --------------------------------------------------------------

    def capacity(
        self, num_tokens: int, capacity_factor: float | None, drop: str
    ) -> tuple[int | None, str]:
        """(slots per expert, drop policy): ``ceil(cf * T * k / E)`` or None (dropless) without
        a factor, and the configured policy."""
        if capacity_factor is None:
            return None, drop
        return math.ceil(capacity_factor * num_tokens * self.top_k / self.num_experts), drop

    def plan(
        self, dec: RouterDecision, capacity_factor: float | None, drop: str, backend=None
    ) -> RoutingPlan:
        """The routing plan of ``dec`` under this kind's capacity rule."""
        capacity, drop = self.capacity(dec.experts_TK.shape[0], capacity_factor, drop)
        return plan_decision(dec, self.num_experts, capacity=capacity, drop=drop, backend=backend)

    def selection(
        self, dec: RouterDecision, plan: RoutingPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(selected_TK, kept_TK, counts_E): the selected sets S_t and per-expert counts the
        balancing uses (token choice: the requested ones), and the kept selections (-1 where
        capacity dropped the slot)."""
        kept_TK = torch.where(plan.slot_row_TK >= 0, dec.experts_TK, -1)
        return dec.experts_TK, kept_TK, plan.counts_E

    # ---- sharing and between-step updates ---------------------------------------------------

    def publish(self) -> SharedDecision:
        """Make this router an owner: every decision goes to the returned holder."""
        if self.publishes is None:
            self.publishes = SharedDecision()
        self.follows = None
        return self.publishes

    def follow(self, shared: SharedDecision) -> None:
        """Reuse ``shared``'s decisions from now on; the own weight stops training (it stays in
        the state dict)."""
        self.follows = shared
        if isinstance(self.weight_ED, nn.Parameter):
            self.weight_ED.requires_grad_(False)

    def redraw(self) -> None:
        """Between optimizer steps: nothing, except for routers that re-draw their weight."""

    def reference_groups(self) -> list[list[int]]:
        """The expert group of each domain; ValueError for kinds without domain groups."""
        raise ValueError(f"router: reference_groups() needs router='reference', got {self.name!r}")

    def extra_repr(self) -> str:
        return f"name={self.name}, score={self.score}, E={self.num_experts}, k={self.top_k}"


ROUTER_CLASSES: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``cls`` available as ``MoEConfig(router=cls.name)``."""
    if not cls.name or cls.name in ROUTER_CLASSES:
        raise ValueError(f"name: expected a new router name, got {cls.name!r}")
    ROUTER_CLASSES[cls.name] = cls
    return cls


@register
class LearnedRouter(Router):
    """Top-k of the scores of a trained linear router ``logits = x @ weight_ED.T``."""

    name = "learned"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_ED = nn.Parameter(self._init_weight())

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        logits = self.logits(x.reshape(-1, x.shape[-1]))
        return self._top_k(logits, bias_E, backend)

    def _top_k(self, logits_TE, bias_E, backend) -> RouterDecision:
        kw = dict(score=self.score, normalize=self.normalize, bias_E=bias_E, backend=backend)
        return top_k_decision(logits_TE, self.top_k, **kw)


@register
class FrozenRouter(LearnedRouter):
    """A learned router whose weight never trains (fixed at its random init)."""

    name = "frozen"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_ED.requires_grad_(False)


@register
class RandomRouter(LearnedRouter):
    """A random router weight, re-drawn by :meth:`redraw` (``update_routers`` calls it after
    every optimizer step), identical on every rank. Buffers: ``seed`` and ``draws`` (int64
    scalars, persistent) fix the weight; ``weight_ED`` (non-persistent) is re-derived from them
    on :meth:`redraw` and after ``load_state_dict``."""

    name = "random"

    def __init__(self, *args, **kwargs) -> None:
        Router.__init__(self, *args, **kwargs)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.register_buffer("weight_ED", self._draw(seed, 0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._rederive())

    def _draw(self, seed: int, draws: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + draws)
        return torch.randn(self.num_experts, self.d_model, generator=g) * self.d_model**-0.5

    @torch.no_grad()
    def _rederive(self) -> None:
        seed, draws = torch.stack([self.seed, self.draws]).tolist()
        self.weight_ED.copy_(self._draw(seed, draws))

    @torch.no_grad()
    def redraw(self) -> None:
        """New random weight: the draw depends only on the seed and the number of draws."""
        self.draws.add_(1)
        self._rederive()


@register
class HashRouter(Router):
    """Content-free: experts ``(h(token_id) + j) mod E`` for j < k with a fixed integer hash
    (:func:`hash_experts`); weights 1/k. Needs the token ids."""

    name = "hash"
    takes_bias = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_ED = None

    def check_inputs(self, x, labels_T, token_ids_T) -> None:
        if token_ids_T is None:
            raise ValueError(
                "token_ids: router='hash' needs token_ids shaped like x[..., 0], got None"
            )
        # Range check only where it costs no device synchronisation and no graph break.
        cpu = token_ids_T.device.type == "cpu" and not torch.compiler.is_compiling()
        if cpu and token_ids_T.numel() and int(token_ids_T.min()) < 0:
            raise ValueError(f"token_ids: expected ids >= 0, found {int(token_ids_T.min())}")

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        E, K = self.num_experts, self.top_k
        experts = hash_experts(token_ids_T, E, K)
        w = torch.full(experts.shape, 1.0 / K, device=x.device)
        T = x.numel() // x.shape[-1]
        scores = torch.zeros(T, E, device=x.device).scatter_(1, experts.long(), w)
        return RouterDecision(w, experts, scores, None)


@register
class ReferenceRouter(LearnedRouter):
    """The domain oracle: labels (domains) d in [0, G) pick the disjoint group of experts
    ``[d*E/G, (d+1)*E/G)``; a learned router masked to that group picks the top-k inside it.
    Label -1 (padding) routes like domain 0. Needs the labels."""

    name = "reference"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        group_E = torch.arange(self.num_experts) // (self.num_experts // self.num_groups)
        self.register_buffer("group_E", group_E, persistent=False)

    @classmethod
    def check_config(cls, config: MoEConfig) -> None:
        E, k, G = config.num_experts, config.top_k, config.num_groups
        if isinstance(G, bool) or not isinstance(G, int) or G < 1 or E % G:
            raise ValueError(
                f"num_groups: router='reference' needs the number of domains G >= 1 with "
                f"num_experts % G == 0 (num_experts={E}), got {G!r}"
            )
        if k > E // G:
            raise ValueError(
                f"top_k: router='reference' needs top_k <= num_experts / num_groups = "
                f"{E // G}, got {k}"
            )
        super().check_config(config)

    def check_inputs(self, x, labels_T, token_ids_T) -> None:
        if labels_T is None:
            raise ValueError(
                "labels: router='reference' needs domain labels shaped like x[..., 0], got None"
            )
        G = self.num_groups
        # Range check only where it costs no device synchronisation and no graph break.
        if not torch.compiler.is_compiling() and labels_T.numel() and labels_T.device.type == "cpu":
            lo, hi = int(labels_T.min()), int(labels_T.max())
            if lo < -1 or hi >= G:
                bad = lo if lo < -1 else hi
                raise ValueError(f"labels: expected domain labels in [-1, {G}), found {bad}")

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        logits = self.logits(x.reshape(-1, x.shape[-1]))
        lab = labels_T.long().clamp_min(0)
        mask = self.group_E.unsqueeze(0) == lab.unsqueeze(1)
        logits = torch.where(mask, logits, torch.full_like(logits, _MASKED_LOGIT))
        return self._top_k(logits, bias_E, backend)

    def reference_groups(self) -> list[list[int]]:
        return reference_groups(self.num_experts, self.num_groups)


@register
class ExpertChoiceRouter(LearnedRouter):
    """Every expert takes its top-C tokens by score (balanced by construction, non-causal): the
    decision holds all E (token, expert) pairs with their scores, and the plan keeps C per expert
    (``route`` with ``drop="score"``), so tokens get a variable number of experts."""

    name = "expert_choice"
    takes_bias = False

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        logits = self.logits(x.reshape(-1, x.shape[-1])).contiguous()
        scores = router_scores(logits, self.score)
        T, E = scores.shape
        experts = torch.arange(E, device=x.device, dtype=torch.int32).expand(T, E)
        return RouterDecision(scores, experts.contiguous(), scores, logits)

    def capacity(self, num_tokens, capacity_factor, drop) -> tuple[int, str]:
        """Tokens per expert ``C = min(T, ceil(cf * T * k / E))``, cf = 1 by default, each expert
        keeping its highest-scoring tokens (``drop="score"``). An expert cannot take more than
        the T tokens there are, so C is clipped to T (which also keeps the plan at T * E rows
        when cf * k > E)."""
        cf = 1.0 if capacity_factor is None else capacity_factor
        return min(num_tokens, math.ceil(cf * num_tokens * self.top_k / self.num_experts)), "score"

    def selection(self, dec, plan):
        # The selected set of a token is what the experts took: kept pairs, kept counts.
        kept_TK = torch.where(plan.slot_row_TK >= 0, dec.experts_TK, -1)
        return kept_TK, kept_TK, plan.kept_E


@register
class SequenceRouter(LearnedRouter):
    """One decision per sequence, from the mean of the layer input over the sequence; the input
    must be (B, S, D)."""

    name = "sequence"

    def check_inputs(self, x, labels_T, token_ids_T) -> None:
        if x.dim() != 3:
            raise ValueError(
                f"x: router='sequence' needs (B, S, D) input, got shape {tuple(x.shape)}"
            )

    def decide(self, x, *, labels_T, token_ids_T, bias_E, backend) -> RouterDecision:
        Bn, S, E = x.shape[0], x.shape[1], self.num_experts
        logits = self.logits(x.mean(1)).unsqueeze(1).expand(Bn, S, E).reshape(Bn * S, E)
        return self._top_k(logits, bias_E, backend)


@register
class SharedRouter(LearnedRouter):
    """A learned router that publishes its decisions for later layers to reuse
    (``moe_kernels.share_router``); on its own it behaves like ``learned``."""

    name = "shared_router"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.publish()


ROUTERS = tuple(ROUTER_CLASSES)
