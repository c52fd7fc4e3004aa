"""The ``MoE`` layer: router -> plan -> GroupedExperts -> shared experts -> losses; strategies are
config values.

Legend: T tokens, D d_model, F d_ff (expert hidden dim), E experts, K top-k, N plan rows.

Forward for x (..., D): the router (``moe_kernels.routers``, one class per ``MoEConfig.router``
kind) turns the fp32 router logits into a decision (gate weights, expert ids) -> its capacity
rule and ``route`` give the plan (``C_e = ceil(capacity_factor * T * k / E)`` for token choice,
drop policy) -> :class:`~moe_kernels.experts.GroupedExperts` runs ``dispatch`` -> ``grouped_mm``
-> activation -> ``grouped_mm`` -> ``combine`` -> plus the shared experts. A dropped (token,
slot) adds nothing, so a fully dropped token's MoE output is 0 and it passes through on the
model's residual connection. Under autocast the expert path runs in the autocast dtype; the
router always runs in fp32.

Expert weights live in ``layer.experts`` (``experts.w1_EFD`` (E, F, D), ``experts.w3_EFD``
(E, F, D), ``experts.w2_EDF`` (E, D, F), optional biases; the HF-compatible layout is described
in ``moe_kernels.experts``); ``layer.w1_EFD`` / ``w3_EFD`` / ``w2_EDF`` are the same tensors.

Expert parallelism (``ep_group=``, ``moe_kernels.parallel``): the layer keeps experts
``[r*E/P, (r+1)*E/P)`` of the P ranks of the group on rank r (``layer.experts`` holds those,
``layer.local_experts`` says which); the router stays replicated and routes over all E; rows go
to the rank owning their expert and back with ``all_to_all_single``. Loading a full (unsharded)
state dict into an expert-parallel layer keeps this rank's experts.

After each forward, ``layer.aux_loss`` holds ``aux_coef * L_aux + z_coef * L_z`` (a scalar,
differentiable; zero when there is nothing to add); ``moe_kernels.aux_losses(model)`` sums it
over layers and ``moe_kernels.update_routers(model)`` applies the between-step updates.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import torch
from torch import nn

from moe_kernels import balancing as bal
from moe_kernels import parallel
from moe_kernels.config import MoEConfig
from moe_kernels.experts import GroupedExperts, SharedExperts
from moe_kernels.ops import RoutingPlan
from moe_kernels.ops.topk_gating import NON_FINITE_LOGITS
from moe_kernels.routers import Router, RouterDecision
from moe_kernels.stats import RoutingStats

# State-dict keys of the expert weights before they moved into ``layer.experts``.
_EXPERT_KEYS = ("w1_EFD", "w3_EFD", "w2_EDF", "b1_EF", "b3_EF", "b2_ED")


def _old_expert_keys(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: checkpoints that kept the expert weights on the layer itself
    (``w1_EFD``) load into ``experts.w1_EFD``."""
    for name in _EXPERT_KEYS:
        if prefix + name in state_dict and prefix + "experts." + name not in state_dict:
            state_dict[prefix + "experts." + name] = state_dict.pop(prefix + name)


