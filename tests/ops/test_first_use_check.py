"""The first-use self-check of automatically selected GPU backends (moe_kernels._first_use),
exercised on CPU with backends registered in front of grouped_mm's list: a wrong one must be
caught, warned about once and bypassed (the op's result stays right), a correct one kept."""

from __future__ import annotations

import importlib
import time
import warnings

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _first_use
from moe_kernels import _selfcheck_cases as C
from moe_kernels.ops import _select as S
from moe_kernels.ops.grouped_mm import CpuGroupedMM, grouped_mm_reference

G = importlib.import_module("moe_kernels.ops.grouped_mm")


class Counting(CpuGroupedMM):
    """The cpu backend under another name, checked at first use, counting its forward calls."""

    name = "good"
    first_use_check = True

    def __init__(self):
        self.calls = 0

    def forward(self, x, w, offsets):
        self.calls += 1
        return super().forward(x, w, offsets)


class Wrong(Counting):
    """Off by 10% on every output: plausible numbers, wrong beyond every dtype's tolerance."""

    name = "broken"

    def forward(self, x, w, offsets):
        return super().forward(x, w, offsets) * 1.1


class Raising(Counting):
    name = "raising"

    def forward(self, x, w, offsets):
        self.calls += 1
        raise RuntimeError("illegal memory access (simulated)")


@pytest.fixture
def register(monkeypatch):
    """Put backends in front of grouped_mm's automatic order, with no verdicts kept yet."""
    monkeypatch.setattr(S, "first_use_verdicts", {})
    monkeypatch.setattr(_first_use, "_noted", set())
    monkeypatch.delenv("MOE_KERNELS_SELFCHECK", raising=False)

    def put(*backends):
        monkeypatch.setattr(G, "BACKENDS", [*backends, *G.BACKENDS])
        return backends

    return put


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(10, 16, generator=g), torch.randn(3, 16, 8, generator=g)
    return x, w, torch.tensor([0, 4, 4, 9], dtype=torch.int32)


def test_wrong_backend_is_caught_warned_once_and_bypassed(register):
    (bad,) = register(Wrong())
    x, w, offs = inputs()
    with pytest.warns(_first_use.SelfCheckWarning) as caught:
        y = mk.grouped_mm(x, w, offs)
    msgs = [str(c.message) for c in caught]
    assert len(msgs) == 1
    assert "broken backend of grouped_mm" in msgs[0] and "torch.float32" in msgs[0]
    assert "max abs error" in msgs[0] and "tolerance" in msgs[0]
    assert "python -m moe_kernels.selfcheck" in msgs[0]
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs))
    assert S.first_use_verdicts[("grouped_mm", "broken", torch.float32, False, -1)] is False
    calls = bad.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        y2 = mk.grouped_mm(*inputs(1))
    torch.testing.assert_close(y2, grouped_mm_reference(*inputs(1)))
    assert bad.calls == calls  # bypassed, not run again
    # Another dtype is another key: checked (and failed) on its own.
    with pytest.warns(_first_use.SelfCheckWarning, match="torch.bfloat16"):
        mk.grouped_mm(x.bfloat16(), w.bfloat16(), offs)


def test_backend_that_raises_is_caught_and_bypassed(register):
    register(Raising())
    x, w, offs = inputs()
    with pytest.warns(_first_use.SelfCheckWarning, match="RuntimeError: illegal memory access"):
        y = mk.grouped_mm(x, w, offs)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs))


def test_correct_backend_is_kept(register):
    (good,) = register(Counting())
    x, w, offs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = mk.grouped_mm(x, w, offs)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs))
    assert S.first_use_verdicts[("grouped_mm", "good", torch.float32, False, -1)] is True
    before = good.calls
    mk.grouped_mm(x, w, offs)
    assert good.calls == before + 1  # the user's call ran on it, and no check ran again


def test_backward_reselection_is_checked_too(register):
    """The dw op selected afresh (its forward backend has no dw) goes through the check."""

    class NoDw(Counting):
        name = "nodw"
        dw = None

    class WrongDw(Counting):
        name = "wrongdw"
        forward = None  # takes only the dw op

        def dw(self, x, dy, offsets):
            return super().dw(x, dy, offsets) + 1.0

    register(NoDw(), WrongDw())
    x, w, offs = inputs()
    w.requires_grad_(True)
    with pytest.warns(_first_use.SelfCheckWarning, match="wrongdw backend of grouped_mm"):
        mk.grouped_mm(x, w, offs).sum().backward()
    ref = torch.zeros_like(w)
    for e in range(3):
        lo, hi = offs[e].item(), offs[e + 1].item()
        ref[e] = x[lo:hi].t() @ torch.ones(hi - lo, 8)
    torch.testing.assert_close(w.grad, ref)


def test_forced_backend_is_not_checked(register):
    (bad,) = register(Wrong())
    x, w, offs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = mk.grouped_mm(x, w, offs, backend="broken")
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs) * 1.1)
    assert S.first_use_verdicts == {}


