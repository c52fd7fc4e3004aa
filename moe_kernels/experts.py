"""Routed experts: dispatch -> grouped_mm -> activation -> grouped_mm -> combine.

Legend: T tokens, D d_model, F expert hidden dim, E experts, K top-k, N plan rows.

Weights are stacked per expert in Hugging Face layouts (``nn.Linear.weight`` is (out, in)):

- ``layout="split"`` (``GroupedExperts(...)``, :meth:`GroupedExperts.from_weights`; the ``MoE``
  layer): ``w1_EFD`` (E, F, D) gate projection (Mixtral ``w1``, Qwen ``gate_proj``), ``w3_EFD``
  (E, F, D) up projection (Mixtral ``w3``, Qwen ``up_proj``; gated activations only),
  ``w2_EDF`` (E, D, F) down projection (Mixtral ``w2``, Qwen ``down_proj``), so converting a
  per-expert checkpoint is a ``torch.stack``; optional biases ``b1_EF``, ``b3_EF`` (E, F) and
  ``b2_ED`` (E, D), added per row.
- ``layout="fused"`` (:meth:`GroupedExperts.from_fused`; HF transformers >= 5):
  ``gate_up_proj`` (E, 2F, D), whose first F rows per expert are ``w1`` and last F ``w3``, and
  ``down_proj`` (E, D, F) = ``w2``, kept under HF's names so state dicts keep HF's keys; the
  first GEMM is one GEMM of width 2F.

``grouped_mm`` takes (E, in, out) weights, so the forward passes transposed views
(``w1_EFD.transpose(1, 2)`` is (E, D, F)); no copy is made. Under autocast the experts run in
the autocast dtype (inputs and weights cast to it); otherwise in the dtype of ``x_TD``.

The fused gather (``gather=``): the first GEMM(s) read their rows straight from ``x_TD``
through ``moe_kernels.triton.gather_grouped_mm``, so the dispatched copy of the activations is
never written. Backward: dx = the row gradients ``grouped_mm(dy, w^T)`` scatter-added back to
their tokens (``combine`` with unit weights), dw = ``gather_grouped_mm_dw``. ``"auto"`` turns it
on when the Triton backend is forced (``backend="triton"``); automatic backend selection keeps
the unfused path. ``True``: always (ValueError where the Triton kernels cannot run); ``False``:
never. Both paths compute the same function, forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.activations import ACTIVATIONS
from moe_kernels.ops import RoutingPlan, combine, dispatch, grouped_mm

GATHER = ("auto", True, False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts run in: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def init_uniform(*shape: int, fan_in: int) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default range, so an expert initialised
    here matches a freshly built Linear."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(*shape).uniform_(-bound, bound)


def _as_param(name: str, t: torch.Tensor | None, shape: tuple) -> nn.Parameter | None:
    """``t`` itself when it is a Parameter (shared, not copied), else a Parameter on its storage."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t)


class _GatherGroupedMM(torch.autograd.Function):
    """``grouped_mm(dispatch(x_TD, plan), w_EDF, plan.offsets_E1)`` for each of ``w_EDFs``
    without the dispatched copy. Backward follows the ops' rule (the adjoint ops pick their
    backends automatically; the weight gradient stays on the forward's kernels): the rows' input
    gradients of every weight are summed, then scattered back onto their tokens once (``combine``
    with unit weights, which is what dispatch's backward does); dw = ``gather_grouped_mm_dw``."""

    @staticmethod
    def forward(ctx, x_TD, plan, *w_EDFs):
        import moe_kernels.triton as mkt

        ctx.save_for_backward(x_TD, *w_EDFs)
        ctx.plan = plan
        off, rows = plan.offsets_E1, plan.row_token_N
        return tuple(mkt.gather_grouped_mm(x_TD, w, off, rows) for w in w_EDFs)

    @staticmethod
    def backward(ctx, *dy_NFs):
        import moe_kernels.triton as mkt

        x_TD, *w_EDFs = ctx.saved_tensors
        plan = ctx.plan
        dy_NFs = [dy.contiguous() for dy in dy_NFs]
        dx = None
        if ctx.needs_input_grad[0]:
            dx_ND = sum(
                grouped_mm(dy, w.transpose(1, 2), plan.offsets_E1) for dy, w in zip(dy_NFs, w_EDFs)
            )
            dx = combine(dx_ND.contiguous(), None, plan)
        dws = [
            mkt.gather_grouped_mm_dw(x_TD, dy, plan.offsets_E1, plan.row_token_N)
            if ctx.needs_input_grad[2 + i]
            else None
            for i, dy in enumerate(dy_NFs)
        ]
        return (dx, None, *dws)