def _full_experts(layer: MoE, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a full (E, ...) expert tensor loads as this rank's shard."""
    if layer.ep is None:
        return
    r = layer.local_experts
    for name, _ in layer.experts.named_parameters():
        key = prefix + "experts." + name
        t = state_dict.get(key)
        if t is not None and t.shape[0] == layer.num_experts != len(r):
            state_dict[key] = t[r.start : r.stop]


class MoE(nn.Module):
    """A drop-in Mixture-of-Experts FFN: ``y = MoE(...)(x, labels=..., token_ids=...)``.

    Args:
        d_model, d_ff: D and the hidden size F of every expert.
        num_experts, top_k: E and k.
        router, balance, capacity_factor, activation, shared_experts: see :class:`MoEConfig`;
            further ``MoEConfig`` fields (score, normalize, jitter, scope, aux_coef, z_coef,
            bias_rate, bias_rule, drop, num_groups, expert_bias) as keyword arguments.
        backend: force an op backend (``"cpu"``, ``"cuda"``, ...) for every op.
        gather: the experts' fused-gather switch (``"auto"``, True, False; see
            ``moe_kernels.experts``).
        ep_group: None, or the expert-parallel group (a ``ProcessGroup``, a 1-D ``DeviceMesh``
            or a 2-D one with dimensions ``("dp", "ep")``): experts sharded over its ranks
            (every rank of it builds the layer with the same seed; see
            ``moe_kernels.parallel``).
        ep_pad: exchange fixed-size padded blocks instead of exact row counts (no host
            synchronisation, more memory; ``moe_kernels.parallel``).

    Raises ValueError naming the argument for invalid configurations (see ``MoEConfig``), and
    ``num_experts`` not divisible by the expert-parallel size.
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
        gather: str | bool = "auto",
        ep_group=None,
        ep_pad: bool = False,
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
        self.router = Router.from_config(cfg, d_model)
        self.experts = GroupedExperts(
            num_experts,
            d_model,
            d_ff,
            cfg.activation,
            bias=cfg.expert_bias,
            gather=gather,
            backend=backend,
        )
        self.shared = (
            SharedExperts(d_model, shared_experts * d_ff, cfg.activation)
            if shared_experts
            else None
        )
        bias = torch.zeros(num_experts) if cfg.balance == "aux_free" else None
        self.register_buffer("bias_E", bias)  # aux-loss-free selection bias (logged, checkpointed)
        self.balance_state = bal.BalanceState(num_experts)
        self.aux_loss = torch.zeros(())
        self._stats: RoutingStats | None = None
        self._register_load_state_dict_pre_hook(_old_expert_keys)
        self._register_load_state_dict_pre_hook(_full_experts, with_module=True)
        self.ep: parallel.EPGroup | None = None
        self.ep_pad = False
        if ep_group is not None:
            self.shard_experts(ep_group, pad=ep_pad)

    @classmethod
    def from_config(
        cls,
        d_model: int,
        d_ff: int,
        config: MoEConfig,
        *,
        backend: str | None = None,
        ep_group=None,
        ep_pad: bool = False,
    ) -> MoE:
        """Build a layer from a :class:`MoEConfig` (``ep_group``/``ep_pad`` as in the class)."""
        kw = asdict(config)
        E, k = kw.pop("num_experts"), kw.pop("top_k")
        return cls(d_model, d_ff, E, k, backend=backend, ep_group=ep_group, ep_pad=ep_pad, **kw)

    def shard_experts(self, ep_group, *, pad: bool = False) -> None:
        """Keep only this rank's experts of ``ep_group`` (see the ``ep_group`` argument); every
        rank of the group calls it. Raises ValueError when the layer is already sharded or E is
        not a multiple of the group size, TypeError for a bad ``ep_group`` or ``pad``."""
        if self.ep is not None:
            raise ValueError(f"ep_group: the experts are already sharded over {self.ep.size} ranks")
        if not isinstance(pad, bool):
            raise TypeError(f"ep_pad: expected a bool, got {type(pad).__name__}")
        ep = parallel.resolve(ep_group)
        parallel.shard_experts(self.experts, ep)
        self.ep, self.ep_pad = ep, pad

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds (all of them without expert parallelism)."""
        if self.ep is None:
            return range(self.num_experts)
        n = self.experts.num_experts
        return range(self.ep.rank * n, (self.ep.rank + 1) * n)

    @property
    def w1_EFD(self) -> nn.Parameter:
        """``experts.w1_EFD`` (E, F, D), the gate projections."""
        return self.experts.w1_EFD

    @property
    def w3_EFD(self) -> nn.Parameter | None:
        """``experts.w3_EFD`` (E, F, D), the up projections (gated activations only)."""
        return self.experts.w3_EFD

    @property
    def w2_EDF(self) -> nn.Parameter:
        """``experts.w2_EDF`` (E, D, F), the down projections."""
        return self.experts.w2_EDF

    @property
    def device(self) -> torch.device:
        return self.experts.w1_EFD.device

    @property
    def follows_shared_router(self) -> bool:
        """True for a layer that reuses another layer's decisions (``share_router``)."""
        return self.router.follows is not None

    def reference_groups(self) -> list[list[int]]:
        """The expert group of each domain (the reference router): domain d owns experts
        ``[d*E/G, (d+1)*E/G)``. Raises ValueError for other routers."""
        return self.router.reference_groups()

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

    def _check_devices(self, x, labels_T, token_ids_T) -> None:
        """ValueError naming the argument on another device than the layer's parameters."""
        dev = self.device
        for name, t in (("x", x), ("labels", labels_T), ("token_ids", token_ids_T)):
            if t is not None and t.device != dev:
                raise ValueError(
                    f"{name}: expected a tensor on {dev} (the device of the layer's "
                    f"parameters), got {t.device}"
                )

    def _plan(self, dec: RouterDecision, T: int) -> RoutingPlan:
        """The routing plan of ``dec`` under the router's capacity rule (T tokens)."""
        cfg = self.config
        return self.router.plan(dec, cfg.capacity_factor, cfg.drop, backend=self.backend)

    def _losses(self, x: torch.Tensor, dec: RouterDecision, sel_TK, counts_E) -> torch.Tensor:
        cfg = self.config
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        if self.follows_shared_router or dec.logits_TE is None:
            return loss
        if cfg.balance == "aux":
            p = bal.balance_scores(dec.scores_TE, cfg.score)
            S = x.shape[-2] if x.dim() >= 3 else p.shape[0]  # tokens per sequence
            state, training = self.balance_state, self.training
            l_aux = bal.scoped_aux_loss(
                p, sel_TK, counts_E, cfg.scope, seq_len=S, state=state, training=training
            )
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
            x: (..., D) activations ((B, S, D) for the sequence router).
            labels: integer domain labels shaped like ``x[..., 0]``, -1 = padding (required by
                the reference router; used by statistics).
            token_ids: integer token ids shaped like ``x[..., 0]`` (required by the hash router).

        Raises ValueError naming ``x``, ``labels`` or ``token_ids`` for missing or misshapen input,
        input on another device than the parameters, and (on CPU) NaN or inf router logits.
        """
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) else None
        labels_T = self._flat("labels", labels, lead) if lead is not None else None
        token_ids_T = self._flat("token_ids", token_ids, lead) if lead is not None else None
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (..., {self.d_model}), got {shape}")
        self._check_devices(x, labels_T, token_ids_T)
        if not self.follows_shared_router:  # a follower needs nothing of its own
            self.router.check_inputs(x, labels_T, token_ids_T)
        cfg = self.config
        x_TD = x.reshape(-1, self.d_model)
        try:
            dec = self.router(
                x,
                labels_T=labels_T,
                token_ids_T=token_ids_T,
                bias_E=self.bias_E,
                backend=self.backend,
            )
        except ValueError as e:  # name the layer's argument, not the op's internal one
            if not str(e).startswith(NON_FINITE_LOGITS):
                raise
            raise ValueError(
                str(e).replace("logits_TE:", "x:", 1) + " (its router logits are not finite)"
            ) from e
        if cfg.balance in bal.SELECTING and self.training and not self.follows_shared_router:
            S = x.shape[-2] if x.dim() >= 3 else x_TD.shape[0]  # tokens per sequence
            kw = dict(seq_len=S, iters=cfg.sinkhorn_iters, normalize=cfg.normalize)
            dec = bal.balanced_decision(dec, cfg.balance, self.top_k, cfg.scope, **kw)
            if self.router.publishes is not None:  # followers reuse the balanced selection
                self.router.publishes.decision = dec
        plan = self._plan(dec, x_TD.shape[0])
        if self.ep is None:
            out = self.experts(x_TD, plan, dec.weights_TK)
        else:
            T = dec.experts_TK.shape[0]
            cap, _ = self.router.capacity(T, cfg.capacity_factor, cfg.drop)
            out = parallel.routed_experts(
                self.experts, x_TD, plan, dec.weights_TK, self.ep, capacity=cap, pad=self.ep_pad
            )
        if self.shared is not None:
            out = out + self.shared(x_TD).to(out.dtype)
        sel_TK, kept_TK, counts_E = self.router.selection(dec, plan)
        self.aux_loss = self._losses(x, dec, sel_TK, counts_E)
        if self.bias_E is not None and self.training and not self.follows_shared_router:
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
        if self.bias_E is not None and not self.follows_shared_router:
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
            + (f", expert_parallel={self.ep.size}" if self.ep is not None else "")
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

    The owner's router publishes each decision into a ``moe_kernels.routers.SharedDecision``
    that the later routers read (a plain holder, not a submodule of anyone).

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
    shared = owner.router.publish()
    for m in layers[1:]:
        m.router.follow(shared)
    return owner
