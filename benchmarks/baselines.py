"""SwiGLU expert-layer implementations timed by ``benchmarks.layer_gpu``, and the plain-torch
reference every one of them is checked against before it is timed.

The layer (gating excluded): given the layer input ``x_TD`` and a routing decision (fp32 gate
weights ``weights_TK``, int32 expert ids ``experts_TK``), compute

    out[t] = sum_k weights[t, k] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),  e = experts[t, k]

with the weights in the ``moe_kernels.MoE`` layout: ``w1_EFD``, ``w3_EFD`` (E, F, D) and
``w2_EDF`` (E, D, F). Everything after the decision is timed: building the row layout
(sort / route), gathering, the three GEMMs, SwiGLU, the weighted scatter back to tokens, and in
backward the gradients of x, the gate weights and the three expert weights. The router
projection and top-k gating are not (they are identical for every implementation and timed on
their own by ``benchmarks.ops_gpu``).

Implementations:

- ``moe_kernels[<backend>]``: ``route`` -> ``moe_kernels.GroupedExperts`` (the module the
  ``MoE`` layer runs; tests check they agree) on the problem's own weight tensors, backends
  forced by name or "auto"; the fused gather (first GEMMs reading token rows) per its
  ``gather`` switch;
- ``naive``: per expert, ``torch.where`` the (token, slot) pairs, three ``F.linear``, scale,
  ``index_add``;
- ``torch_grouped_mm``: the composition used by torch-native trainers: stable argsort of the
  expert ids, ``histc`` counts, gather, ``torch._grouped_mm`` x3, scale in fp32, ``scatter_add``;
- ``megablocks`` / ``scattermoe``: those libraries' expert layers driven with the same decision
  and weights, only when they import (they are never installed by the harness).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moe_kernels as mk
from benchmarks.gpu_harness import Case, make_routing


class Unavailable(Exception):
    """The implementation cannot run here; the message is the table's status."""


@dataclass
class LayerProblem:
    """Inputs of one layer call. Leaves that receive gradients: x_TD, weights_TK, w1/w3/w2."""

    x_TD: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    w1_EFD: torch.Tensor
    w3_EFD: torch.Tensor
    w2_EDF: torch.Tensor
    dy_TD: torch.Tensor  # the gradient fed to backward (random, so permutation bugs show)

    @property
    def T(self):
        return self.x_TD.shape[0]

    @property
    def D(self):
        return self.x_TD.shape[1]

    @property
    def E(self):
        return self.w1_EFD.shape[0]

    @property
    def F(self):
        return self.w1_EFD.shape[1]

    @property
    def k(self):
        return self.experts_TK.shape[1]

    @property
    def dtype(self):
        return self.x_TD.dtype

    def leaves(self) -> list[torch.Tensor]:
        return [self.x_TD, self.weights_TK, self.w1_EFD, self.w3_EFD, self.w2_EDF]

    def inputs(self) -> list[torch.Tensor]:
        return self.leaves() + [self.experts_TK]


GRAD_NAMES = ("x_TD", "weights_TK", "w1_EFD", "w3_EFD", "w2_EDF")