def _row_experts(plan: RoutingPlan) -> torch.Tensor:
    """Expert of every plan row (N,) int64, from the offsets alone (no host sync); padding rows
    past ``offsets_E1[E]`` get expert E - 1 (combine never reads them)."""
    rows_N = torch.arange(plan.num_rows, device=plan.offsets_E1.device)
    e_N = torch.searchsorted(plan.offsets_E1[1:].long(), rows_N, right=True)
    return e_N.clamp_max(plan.num_experts - 1)


class GroupedExperts(nn.Module):
    """E experts of hidden size F on model width D, run on routed token rows.

    Args:
        num_experts, d_model, d_ff: E, D, F.
        activation: a name of ``moe_kernels.activations.ACTIVATIONS``, or a callable (then say
            whether it is ``gated``: ``act(x w1) * (x w3)``).
        bias: per-expert biases b1/b3 (E, F) and b2 (E, D), zero-initialised.
        gather: the fused-gather switch, ``"auto"``, True or False (module docstring).
        backend: force an op backend (``"cpu"``, ``"triton"``, ...) for every op.
    Weights start as ``nn.Linear`` would (uniform in +-1/sqrt(fan_in)). To wrap existing tensors
    without copying them use :meth:`from_weights` or :meth:`from_fused`.

    Raises ValueError naming the argument for unknown activations, gather values or bad sizes.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "swiglu",
        *,
        gated: bool | None = None,
        bias: bool = False,
        gather: str | bool = "auto",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        E, D, Fh = num_experts, d_model, d_ff
        self._setup(E, D, Fh, activation, gated, gather, backend, layout="split")
        self.w1_EFD = nn.Parameter(init_uniform(E, Fh, D, fan_in=D))
        self.w3_EFD = nn.Parameter(init_uniform(E, Fh, D, fan_in=D)) if self.gated else None
        self.w2_EDF = nn.Parameter(init_uniform(E, D, Fh, fan_in=Fh))
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape)) if bias else None
        self.b1_EF, self.b2_ED = zeros(E, Fh), zeros(E, D)
        self.b3_EF = zeros(E, Fh) if self.gated else None

    def _setup(self, E, D, Fh, activation, gated, gather, backend, layout) -> None:
        if callable(activation):
            if gated is None:
                raise ValueError(
                    "gated: expected True or False for a callable activation, got None"
                )
            self.act, self.gated = activation, bool(gated)
        elif activation in ACTIVATIONS:
            self.act, self.gated = ACTIVATIONS[activation]
            if gated is not None and gated != self.gated:
                raise ValueError(
                    f"gated: activation {activation!r} has gated={self.gated}, got {gated}"
                )
        else:
            raise ValueError(
                f"activation: expected one of {tuple(ACTIVATIONS)} or a callable, "
                f"got {activation!r}"
            )
        if not (isinstance(gather, bool) or gather == "auto"):
            raise ValueError(f"gather: expected one of {GATHER}, got {gather!r}")
        self.num_experts, self.d_model, self.d_ff = E, D, Fh
        self.activation = activation if isinstance(activation, str) else "custom"
        self.gather, self.backend, self.layout = gather, backend, layout

    @classmethod
    def from_weights(
        cls,
        w1_EFD: torch.Tensor,
        w2_EDF: torch.Tensor,
        w3_EFD: torch.Tensor | None = None,
        *,
        b1_EF: torch.Tensor | None = None,
        b3_EF: torch.Tensor | None = None,
        b2_ED: torch.Tensor | None = None,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "swiglu",
        gated: bool | None = None,
        gather: str | bool = "auto",
        backend: str | None = None,
    ) -> GroupedExperts:
        """Experts on existing split-layout tensors: Parameters are registered as they are
        (shared with their owner), other tensors wrapped as Parameters on the same storage.
        ``w3_EFD`` (and ``b3_EF``) is required exactly when the activation is gated."""
        E, Fh, D = w1_EFD.shape
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(E, D, Fh, activation, gated, gather, backend, layout="split")
        if (w3_EFD is None) == self.gated:
            raise ValueError(
                f"w3_EFD: expected {'a (E, F, D) tensor' if self.gated else 'None'} for "
                f"activation {self.activation!r}, got {type(w3_EFD).__name__}"
            )
        self.w1_EFD = _as_param("w1_EFD", w1_EFD, (E, Fh, D))
        self.w3_EFD = _as_param("w3_EFD", w3_EFD, (E, Fh, D))
        self.w2_EDF = _as_param("w2_EDF", w2_EDF, (E, D, Fh))
        self.b1_EF = _as_param("b1_EF", b1_EF, (E, Fh))
        self.b3_EF = _as_param("b3_EF", b3_EF, (E, Fh))
        self.b2_ED = _as_param("b2_ED", b2_ED, (E, D))
        return self

    @classmethod
    def from_fused(
        cls,
        gate_up_EFD2: torch.Tensor,
        down_EDF: torch.Tensor,
        act: str | Callable[[torch.Tensor], torch.Tensor],
        *,
        gather: str | bool = "auto",
        backend: str | None = None,
    ) -> GroupedExperts:
        """Gated experts on HF's fused tensors ``gate_up_proj`` (E, 2F, D) and ``down_proj``
        (E, D, F), registered under those names and shared, not copied. ``act`` is the gate
        activation (HF ``act_fn``, or ``"swiglu"``/``"geglu"``)."""
        E, F2, D = gate_up_EFD2.shape
        if F2 % 2:
            raise ValueError(
                f"gate_up_EFD2: expected shape (E, 2F, D), got {tuple(gate_up_EFD2.shape)}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(E, D, F2 // 2, act, True, gather, backend, layout="fused")
        if not self.gated:
            raise ValueError(f"act: expected a gated activation for gate_up_proj, got {act!r}")
        self.gate_up_proj = _as_param("gate_up_EFD2", gate_up_EFD2, (E, F2, D))
        self.down_proj = _as_param("down_EDF", down_EDF, (E, D, F2 // 2))
        self.b1_EF = self.b3_EF = self.b2_ED = None
        return self

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w1_EFD, w3_EFD or None, w2_EDF) in either layout (views of the fused tensors)."""
        if self.layout == "fused":
            w1, w3 = self.gate_up_proj.chunk(2, dim=1)
            return w1, w3, self.down_proj
        return self.w1_EFD, self.w3_EFD, self.w2_EDF

    def use_gather(self) -> bool:
        """Whether the first GEMM(s) gather their rows from the tokens (module docstring)."""
        return self.gather is True or (self.gather == "auto" and self.backend == "triton")

    def forward(
        self, x_TD: torch.Tensor, plan: RoutingPlan, weights_TK: torch.Tensor | None
    ) -> torch.Tensor:
        """Expert output per token, (T, D) in the compute dtype (module docstring).

        Args:
            x_TD: (T, D) token rows (fp32/bf16/fp16).
            plan: the ``RoutingPlan`` of the routing decision (``moe_kernels.route``).
            weights_TK: (T, K) gate weights (fp32, or any float dtype), None = unit weights.
        A dropped (token, slot) adds nothing, so a fully dropped token's output is 0.
        Raises TypeError/ValueError naming the argument (from the ops) for bad shapes or dtypes.
        """
        if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or x_TD.shape[1] != self.d_model:
            shape = tuple(x_TD.shape) if isinstance(x_TD, torch.Tensor) else type(x_TD).__name__
            raise ValueError(f"x_TD: expected shape (T, {self.d_model}), got {shape}")
        dt, b = compute_dtype(x_TD), self.backend
        x_TD = x_TD.to(dt)
        off = plan.offsets_E1
        biased = any(t is not None for t in (self.b1_EF, self.b3_EF, self.b2_ED))
        row_expert_N = _row_experts(plan) if biased else None
        bias = lambda h, b_EX: h if b_EX is None else h + b_EX.to(dt)[row_expert_N]
        if self.layout == "fused":
            first = [self.gate_up_proj]
        else:
            first = [w for w in (self.w1_EFD, self.w3_EFD) if w is not None]
        first = [w.to(dt).transpose(1, 2) for w in first]  # (E, D, F) views
        if self.use_gather():
            hs = _GatherGroupedMM.apply(x_TD, plan, *first)
        else:
            x_ND = dispatch(x_TD.contiguous(), plan, backend=b)
            hs = [grouped_mm(x_ND, w, off, backend=b) for w in first]
        if self.layout == "fused":
            gate, up = hs[0].chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(bias(hs[0], self.b1_EF))
            if len(hs) > 1:
                h = h * bias(hs[1], self.b3_EF)
        w2_EDF = self.weights()[2]
        y_ND = grouped_mm(h.contiguous(), w2_EDF.to(dt).transpose(1, 2), off, backend=b)
        return combine(bias(y_ND, self.b2_ED).contiguous(), weights_TK, plan, backend=b)

    def extra_repr(self) -> str:
        return (
            f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, "
            f"activation={self.activation}, layout={self.layout}, gather={self.gather}"
        )


class SharedExperts(nn.Module):
    """``n`` always-on experts of hidden size F, kept as one dense FFN of hidden size n * F (the
    sum of n unit-weight experts is the same function).

    Weights w1_FD/w3_FD (nF, D), w2_DF (D, nF); ``forward(x_TD) -> (T, D)``."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.act, gated = ACTIVATIONS[activation]
        self.w1_FD = nn.Parameter(init_uniform(d_hidden, d_model, fan_in=d_model))
        self.w3_FD = (
            nn.Parameter(init_uniform(d_hidden, d_model, fan_in=d_model)) if gated else None
        )
        self.w2_DF = nn.Parameter(init_uniform(d_model, d_hidden, fan_in=d_hidden))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x_TD, self.w1_FD))
        if self.w3_FD is not None:
            h = h * F.linear(x_TD, self.w3_FD)
        return F.linear(h, self.w2_DF)
