"""The ``MoE`` layer: router -> plan -> dispatch -> experts -> combine; strategies are config.

Legend: T tokens, D d_model, F d_ff (expert hidden dim), E experts, K top-k, N plan rows.

Expert weights are stacked per expert in the layout of Hugging Face Mixtral / Qwen-MoE experts
(``nn.Linear.weight`` is (out, in)), so converting a checkpoint is a ``torch.stack``:

- ``w1_EFD`` (E, F, D): gate projection (Mixtral ``w1``, Qwen ``gate_proj``);
- ``w3_EFD`` (E, F, D): up projection (Mixtral ``w3``, Qwen ``up_proj``), gated activations only;
- ``w2_EDF`` (E, D, F): down projection (Mixtral ``w2``, Qwen ``down_proj``);
- with ``expert_bias=True``: ``b1_EF``, ``b3_EF`` (E, F) and ``b2_ED`` (E, D), added per row.

HF transformers >= 5 fuses gate and up as ``gate_up_proj`` (E, 2F, D): ``w1_EFD`` is its first F
rows per expert and ``w3_EFD`` the last F; ``down_proj`` (E, D, F) is ``w2_EDF``.

``grouped_mm`` takes (E, in, out) weights, so the forward passes transposed views
(``w1_EFD.transpose(1, 2)`` is (E, D, F)); no copy is made.

Forward for x (..., D): router logits in fp32 -> ``topk_gating`` -> ``route`` (capacity
``C_e = ceil(capacity_factor * T * k / E)``, drop policy) -> ``dispatch`` -> ``grouped_mm`` ->
activation -> ``grouped_mm`` -> ``combine``. A dropped (token, slot) adds nothing, so a fully
dropped token's MoE output is 0 and it passes through on the model's residual connection.
Under autocast the expert path runs in the autocast dtype; the router always runs in fp32.

After each forward, ``layer.aux_loss`` holds ``aux_coef * L_aux + z_coef * L_z`` (a scalar,
differentiable; zero when there is nothing to add); ``moe_kernels.aux_losses(model)`` sums it
over layers and ``moe_kernels.update_routers(model)`` applies the between-step updates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import balancing as bal
from moe_kernels.activations import ACTIVATIONS
from moe_kernels.config import MoEConfig
from moe_kernels.ops import combine, dispatch, grouped_mm, route
from moe_kernels.routers import Router, RouterDecision, reference_groups
from moe_kernels.stats import RoutingStats


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _init_uniform(*shape: int, fan_in: int) -> torch.Tensor:
    # nn.Linear's default range, so an expert initialised here matches a freshly built Linear.
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(*shape).uniform_(-bound, bound)


class SharedExperts(nn.Module):
    """``n`` always-on experts of hidden size F, kept as one dense FFN of hidden size n * F (the
    sum of n unit-weight experts is the same function).

    Weights w1_FD/w3_FD (nF, D), w2_DF (D, nF)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.act, gated = ACTIVATIONS[activation]
        self.w1_FD = nn.Parameter(_init_uniform(d_hidden, d_model, fan_in=d_model))
        self.w3_FD = (
            nn.Parameter(_init_uniform(d_hidden, d_model, fan_in=d_model)) if gated else None
        )
        self.w2_DF = nn.Parameter(_init_uniform(d_model, d_hidden, fan_in=d_hidden))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x_TD, self.w1_FD))
        if self.w3_FD is not None:
            h = h * F.linear(x_TD, self.w3_FD)
        return F.linear(h, self.w2_DF)


