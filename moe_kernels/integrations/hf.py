"""Hugging Face ``transformers`` integration: upcycle dense MLPs, run sparse MoE blocks on our ops.

Legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k.

- :func:`upcycle` replaces the dense MLPs of GPT-2 (``c_fc``/``c_proj``) and Llama-family models
  (``gate_proj``/``up_proj``/``down_proj``) with :class:`UpcycledMLP` modules wrapping a
  ``moe_kernels.MoE`` whose experts all start as the dense weights (plus optional noise). With
  ``noise=0`` and renormalised gates the model computes exactly what it computed before.
- :func:`convert_sparse_moe` replaces the sparse MoE blocks of Mixtral, Qwen2-MoE, Qwen3-MoE,
  OLMoE, DeepSeek-V2, DeepSeek-V3 and GLM-4-MoE with :class:`SparseMoEBlock`, which routes with
  the block's own ``gate`` through the family's rule (``moe_kernels.integrations.hf_routing``:
  ``topk_gating`` selection, grouped top-k, sigmoid scores with the correction bias, routed
  scaling factor) and ``route`` (dropless), and runs the experts as a
  ``moe_kernels.experts.GroupedExperts`` on the block's own parameters (shared, not copied, for
  the fused ``gate_up_proj`` (E, 2F, D) / ``down_proj`` (E, D, F) layout of transformers >= 5;
  stacked copies for the per-expert ``nn.ModuleList`` layout of 4.x) plus the block's shared
  experts, gives the same outputs, and can capture the routing (``capture=True``) and feed
  ``moe_kernels.stats``. Other families are refused with an error naming the supported ones.

Nothing here imports ``transformers``: modules are recognised by their structure, so the same
code serves every version that keeps these attribute names.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.experts import GroupedExperts
from moe_kernels.integrations.hf_routing import (
    BLOCK_RULES,
    RULE_SCORE,
    RULES,
    SUPPORTED_MODEL_TYPES,
    block_rule,
)
from moe_kernels.layer import MoE
from moe_kernels.routers import RouterDecision, plan_decision

# ---- upcycling -------------------------------------------------------------------------------


class UpcycledMLP(nn.Module):
    """A dense MLP's replacement: ``dropout(moe(x, labels=..., token_ids=...))``.

    ``labels`` / ``token_ids`` (for ``reference`` / ``hash`` routers and statistics) cannot pass
    through an HF forward; set them with :func:`set_routing_inputs` before the forward.
    """

    def __init__(self, moe: MoE, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.labels: torch.Tensor | None = None
        self.token_ids: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.moe(hidden_states, labels=self.labels, token_ids=self.token_ids)
        return self.dropout(y) if self.dropout is not None else y


_PROBE = torch.linspace(-6, 6, 241)
_ACTS = {
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_GATED = {"silu": "swiglu", "gelu": "geglu"}


def _activation_name(act, gated: bool) -> str:
    """Name of the MoE activation equal to the module's ``act`` (found by evaluating it)."""
    with torch.no_grad():
        out = act(_PROBE)
        for name, fn in _ACTS.items():
            if torch.allclose(out, fn(_PROBE), atol=1e-6, rtol=1e-5):
                if not gated:
                    return name
                if name in _GATED:
                    return _GATED[name]
    raise ValueError(f"model: MLP activation {act!r} has no moe_kernels equivalent (gated={gated})")