def make_layer_problem(
    case: Case, dtype: torch.dtype, device, *, seed: int = 0, zipf: float = 1.2
) -> LayerProblem:
    s = case.shape
    _, w, e = make_routing(case.T, s.E, s.k, case.routing, zipf, seed, device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(
        dtype
    )
    x = rand(case.T, s.D)
    # Parameters, so GroupedExperts registers these very tensors (its gradients land on them).
    w1 = torch.nn.Parameter(rand(s.E, s.F, s.D, scale=s.D**-0.5))
    w3 = torch.nn.Parameter(rand(s.E, s.F, s.D, scale=s.D**-0.5))
    w2 = torch.nn.Parameter(rand(s.E, s.D, s.F, scale=s.F**-0.5))
    dy = rand(case.T, s.D)
    for t in (x, w):
        t.requires_grad_(True)
    return LayerProblem(x, w, e, w1, w3, w2, dy)


# ---- the reference -----------------------------------------------------------------------------


def reference_layer(x_TD, weights_TK, experts_TK, w1_EFD, w3_EFD, w2_EDF):
    """Plain torch, one expert at a time: each token's gate mass for expert e is the sum of its
    weights on slots that chose e (a token picks an expert at most once)."""
    out = torch.zeros_like(x_TD)
    for e in range(w1_EFD.shape[0]):
        chose = experts_TK == e
        tok = chose.any(1).nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        gate = (weights_TK * chose).sum(1)[tok].unsqueeze(1).to(x_TD.dtype)
        xe = x_TD[tok]
        h = F.silu(xe @ w1_EFD[e].t()) * (xe @ w3_EFD[e].t())
        out = out.index_add(0, tok, gate * (h @ w2_EDF[e].t()))
    return out


def reference_outputs(p: LayerProblem) -> dict:
    """Forward output and gradients of every leaf from the reference in fp32."""
    leaves = [t.detach().float().requires_grad_(True) for t in p.leaves()]
    x, w, w1, w3, w2 = leaves
    out = reference_layer(x, w, p.experts_TK, w1, w3, w2)
    out.backward(p.dy_TD.float())
    res = {"out": out.detach()}
    res.update({n: t.grad for n, t in zip(GRAD_NAMES, leaves)})
    return res


# ---- implementations ---------------------------------------------------------------------------


class LayerImpl:
    """One way to compute the layer. ``prepare`` may raise ``Unavailable``; ``grads`` returns the
    gradients in the canonical layout (``GRAD_NAMES``) after a backward."""

    name = "?"
    group = "baseline"  # "ours" or "baseline"
    note = ""

    def prepare(self, p: LayerProblem) -> None:
        pass

    def forward(self, p: LayerProblem) -> torch.Tensor:
        raise NotImplementedError

    def params(self, p: LayerProblem) -> list[torch.Tensor]:
        """Tensors whose ``.grad`` backward fills (reset before every timed call)."""
        return p.leaves()

    def grads(self, p: LayerProblem) -> dict:
        return {n: t.grad for n, t in zip(GRAD_NAMES, p.leaves())}

    def release(self) -> None:
        pass


def moe_kernels_experts(p: LayerProblem, backend=None, gather="auto") -> mk.GroupedExperts:
    """``moe_kernels.GroupedExperts`` on the problem's weights (registered, not copied)."""
    return mk.GroupedExperts.from_weights(
        p.w1_EFD, p.w2_EDF, p.w3_EFD, activation="swiglu", gather=gather, backend=backend
    )


def moe_kernels_layer(p: LayerProblem, backend: str | None = None, experts=None) -> torch.Tensor:
    """The moe_kernels expert path on a given decision: ``route`` then the layer's experts."""
    experts = experts if experts is not None else moe_kernels_experts(p, backend)
    plan = mk.route(p.experts_TK, p.E, backend=backend)
    return experts(p.x_TD, plan, p.weights_TK)


def _module(name: str):
    return importlib.import_module(name)


def chosen_backends(p: LayerProblem) -> str:
    """Which backend automatic selection picks for each op of the path on these inputs."""
    B = _module("moe_kernels.ops._select")
    picks = []
    try:
        wt = p.w1_EFD.transpose(1, 2)
        for op, fn, kw in (
            ("route", mk.route, dict(experts=p.experts_TK, weights=None, num_experts=p.E)),
            ("dispatch", mk.dispatch, dict(x=p.x_TD, weights=None)),
            ("grouped_mm", mk.grouped_mm, dict(x=p.x_TD, w=wt)),
            ("combine", mk.combine, dict(x=p.x_TD, weights=p.weights_TK)),
        ):
            backends = _module(fn.__module__).BACKENDS  # the op's module, wherever it lives
            picks.append(f"{op}={B.select(op, backends, None, **kw).name}")
    except Exception as exc:  # selection internals changed: say so, do not fail the run
        return f"auto (selection unknown: {type(exc).__name__})"
    return "auto: " + " ".join(picks)


class MoeKernels(LayerImpl):
    group = "ours"

    def __init__(self, backend: str, gather: str | bool = "auto") -> None:
        self.backend = None if backend == "auto" else backend
        self.gather = gather
        self.name = "moe_kernels" if backend == "auto" else f"moe_kernels[{backend}]"
        self.experts = None

    def prepare(self, p):
        self.experts = moe_kernels_experts(p, self.backend, self.gather)
        self.note = chosen_backends(p) if self.backend is None else f"forced {self.backend}"
        if self.experts.use_gather():
            self.note += "; fused gather"

    def forward(self, p):
        return moe_kernels_layer(p, self.backend, self.experts)

    def release(self):
        self.experts = None


class NaiveLoop(LayerImpl):
    name = "naive"
    note = "per-expert loop of F.linear (host syncs)"

    def forward(self, p):
        out = torch.zeros_like(p.x_TD)
        for e in range(p.E):
            tok, slot = torch.where(p.experts_TK == e)
            if tok.numel() == 0:
                continue
            xe = p.x_TD[tok]
            h = F.silu(F.linear(xe, p.w1_EFD[e])) * F.linear(xe, p.w3_EFD[e])
            y = F.linear(h, p.w2_EDF[e])
            gate = p.weights_TK[tok, slot].unsqueeze(1)
            out = out.index_add(0, tok, (y.float() * gate).to(out.dtype))
        return out


def torch_grouped_mm_layer(p: LayerProblem) -> torch.Tensor:
    """Sort tokens by expert, gather, torch._grouped_mm x3 (SwiGLU), scatter-add with weights."""
    flat = p.experts_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.float(), bins=p.E, min=0, max=p.E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // p.k
    xs = p.x_TD[tok]
    h = F.silu(torch._grouped_mm(xs, p.w1_EFD.transpose(-2, -1), offs=offs))
    h = h * torch._grouped_mm(xs, p.w3_EFD.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(h, p.w2_EDF.transpose(-2, -1), offs=offs)
    y = (y.float() * p.weights_TK.reshape(-1)[order].unsqueeze(1)).to(p.dtype)
    index = tok.unsqueeze(1).expand(-1, p.D)
    return torch.zeros_like(p.x_TD).scatter_add(0, index, y)


class TorchGroupedMM(LayerImpl):
    name = "torch_grouped_mm"
    note = "argsort + gather + torch._grouped_mm x3 + scatter_add"

    def prepare(self, p):
        if not hasattr(torch, "_grouped_mm"):
            raise Unavailable("not available: torch._grouped_mm missing in this torch")

    def forward(self, p):
        return torch_grouped_mm_layer(p)


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Unavailable("not installed") from None
    except Exception as exc:
        raise Unavailable(f"not available: import {name} failed ({type(exc).__name__})") from exc


class MegaBlocksDMoE(LayerImpl):
    """MegaBlocks' dropless expert layer (``dMoE.experts``) fed our decision; GLU with SiLU.

    Its weights are (E*F, D) matrices: w1 = gate, v1 = up, w2 = down transposed."""

    name = "megablocks"

    def __init__(self, mlp_impl: str = "sparse") -> None:
        self.mlp_impl = mlp_impl
        self.note = f"dMoE, mlp_impl={mlp_impl}"
        self.layer = None

    def prepare(self, p):
        _try_import("megablocks")
        if p.x_TD.device.type != "cuda":
            raise Unavailable("not available: MegaBlocks needs CUDA tensors")
        arguments = _try_import("megablocks.layers.arguments")
        dmoe = _try_import("megablocks.layers.dmoe")
        E, Fh, D = p.E, p.F, p.D
        args = arguments.Arguments(
            hidden_size=D,
            ffn_hidden_size=Fh,
            moe_num_experts=E,
            moe_top_k=p.k,
            mlp_type="glu",
            mlp_impl=self.mlp_impl,
            activation_fn=F.silu,
            bias=False,
            return_bias=False,
            moe_loss_weight=0.0,
            fp16=p.dtype == torch.float16,
            bf16=p.dtype == torch.bfloat16,
            device=p.x_TD.device,
        )
        self.layer = dmoe.dMoE(args)
        mlp = self.layer.experts.mlp
        with torch.no_grad():
            mlp.w1.copy_(p.w1_EFD.reshape(E * Fh, D))
            mlp.v1.copy_(p.w3_EFD.reshape(E * Fh, D))
            mlp.w2.copy_(p.w2_EDF.transpose(1, 2).reshape(E * Fh, D))

    def _mlp(self):
        return self.layer.experts.mlp

    def forward(self, p):
        x = p.x_TD.view(p.T, 1, p.D)
        out = self.layer.experts(x, None, p.weights_TK.to(p.dtype), p.experts_TK)
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(p.T, p.D)

    def params(self, p):
        m = self._mlp()
        return [p.x_TD, p.weights_TK, m.w1, m.v1, m.w2]

    def grads(self, p):
        m = self._mlp()
        shape = (p.E, p.F, p.D)
        g = lambda t: None if t.grad is None else t.grad.view(shape)
        dw2 = g(m.w2)
        return {
            "x_TD": p.x_TD.grad,
            "weights_TK": p.weights_TK.grad,
            "w1_EFD": g(m.w1),
            "w3_EFD": g(m.v1),
            "w2_EDF": None if dw2 is None else dw2.transpose(1, 2),
        }

    def release(self):
        self.layer = None


class ScatterMoEGLU(LayerImpl):
    """ScatterMoE's ``GLUMLP`` fed our decision. Its first weight (E, 2F, D) holds the up
    projection then the gate projection (it applies the activation to the second half)."""

    name = "scattermoe"
    note = "scattermoe.mlp.GLUMLP"

    def __init__(self) -> None:
        self.mlp = None

    def prepare(self, p):
        _try_import("scattermoe")
        if p.x_TD.device.type != "cuda":
            raise Unavailable("not available: ScatterMoE needs CUDA tensors")
        mlp_mod = _try_import("scattermoe.mlp")
        self.mlp = mlp_mod.GLUMLP(p.D, p.F, p.E, p.k, activation=torch.nn.SiLU())
        self.mlp.to(device=p.x_TD.device, dtype=p.dtype)
        with torch.no_grad():
            self.mlp.experts.weight.copy_(torch.cat([p.w3_EFD, p.w1_EFD], 1))
            self.mlp.output_experts.weight.copy_(p.w2_EDF)

    def forward(self, p):
        return self.mlp(p.x_TD, p.weights_TK.to(p.dtype), p.experts_TK.long())

    def params(self, p):
        return [p.x_TD, p.weights_TK, self.mlp.experts.weight, self.mlp.output_experts.weight]

    def grads(self, p):
        g13 = self.mlp.experts.weight.grad
        return {
            "x_TD": p.x_TD.grad,
            "weights_TK": p.weights_TK.grad,
            "w1_EFD": None if g13 is None else g13[:, p.F :],
            "w3_EFD": None if g13 is None else g13[:, : p.F],
            "w2_EDF": self.mlp.output_experts.weight.grad,
        }

    def release(self):
        self.mlp = None


# Baseline name -> factory. Tests add deliberately broken entries to check the WRONG path.
BASELINES = {
    "naive": NaiveLoop,
    "torch_grouped_mm": TorchGroupedMM,
    "megablocks": MegaBlocksDMoE,
    "scattermoe": ScatterMoEGLU,
}


# ---- ceilings ----------------------------------------------------------------------------------


@dataclass
class DenseFFN:
    """A dense SwiGLU FFN with hidden size k*F: the same FLOPs as the expert layer, all in three
    cuBLAS GEMMs (forward) without routing, gathers or per-expert blocks."""

    w1_HD: torch.Tensor
    w3_HD: torch.Tensor
    w2_DH: torch.Tensor

    @staticmethod
    def like(p: LayerProblem, seed: int = 2) -> DenseFFN:
        g = torch.Generator(device=p.x_TD.device).manual_seed(seed)
        H = p.k * p.F
        r = lambda *s, scale: (torch.randn(*s, generator=g, device=p.x_TD.device) * scale).to(
            p.dtype
        )
        ws = r(H, p.D, scale=p.D**-0.5), r(H, p.D, scale=p.D**-0.5), r(p.D, H, scale=H**-0.5)
        return DenseFFN(*(w.requires_grad_(True) for w in ws))

    def forward(self, x_TD):
        h = F.silu(F.linear(x_TD, self.w1_HD)) * F.linear(x_TD, self.w3_HD)
        return F.linear(h, self.w2_DH)

    def params(self):
        return [self.w1_HD, self.w3_HD, self.w2_DH]


def layer_flops(T: int, k: int, D: int, Fh: int) -> int:
    """Useful forward FLOPs: 3 GEMMs x 2 T k D F (backward is twice that)."""
    return 3 * 2 * T * k * D * Fh
