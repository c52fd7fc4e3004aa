"""Backend selection (moe_kernels/ops/_select.py): the one backward rule, the selection arguments
that every backend spells out, and what NoBackendError shows."""

import importlib
import inspect

import pytest
import torch

import moe_kernels as mk
from moe_kernels.ops import _select as S

from .util import random_experts

# The op modules themselves (moe_kernels.ops re-exports functions of the same names).
FAMILIES = ("topk_gating", "route", "dispatch_combine", "grouped_mm", "routing_histogram")
MODULES = {name: importlib.import_module(f"moe_kernels.ops.{name}") for name in FAMILIES}
# The selection arguments of each family (the table in _select's docstring).
ARGUMENTS = {
    "topk_gating": ["logits", "bias", "k"],
    "route": ["experts", "weights", "num_experts"],
    "dispatch_combine": ["x", "weights"],
    "grouped_mm": ["x", "w"],
    "routing_histogram": ["experts", "out"],
}


# ---- the selection arguments -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_backend_spells_out_the_family_arguments(family):
    for b in MODULES[family].BACKENDS:
        params = inspect.signature(b.not_supported_reasons).parameters
        kinds = {p.kind for p in params.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, (family, b.name)
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, (family, b.name)
        expected = ARGUMENTS[family] + (["forced"] if b.takes_forced else [])
        assert list(params) == expected, (family, b.name)
        # No defaults: selection must pass every argument, so none can be silently left out.
        assert all(p.default is inspect.Parameter.empty for p in params.values()), b.name


def test_a_misspelled_argument_raises_instead_of_skipping_a_check():
    backends = MODULES["topk_gating"].BACKENDS
    x = torch.randn(4, 8)
    assert S.select("topk_gating", backends, None, logits=x, bias=None, k=2).name == "cpu"
    with pytest.raises(TypeError, match="logitz"):
        S.select("topk_gating", backends, None, logitz=x, bias=None, k=2)
    with pytest.raises(TypeError, match="k"):  # a missing argument, too
        S.select("topk_gating", backends, None, logits=x, bias=None)
    # Forced or not, and for a backend that reads only some of the arguments (cpu reads logits).
    with pytest.raises(TypeError, match="bias_E"):
        S.select("topk_gating", backends, "cpu", logits=x, bias_E=None, k=2)
    dc = MODULES["dispatch_combine"].BACKENDS
    with pytest.raises(TypeError, match="y"):
        S.select("combine", dc, None, y=x, weights=None)


# ---- NoBackendError ----------------------------------------------------------------------------


def test_no_backend_error_shows_the_inputs_then_every_backend():
    x = torch.randn(4, 8).half()
    with pytest.raises(mk.NoBackendError) as info:
        mk.topk_gating(x, 2, backend="cpu")
    msg = str(info.value)
    print(msg)
    lines = msg.splitlines()
    assert lines[0] == "no topk_gating backend accepts these inputs:"
    assert lines[1] == "  logits: tensor of shape (4, 8), torch.float16, on cpu"
    assert lines[2] == "  bias: None"
    assert lines[3] == "  k: 2"
    assert lines[4] == "backends and why they declined:"
    assert lines[5].startswith("  cpu: dtype torch.float16 not in")
    assert len(lines) == 6  # forced: only the named backend is tried


class _Declines(S.Backend):
    def __init__(self, name, why):
        self.name, self.why = name, why

    def not_supported_reasons(self, x, n):
        return [self.why]


def test_no_backend_error_lists_every_backend_in_order():
    backends = [_Declines("first", "too wide"), _Declines("second", "too tall")]
    x = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(S.NoBackendError) as info:
        S.select("op", backends, None, x=x, n=7)
    assert str(info.value).splitlines() == [
        "no op backend accepts these inputs:",
        "  x: tensor of shape (3, 5), torch.int32, on cpu",
        "  n: 7",
        "backends and why they declined:",
        "  first: too wide",
        "  second: too tall",
    ]


# ---- the backward rule: backward_backend with stand-in backends --------------------------------


class _Stub(S.Backend):
    def __init__(self, name, *, declines=(), backward=True, takes_forced=False):
        self.name = name
        self.declines = set(declines)  # the values of x this backend refuses
        self.takes_forced = takes_forced
        if backward:
            self.backward = lambda: None

    def not_supported_reasons(self, x, forced=False):
        if self.takes_forced and not forced:
            return ["only when asked for by name"]
        return ["declines"] if x in self.declines else []


def test_backward_reuses_the_forward_backend():
    backends = [_Stub("a"), _Stub("b"), _Stub("ref")]
    assert S.backward_backend("bwd", backends, "b", "backward", x=1).name == "b"


def test_backward_without_a_kernel_selects_afresh_among_those_that_have_one():
    backends = [_Stub("a", declines={1}), _Stub("b", backward=False), _Stub("c"), _Stub("ref")]
    # b has no backward: the automatic order (a declines x=1) gives c.
    assert S.backward_backend("bwd", backends, "b", "backward", x=1).name == "c"


def test_backward_whose_inputs_the_forward_backend_declines_selects_afresh():
    backends = [_Stub("a"), _Stub("b", declines={2}), _Stub("ref")]
    assert S.backward_backend("bwd", backends, "b", "backward", x=2).name == "a"
    assert S.backward_backend("bwd", backends, "b", "backward", x=3).name == "b"


def test_backward_reuses_a_named_only_backend_only_where_automatic_selection_would():
    # Triton on CPU tensors runs only when named: its forward ran (named), its backward does not.
    backends = [_Stub("triton", takes_forced=True), _Stub("cpu"), _Stub("ref")]
    assert S.backward_backend("bwd", backends, "triton", "backward", x=1).name == "cpu"


def test_backward_with_no_able_backend_raises_and_lists_those_tried():
    backends = [_Stub("a", backward=False), _Stub("b", declines={1})]
    with pytest.raises(S.NoBackendError, match=r"(?s)x: 1.*b: declines"):
        S.backward_backend("bwd", backends, "a", "backward", x=1)


# ---- the backward rule in every differentiable op family --------------------------------------


def record(monkeypatch, backends, methods):
    """Wrap ``methods`` of every backend that has them; returns the (backend, method) calls."""
    calls = []

    def wrap(fn, name, method):
        def wrapper(*args, **kwargs):
            calls.append((name, method))
            return fn(*args, **kwargs)

        return wrapper

    for b in backends:
        for m in methods:
            fn = getattr(b, m, None)
            if callable(fn):
                monkeypatch.setattr(b, m, wrap(fn, b.name, m))
    return calls


@pytest.mark.parametrize(
    "forced,expected",
    [
        # The reference implements the backward: reused.
        ("reference", [("reference", "forward"), ("reference", "backward")]),
        # cpu has no backward kernel: automatic order among cuda and the reference (cuda declines
        # CPU tensors).
        ("cpu", [("cpu", "forward"), ("reference", "backward")]),
        (None, [("cpu", "forward"), ("reference", "backward")]),
    ],
)
def test_topk_gating_backward_follows_the_rule(monkeypatch, forced, expected):
    calls = record(monkeypatch, MODULES["topk_gating"].BACKENDS, ["forward", "backward"])
    z = torch.randn(6, 8, requires_grad=True)
    w, _ = mk.topk_gating(z, 2, backend=forced)
    w.sum().backward()
    assert calls == expected


@pytest.mark.parametrize("forced", ["reference", "cpu", None])
def test_dispatch_and_combine_backward_follow_the_rule(monkeypatch, forced):
    calls = record(
        monkeypatch, MODULES["dispatch_combine"].BACKENDS, ["dispatch", "combine", "weight_grad"]
    )
    ran = "cpu" if forced is None else forced  # automatic selection on CPU tensors: cpu
    plan = mk.route(random_experts(10, 2, 4), 4)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.rand(10, 2, requires_grad=True)
    mk.dispatch(x, plan, weights_TK=w, backend=forced).sum().backward()
    assert calls == [(ran, "dispatch"), (ran, "combine"), (ran, "weight_grad")]
    calls.clear()
    y = torch.randn(plan.num_rows, 8, requires_grad=True)
    mk.combine(y, w, plan, backend=forced).sum().backward()
    assert calls == [(ran, "combine"), (ran, "dispatch"), (ran, "weight_grad")]


@pytest.mark.parametrize("forced", ["reference", "cpu", None])
def test_grouped_mm_backward_follows_the_rule(monkeypatch, forced):
    calls = record(monkeypatch, MODULES["grouped_mm"].BACKENDS, ["forward", "dw"])
    ran = "cpu" if forced is None else forced
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    offsets = torch.tensor([0, 5, 5, 12])
    mk.grouped_mm(x, w, offsets, backend=forced).sum().backward()
    # forward, then dx = grouped_mm(dy, w^T), then dw.
    assert calls == [(ran, "forward"), (ran, "forward"), (ran, "dw")]


def test_every_backward_op_has_a_reference_that_accepts_anything():
    """The rule's last resort: the reference implements every backward op of its family."""
    methods = {
        "topk_gating": ["backward"],
        "dispatch_combine": ["dispatch", "combine", "weight_grad"],
        "grouped_mm": ["forward", "dw"],
    }
    for family, names in methods.items():
        ref = S.by_name(MODULES[family].BACKENDS, "reference")
        assert all(callable(getattr(ref, m, None)) for m in names), family