def _dense_weights(mlp: nn.Module) -> dict | None:
    """(w1 (F, D), w3 (F, D) or None, w2 (D, F), biases or None, activation) of a dense MLP, or
    None when ``mlp`` is not a GPT-2 or Llama-style MLP."""
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2: Conv1D weights are (in, out)
        return dict(
            w1=mlp.c_fc.weight.t(),
            w3=None,
            w2=mlp.c_proj.weight.t(),
            b1=mlp.c_fc.bias,
            b3=None,
            b2=mlp.c_proj.bias,
            activation=_activation_name(mlp.act, gated=False),
            dropout=getattr(mlp, "dropout", None),
        )
    if all(
        isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        return dict(
            w1=mlp.gate_proj.weight,
            w3=mlp.up_proj.weight,
            w2=mlp.down_proj.weight,
            b1=mlp.gate_proj.bias,
            b3=mlp.up_proj.bias,
            b2=mlp.down_proj.bias,
            activation=_activation_name(mlp.act_fn, gated=True),
            dropout=None,
        )
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    **moe_kwargs,
) -> list[str]:
    """Replace every dense MLP of a GPT-2 or Llama-family ``model`` with an MoE of copies of it.

    Each expert gets the dense weights plus ``noise * std(W) * N(0, 1)`` (``noise=0``: exact
    copies, so with ``normalize=True`` (default) the model's outputs are unchanged until the
    experts diverge in training). The router is freshly initialised; ``moe_kwargs`` are
    ``MoE``/``MoEConfig`` options (router, balance, capacity_factor, ...).

    Returns the names of the replaced modules. Raises ValueError when no MLP is recognised.
    """
    found = [(n, m, w) for n, m in model.named_modules() if (w := _dense_weights(m)) is not None]
    if not found:
        raise ValueError(
            "model: found no GPT-2 (c_fc/c_proj) or Llama-style (gate/up/down_proj) MLP"
        )
    for name, _, w in found:
        Fh, D = w["w1"].shape
        moe = MoE(
            D,
            Fh,
            num_experts,
            top_k,
            activation=w["activation"],
            expert_bias=w["b1"] is not None or w["b2"] is not None,
            **moe_kwargs,
        )
        ref = w["w1"]
        moe.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            ex = moe.experts
            pairs = [
                (ex.w1_EFD, w["w1"]),
                (ex.w3_EFD, w["w3"]),
                (ex.w2_EDF, w["w2"]),
                (ex.b1_EF, w["b1"]),
                (ex.b3_EF, w["b3"]),
                (ex.b2_ED, w["b2"]),
            ]
            for dst, src in pairs:
                if dst is None:
                    continue
                if src is None:
                    dst.zero_()
                    continue
                dst.copy_(src.detach().unsqueeze(0).expand_as(dst))
                if noise > 0 and src.numel() > 1:
                    eps = torch.randn(dst.shape, generator=generator).to(dst)
                    dst.add_(noise * src.detach().float().std().to(dst.dtype) * eps)
        _replace(model, name, UpcycledMLP(moe, w["dropout"]))
    return [n for n, _, _ in found]


# ---- sparse MoE blocks -----------------------------------------------------------------------


class RoutingCapture(NamedTuple):
    """One forward's routing of a converted block: experts_TK int32, weights_TK fp32,
    logits_TE fp32 (all detached)."""

    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor


def _grouped_experts(experts: nn.Module, backend: str | None) -> GroupedExperts:
    """The block's experts as GroupedExperts: transformers >= 5's fused tensors shared as they
    are; a 4.x per-expert ``nn.ModuleList`` stacked into that layout (a copy).

    Raises ValueError for an experts module with parameters the fused layout does not hold
    (expert biases), which would otherwise be silently ignored."""
    if isinstance(experts, nn.ModuleList):
        e0 = experts[0]
        names = ("w1", "w3", "w2") if hasattr(e0, "w1") else ("gate_proj", "up_proj", "down_proj")
        g, u, d = ([getattr(e, n).weight.detach() for e in experts] for n in names)
        gate_up = nn.Parameter(torch.cat([torch.stack(g), torch.stack(u)], 1))
        return GroupedExperts.from_fused(
            gate_up, nn.Parameter(torch.stack(d)), e0.act_fn, backend=backend
        )
    extra = sorted({n for n, _ in experts.named_parameters()} - {"gate_up_proj", "down_proj"})
    if extra:
        raise ValueError(
            f"model: expert parameters {extra} are not supported (expected gate_up_proj and "
            "down_proj only)"
        )
    return GroupedExperts.from_fused(
        experts.gate_up_proj, experts.down_proj, experts.act_fn, backend=backend
    )