class MoE(nn.Module):
    """A drop-in Mixture-of-Experts FFN: ``y = MoE(...)(x, labels=..., token_ids=...)``.

    Args:
        d_model, d_ff: D and the hidden size F of every expert.
        num_experts, top_k: E and k.
        router, balance, capacity_factor, activation, shared_experts: see :class:`MoEConfig`;
            further ``MoEConfig`` fields (score, normalize, jitter, scope, aux_coef, z_coef,
            bias_rate, bias_rule, drop, num_groups, expert_bias) as keyword arguments.
        backend: force an op backend (``"cpu"``, ``"reference"``, ...) for every op.

    Raises ValueError naming the argument for invalid configurations (see ``MoEConfig``).
    """

    _records_routing = True  # found by moe_kernels.stats

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        top_k: int = 2,
        *,
        router: str = "learned",
        balance: str = "aux",
        capacity_factor: float | None = None,
        activation: str = "swiglu",
        shared_experts: int = 0,
        backend: str | None = None,
        **config,
    ) -> None:
        super().__init__()
        unknown = set(config) - {f.name for f in fields(MoEConfig)}
        if unknown:
            raise ValueError(f"config: unknown MoEConfig fields {sorted(unknown)}")
        cfg = MoEConfig(
            router=router,
            top_k=top_k,
            num_experts=num_experts,
            balance=balance,
            capacity_factor=capacity_factor,
            activation=activation,
            shared_experts=shared_experts,
            **config,
        )
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.config = cfg
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k = num_experts, top_k
        self.backend = backend
        E, D, Fh = num_experts, d_model, d_ff
        self.router = Router(
            D,
            E,
            top_k,
            kind=cfg.router,
            score=cfg.score,
            normalize=cfg.normalize,
            jitter=cfg.jitter,
            num_groups=cfg.num_groups,
        )
        self.act, gated = ACTIVATIONS[cfg.activation]
        self.w1_EFD = nn.Parameter(_init_uniform(E, Fh, D, fan_in=D))
        self.w3_EFD = nn.Parameter(_init_uniform(E, Fh, D, fan_in=D)) if gated else None
        self.w2_EDF = nn.Parameter(_init_uniform(E, D, Fh, fan_in=Fh))
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape)) if cfg.expert_bias else None
        self.b1_EF, self.b2_ED = zeros(E, Fh), zeros(E, D)
        self.b3_EF = zeros(E, Fh) if gated else None
        self.shared = (
            SharedExperts(D, shared_experts * Fh, cfg.activation) if shared_experts else None
        )
        bias = torch.zeros(E) if cfg.balance == "aux_free" else None
        self.register_buffer("bias_E", bias)  # aux-loss-free selection bias (logged, checkpointed)
        self.balance_state = bal.BalanceState(E)
        self.aux_loss = torch.zeros(())
        self._stats: RoutingStats | None = None
        self._shared_decision: RouterDecision | None = None
        self._stores_decision = cfg.router == "shared_router"
        self.__dict__["_router_owner"] = None  # set by share_router; not a submodule

    @classmethod
    def from_config(
        cls, d_model: int, d_ff: int, config: MoEConfig, *, backend: str | None = None
    ) -> MoE:
        """Build a layer from a :class:`MoEConfig`."""
        kw = asdict(config)
        return cls(d_model, d_ff, kw.pop("num_experts"), kw.pop("top_k"), backend=backend, **kw)

    @property
    def device(self) -> torch.device:
        return self.w1_EFD.device

    def reference_groups(self) -> list[list[int]]:
        """The expert group of each domain (``router="reference"``): domain d owns experts
        ``[d*E/G, (d+1)*E/G)``. Raises ValueError for other routers."""
        if self.config.router != "reference":
            raise ValueError(
                f"router: reference_groups() needs router='reference', got {self.config.router!r}"
            )
        return reference_groups(self.num_experts, self.config.num_groups)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Rank-local accumulators follow the parameters' device but keep their own dtypes.
        dev = self.device
        self.balance_state.apply(lambda t: t.to(dev))
        if self._stats is not None:
            self._stats.apply(lambda t: t.to(dev))
        self.aux_loss = self.aux_loss.to(dev)
        return self

    # ---- forward ---------------------------------------------------------------------------

    def _flat(self, name: str, t: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor shaped like x[..., 0], got {type(t).__name__}"
            )
        if tuple(t.shape) != tuple(lead):
            raise ValueError(
                f"{name}: expected shape {tuple(lead)} (x[..., 0]), got {tuple(t.shape)}"
            )
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
        return t.reshape(-1)

    def _check_inputs(self, x, labels_T, token_ids_T) -> None:
        kind = self.config.router
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (..., {self.d_model}), got {shape}")
        if self._router_owner is not None:
            return
        if kind == "sequence" and x.dim() != 3:
            raise ValueError(
                f"x: router='sequence' needs (B, S, D) input, got shape {tuple(x.shape)}"
            )
        if kind == "hash" and token_ids_T is None:
            raise ValueError(
                "token_ids: router='hash' needs token_ids shaped like x[..., 0], got None"
            )
        if kind == "reference":
            if labels_T is None:
                raise ValueError(
                    "labels: router='reference' needs domain labels shaped like x[..., 0], got None"
                )
            G = self.config.num_groups
            if (
                not torch.compiler.is_compiling()
                and labels_T.numel()
                and labels_T.device.type == "cpu"
            ):
                hi = int(labels_T.max())
                if hi >= G:
                    raise ValueError(f"labels: expected domain labels in [-1, {G}), found {hi}")

    def _decide(self, x, labels_T, token_ids_T) -> RouterDecision:
        owner = self._router_owner
        if owner is not None:
            dec = owner._shared_decision
            T = x.numel() // self.d_model
            if dec is None or dec.experts_TK.shape[0] != T:
                raise ValueError(
                    "x: router='shared_router' reuses the decision of the first MoE layer of this "
                    f"forward, which has not routed {T} tokens yet (call the owner layer first)"
                )
            return dec
        bias = self.bias_E if self.config.balance == "aux_free" else None
        dec = self.router(
            x, labels_T=labels_T, token_ids_T=token_ids_T, bias_E=bias, backend=self.backend
        )
        if self._stores_decision:
            self._shared_decision = dec
        return dec

    def _plan(self, dec: RouterDecision, T: int):
        cfg = self.config
        if cfg.router == "expert_choice":
            capacity, drop = self.router.expert_choice_capacity(T, cfg.capacity_factor), "score"
        elif cfg.capacity_factor is None:
            capacity, drop = None, cfg.drop
        else:
            capacity = math.ceil(cfg.capacity_factor * T * self.top_k / self.num_experts)
            drop = cfg.drop
        scored = drop == "score" and capacity is not None
        return route(
            dec.experts_TK,
            self.num_experts,
            capacity=capacity,
            weights_TK=dec.weights_TK.detach() if scored else None,
            drop=drop,
            backend=self.backend,
        )

    def _experts(self, x_TD: torch.Tensor, dec: RouterDecision, plan) -> torch.Tensor:
        dt = _compute_dtype(x_TD)
        b = self.backend
        x_ND = dispatch(x_TD.to(dt).contiguous(), plan, backend=b)
        bias = lambda h, b_EX: h
        if self.b1_EF is not None:
            # Expert of every row (padding rows borrow slot 0's; combine never reads them).
            row_expert_N = dec.experts_TK.reshape(-1).long()[plan.row_slot_N.long().clamp_min(0)]
            bias = lambda h, b_EX: h + b_EX.to(dt)[row_expert_N]
        h = grouped_mm(x_ND, self.w1_EFD.to(dt).transpose(1, 2), plan.offsets_E1, backend=b)
        h = self.act(bias(h, self.b1_EF))
        if self.w3_EFD is not None:
            up = grouped_mm(x_ND, self.w3_EFD.to(dt).transpose(1, 2), plan.offsets_E1, backend=b)
            h = h * bias(up, self.b3_EF)
        y_ND = grouped_mm(
            h.contiguous(), self.w2_EDF.to(dt).transpose(1, 2), plan.offsets_E1, backend=b
        )
        return combine(bias(y_ND, self.b2_ED).contiguous(), dec.weights_TK, plan, backend=b)

    def _losses(self, x: torch.Tensor, dec: RouterDecision, sel_TK, counts_E) -> torch.Tensor:
        cfg = self.config
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        if self._router_owner is not None or dec.logits_TE is None:
            return loss
        if cfg.balance == "aux":
            p = bal.balance_scores(dec.scores_TE, cfg.score)
            if cfg.scope == "sequence":
                S = x.shape[-2] if x.dim() >= 3 else p.shape[0]
                E = self.num_experts
                l_aux = bal.sequence_aux_loss(
                    p.reshape(-1, S, E), sel_TK.reshape(-1, S, sel_TK.shape[-1])
                )
            elif cfg.scope == "global_batch" and self.training:
                l_aux = bal.switch_aux_loss(p, self.balance_state.accumulate_global(counts_E))
            else:  # micro_batch (and global_batch in eval mode: no step to accumulate over)
                l_aux = bal.switch_aux_loss(p, counts_E)
            loss = loss + cfg.aux_coef * l_aux
        if cfg.z_coef > 0:
            loss = loss + cfg.z_coef * bal.z_loss(dec.logits_TE)
        return loss

    def forward(
        self,
        x: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MoE output for ``x`` (..., D), same shape; the model adds the residual.

        Args:
            x: (..., D) activations (``router="sequence"``: (B, S, D)).
            labels: integer domain labels shaped like ``x[..., 0]``, -1 = padding (required by
                ``router="reference"``; used by statistics).
            token_ids: integer token ids shaped like ``x[..., 0]`` (required by ``router="hash"``).

        Raises ValueError naming ``x``, ``labels`` or ``token_ids`` for missing or misshapen input.
        """
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) else None
        labels_T = self._flat("labels", labels, lead) if lead is not None else None
        token_ids_T = self._flat("token_ids", token_ids, lead) if lead is not None else None
        self._check_inputs(x, labels_T, token_ids_T)
        cfg = self.config
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        dec = self._decide(x, labels_T, token_ids_T)
        plan = self._plan(dec, T)
        out = self._experts(x_TD, dec, plan)
        if self.shared is not None:
            out = out + self.shared(x_TD).to(out.dtype)
        kept_TK = torch.where(plan.slot_row_TK >= 0, dec.experts_TK, -1)
        choice = cfg.router == "expert_choice"
        sel_TK = kept_TK if choice else dec.experts_TK  # the selected sets S_t
        counts_E = plan.kept_E if choice else plan.counts_E
        self.aux_loss = self._losses(x, dec, sel_TK, counts_E)
        if cfg.balance == "aux_free" and self.training and self._router_owner is None:
            self.balance_state.accumulate_window(counts_E)
        if self._stats is not None:
            self._stats.record(sel_TK, kept_TK, dec.weights_TK, dec.scores_TE, cfg.score, labels_T)
        return out.reshape(x.shape[:-1] + (out.shape[-1],))

    # ---- between optimizer steps -----------------------------------------------------------

    @torch.no_grad()
    def update_router(self) -> None:
        """Apply the aux-free bias step from the feedback window, redraw a random router and
        reset the global-batch accumulators (all ranks must call it: it may all-reduce)."""
        cfg = self.config
        if cfg.balance == "aux_free" and self._router_owner is None:
            counts = self.balance_state.window(cfg.scope)
            self.bias_E.copy_(
                bal.aux_free_update(self.bias_E, counts, cfg.bias_rate, cfg.bias_rule)
            )
        self.router.redraw()
        self.balance_state.reset()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, E={self.num_experts}, k={self.top_k}, "
            f"router={c.router}, balance={c.balance}@{c.scope}, "
            f"capacity_factor={c.capacity_factor}, "
            f"activation={c.activation}, shared_experts={c.shared_experts}"
        )


def _moe_layers(model) -> list[MoE]:
    if isinstance(model, MoE):
        return [model]
    if isinstance(model, nn.Module):
        return [m for m in model.modules() if isinstance(m, MoE)]
    return [m for m in model if isinstance(m, MoE)]


def aux_losses(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` of the last forward over every MoE layer of ``model`` (a scalar
    tensor; 0 without MoE layers)."""
    losses = [m.aux_loss for m in _moe_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def update_routers(model: nn.Module) -> None:
    """Call after ``optimizer.step()`` on every rank: aux-free bias update from the window's
    counts, random-router redraw, reset of the global-batch accumulators, in every MoE layer."""
    for m in _moe_layers(model):
        m.update_router()


def share_router(modules) -> MoE:
    """Make the first MoE layer of ``modules`` (an ``nn.Module`` or an iterable of layers) the
    router owner: every later layer reuses its decision (experts and gate weights) of the same
    forward, adds no aux loss of its own, and its own router weight stops training
    (``requires_grad=False``; it stays in the state dict). Returns the owner.

    Raises ValueError when there are no layers or they differ in num_experts / top_k.
    """
    layers = _moe_layers(modules)
    if not layers:
        raise ValueError("modules: expected at least one moe_kernels.MoE layer, found none")
    owner = layers[0]
    for m in layers[1:]:
        if (m.num_experts, m.top_k) != (owner.num_experts, owner.top_k):
            raise ValueError(
                f"modules: shared routing needs equal (num_experts, top_k), got "
                f"{(owner.num_experts, owner.top_k)} and {(m.num_experts, m.top_k)}"
            )
        m.__dict__["_router_owner"] = owner
        if isinstance(m.router.weight_ED, nn.Parameter):
            m.router.weight_ED.requires_grad_(False)
    owner.__dict__["_router_owner"] = None
    owner._stores_decision = True
    return owner