def test_env_off_skips_the_check(register, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_SELFCHECK", "0")
    (bad,) = register(Wrong())
    x, w, offs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = mk.grouped_mm(x, w, offs)
    assert bad.calls == 1  # the user's call only: no check ran
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs) * 1.1)


def test_full_mode_runs_more_cases(register, monkeypatch):
    seen = []
    real = C.check_case
    monkeypatch.setattr(C, "check_case", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    register(Counting())
    x, w, offs = inputs()
    mk.grouped_mm(x, w, offs)
    quick = len(seen)
    monkeypatch.setenv("MOE_KERNELS_SELFCHECK", "full")
    mk.grouped_mm(x.double(), w.double(), offs)
    assert quick == len(C.cases("grouped_mm", torch.float32))
    assert len(seen) - quick == len(C.cases("grouped_mm", torch.float64, full=True)) > quick


def test_unknown_env_value_warns_and_checks(register, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_SELFCHECK", "yes please")
    register(Counting())
    x, w, offs = inputs()
    with pytest.warns(_first_use.SelfCheckWarning, match="MOE_KERNELS_SELFCHECK: expected"):
        mk.grouped_mm(x, w, offs)
    assert S.first_use_verdicts[("grouped_mm", "good", torch.float32, False, -1)] is True


def test_under_a_dispatch_mode_the_backend_is_used_unchecked(register):
    from torch._subclasses.fake_tensor import FakeTensorMode

    register(Wrong())
    with FakeTensorMode():
        x, w, offs = inputs()
        with pytest.warns(_first_use.SelfCheckWarning, match="used unchecked under a tracing"):
            mk.grouped_mm(x, w, offs)
    assert S.first_use_verdicts == {}  # decided at the next eager call


def test_torch_compile_checks_before_tracing_and_adds_nothing(register):
    (bad,) = register(Wrong())
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x, w, o: mk.grouped_mm(x, w, o), backend=capture, fullgraph=True)
    x, w, offs = inputs()
    torch._dynamo.reset()
    with pytest.warns(_first_use.SelfCheckWarning, match="broken backend"):
        y = f(x, w, offs)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs))
    (gm,) = graphs
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.moe_kernels.grouped_mm.default]
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[-1] == "cpu"  # the broken backend was bypassed in the trace


def test_check_adds_nothing_to_later_calls(register, monkeypatch):
    """After the first call no check runs again, and selection pays one dict lookup: time
    select() picking a checked backend against picking the same backend unchecked. (A check
    that ran again would cost milliseconds: five cases, three ops each.)"""

    class Unchecked(Counting):
        name = "unchecked"
        first_use_check = False

    x, w, offs = inputs()
    checked_list, unchecked_list = [Counting(), *G.BACKENDS], [Unchecked(), *G.BACKENDS]
    register(checked_list[0])
    mk.grouped_mm(x, w, offs)  # first use: the check runs and its verdict is kept
    runs = []
    real = C.check_case
    monkeypatch.setattr(C, "check_case", lambda *a, **k: runs.append(a) or real(*a, **k))
    for _ in range(100):
        mk.grouped_mm(x, w, offs)
    assert runs == []

    def per_call(backends):
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(2000):
                S.select("grouped_mm", backends, None, x=x, w=w)
            best = min(best, (time.perf_counter() - t0) / 2000)
        return best

    assert S.select("grouped_mm", checked_list, None, x=x, w=w).name == "good"
    checked, unchecked = per_call(checked_list), per_call(unchecked_list)
    print(f"select: {checked * 1e6:.2f} us checked, {unchecked * 1e6:.2f} us unchecked")
    assert checked - unchecked < 20e-6


@pytest.mark.gpu
def test_gpu_backends_pass_their_first_use_check(monkeypatch):
    """On a GPU: each op's automatically selected backend (cuda, else triton) passes its check,
    with no warning, and its verdict is kept."""
    monkeypatch.setattr(S, "first_use_verdicts", {})
    monkeypatch.setenv("MOE_KERNELS_SELFCHECK", "full")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _first_use.SelfCheckWarning)
        w, e = mk.topk_gating(logits, 2)
        plan = mk.route(e, 8)
        x = torch.randn(64, 32, generator=g).to(dev, torch.bfloat16)
        rows = mk.dispatch(x, plan, weights_TK=w)
        y = mk.grouped_mm(rows, torch.randn(8, 32, 16).to(dev, torch.bfloat16), plan.offsets_E1)
        mk.combine(y, w, plan)
        mk.routing_histogram(
            e,
            torch.zeros(64, dtype=torch.long, device=dev),
            torch.zeros(1, 8, dtype=torch.long, device=dev),
        )
    families = {k[0] for k, v in S.first_use_verdicts.items() if v}
    assert families >= {"topk_gating", "route", "dispatch_combine", "grouped_mm"}
    assert all(S.first_use_verdicts.values())
