"""``MoEConfig``: every routing, balancing and capacity choice of one ``MoE`` layer.

The definitions behind each value are in ``docs/ROUTING.md``. Each field carries its own
documentation in ``dataclasses.field(metadata=...)``:

- ``help``: one line for users (command-line help, generated docs);
- ``choices``: the allowed values of a categorical field (a tuple), absent for numbers.

Programs that expose the config (the testbed's command line, sweeps) read these instead of
repeating them, so a new field or a new router kind shows up everywhere at once.

Invalid values raise ``ValueError`` naming the field, the expected and the actual value, at
construction and from :meth:`MoEConfig.validate` (call it after changing fields in place). Rules
that belong to one router kind (the reference router's domain groups, which kinds the aux-free
bias can steer) are the router class's ``check_config`` (``moe_kernels.routers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from moe_kernels import balancing as bal
from moe_kernels.activations import ACTIVATIONS
from moe_kernels.ops import DROPS, SCORES
from moe_kernels.routers import ROUTER_CLASSES, ROUTERS


def _field(default, help: str, choices: tuple | None = None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class MoEConfig:
    """Routing, balancing and capacity of one ``MoE`` layer (see ``docs/ROUTING.md``)."""

    router: str = _field("learned", "router kind: what decides each token's experts", ROUTERS)
    score: str = _field("softmax", "router score function s_t = score(logits)", SCORES)
    top_k: int = _field(2, "experts per token (k)")
    num_experts: int = _field(8, "routed experts (E)")
    normalize: bool = _field(True, "renormalise the k selected scores to sum to 1")
    jitter: float = _field(0.0, "multiplicative router-input noise U(1-j, 1+j) in training")
    balance: str = _field("aux", "load-balancing method", bal.BALANCES)
    scope: str = _field(
        "micro_batch",
        "token set the balance is computed over (aux-free: feedback window)",
        bal.SCOPES,
    )
    aux_coef: float = _field(0.01, "weight of the Switch load-balancing loss (lambda)")
    z_coef: float = _field(1e-3, "weight of the router z-loss (0 = off)")
    bias_rate: float = _field(1e-3, "aux-free bias step u per feedback window")
    bias_rule: str = _field("sign", "aux-free bias update rule", bal.BIAS_RULES)
    sinkhorn_iters: int = _field(10, "Sinkhorn normalisation rounds (balance='sinkhorn')")
    capacity_factor: float | None = _field(
        None, "expert capacity ceil(cf * T * k / E) per micro-batch; None = dropless"
    )
    drop: str = _field("position", "which assignments go first beyond capacity", DROPS)
    num_groups: int | None = _field(
        None, "domains G of the reference router (E % G == 0); the trainer sets it"
    )
    shared_experts: int = _field(0, "always-on experts beside the routed ones")
    activation: str = _field("swiglu", "expert activation", tuple(ACTIVATIONS))
    expert_bias: bool = _field(False, "per-expert biases b1/b3 (E, F) and b2 (E, D)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ValueError naming the first invalid one."""
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(
                    f"{f.name}: expected one of {allowed}, got {getattr(self, f.name)!r}"
                )
        E, k = self.num_experts, self.top_k
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {E!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
            raise ValueError(
                f"top_k: expected an int with 1 <= top_k <= num_experts = {E}, got {k!r}"
            )
        for name in ("jitter", "aux_coef", "z_coef", "bias_rate"):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float))
            if bad or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.jitter >= 1:
            raise ValueError(f"jitter: expected a value in [0, 1), got {self.jitter!r}")
        cf = self.capacity_factor
        if cf is not None and (
            isinstance(cf, bool)
            or not isinstance(cf, (int, float))
            or not cf > 0
            or not math.isfinite(cf)
        ):
            raise ValueError(
                f"capacity_factor: expected None (dropless) or a number > 0, got {cf!r}"
            )
        n = self.shared_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"shared_experts: expected an int >= 0, got {n!r}")
        it = self.sinkhorn_iters
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"sinkhorn_iters: expected an int >= 1, got {it!r}")
        if self.balance in bal.SELECTING:
            if self.scope not in bal.SELECTING_SCOPES:
                raise ValueError(
                    f"scope: balance={self.balance!r} selects over the scope's tokens within one "
                    f"forward pass, so it is defined at {bal.SELECTING_SCOPES}, got {self.scope!r}"
                )
            if self.router not in bal.SELECTING_ROUTERS:
                raise ValueError(
                    f"router: balance={self.balance!r} replaces a learned top-k selection; "
                    f"expected one of {bal.SELECTING_ROUTERS}, got {self.router!r}"
                )
        ROUTER_CLASSES[self.router].check_config(self)  # the router kind's own rules