class SparseMoEBlock(nn.Module):
    """An HF sparse MoE block run on moe_kernels: the block's own ``gate`` gives the router
    logits, the family's rule (``hf_routing.RULES``) the decision, ``plan_decision`` the plan,
    and the experts run as a ``GroupedExperts`` (``self.experts``, HF's ``gate_up_proj`` /
    ``down_proj`` names and keys).

    Keeps the block's ``gate`` (so HF's router-logit recording still sees it) and its shared
    experts under their HF names: Qwen2-MoE's ``shared_expert`` (gated by
    ``sigmoid(shared_expert_gate(x))``), DeepSeek's and GLM's ``shared_experts`` (ungated).
    Returns what the original block returned: the hidden states (transformers >= 5) or
    ``(hidden, router_logits)`` (4.x). With ``capture=True`` every forward appends a
    :class:`RoutingCapture` to ``self.captured``; ``moe_kernels.stats.enable`` works on models
    holding these blocks (labels via :func:`set_routing_inputs`).

    Raises ValueError for a block of an unsupported family (the message lists the supported
    block classes).
    """

    _records_routing = True

    def __init__(
        self, block: nn.Module, *, capture: bool = False, backend: str | None = None
    ) -> None:
        super().__init__()
        rule = block_rule(block)
        if rule is None:
            raise ValueError(
                f"block: {type(block).__name__} is not a supported sparse MoE block; supported: "
                f"{sorted(BLOCK_RULES)}"
            )
        self.rule, self.score = rule, RULE_SCORE[rule]
        self.gate = block.gate
        self.legacy = isinstance(block.gate, nn.Linear)  # transformers 4.x: gate is a Linear
        self.experts = _grouped_experts(block.experts, backend)
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.shared_experts = getattr(block, "shared_experts", None)
        owner = block if self.legacy else block.gate
        self.top_k = int(owner.top_k)
        self.normalize = bool(getattr(owner, "norm_topk_prob", True))  # Mixtral always renormalises
        self.jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.num_experts = self.experts.num_experts
        self.backend, self.capture = backend, capture
        self.captured: list[RoutingCapture] = []
        self.labels: torch.Tensor | None = None
        self.bias_E = None
        self._stats = None

    @property
    def device(self) -> torch.device:
        return self.experts.gate_up_proj.device

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        if self.training and self.jitter > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter, 1.0 + self.jitter
            )
        x_TD = hidden_states.reshape(-1, shape[-1]).contiguous()
        logits = self.gate(x_TD)
        logits = logits if self.legacy else logits[0]
        # The family's router in fp32 (hf_routing), dropless like every HF block.
        dec = RULES[self.rule](self.gate, logits.float(), self.top_k, self.normalize, self.backend)
        plan = plan_decision(dec, self.num_experts, backend=self.backend)
        out = self.experts(x_TD, plan, dec.weights_TK.to(x_TD.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        self._record(dec)
        out = out.reshape(shape)
        return (out, logits) if self.legacy else out

    def _record(self, dec: RouterDecision) -> None:
        if self.capture:
            self.captured.append(
                RoutingCapture(
                    dec.experts_TK.detach(), dec.weights_TK.detach(), dec.logits_TE.detach()
                )
            )
        if self._stats is not None:
            labels = self.labels.reshape(-1) if self.labels is not None else None
            e = dec.experts_TK
            self._stats.record(e, e, dec.weights_TK, dec.scores_TE, self.score, labels)


def convert_sparse_moe(
    model: nn.Module, *, capture: bool = False, backend: str | None = None
) -> list[str]:
    """Replace every supported sparse MoE block of ``model`` with a :class:`SparseMoEBlock`
    (same outputs; blocks already converted are left as they are).

    Returns the names of the converted blocks. Raises ValueError when there are none, naming
    the supported block classes.
    """
    found = [n for n, m in model.named_modules() if block_rule(m) is not None]
    if not found:
        raise ValueError(
            f"model: found no supported sparse MoE block; supported: {sorted(BLOCK_RULES)} "
            f"(families {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for name in found:
        _replace(
            model, name, SparseMoEBlock(model.get_submodule(name), capture=capture, backend=backend)
        )
    return found


def set_routing_inputs(
    model: nn.Module, labels: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
) -> None:
    """Labels (domains, shaped like the input ids) and token ids for the next forwards of every
    upcycled MLP / converted block in ``model`` (routers and statistics that need them)."""
    for m in model.modules():
        if isinstance(m, (UpcycledMLP, SparseMoEBlock)):
            m.labels = labels
        if isinstance(m, UpcycledMLP):
            m.token_ids = token_ids


def captured_routing(model: nn.Module, clear: bool = True) -> list[list[RoutingCapture]]:
    """The captures of every converted block (module order), one list of forwards per block."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
    out = [list(b.captured) for b in blocks]
    if clear:
        for b in blocks:
            b.captured.clear()
    return out
