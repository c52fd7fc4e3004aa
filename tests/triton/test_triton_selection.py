"""When the Triton backend is chosen, and the reasons it gives when it is not."""

import importlib
import subprocess
import sys

import pytest
import torch
from triton_helpers import requires_triton

import moe_kernels as mk
from moe_kernels.ops import _select as S
from moe_kernels.triton import families

# The modules themselves (moe_kernels.ops re-exports functions of the same names).
topk_gating, route, dispatch_combine, grouped_mm, routing_histogram = (
    importlib.import_module(f"moe_kernels.ops.{name}")
    for name in ("topk_gating", "route", "dispatch_combine", "grouped_mm", "routing_histogram")
)

pytestmark = requires_triton


def cpu_inputs():
    """(op name, backend list, select() inputs) of every family on CPU tensors."""
    x = torch.randn(6, 8)
    return [
        ("topk_gating", topk_gating.BACKENDS, dict(logits=x, bias=None, k=2)),
        (
            "route",
            route.BACKENDS,
            dict(experts=torch.zeros(6, 2, dtype=torch.int32), weights=None, num_experts=4),
        ),
        ("dispatch", dispatch_combine.BACKENDS, dict(x=x, weights=None)),
        ("combine", dispatch_combine.BACKENDS, dict(x=x, weights=torch.rand(6, 2))),
        ("grouped_mm", grouped_mm.BACKENDS, dict(x=x, w=torch.randn(2, 8, 4))),
        (
            "routing_histogram",
            routing_histogram.BACKENDS,
            dict(experts=torch.zeros(6, 2, dtype=torch.int32), out=torch.zeros(2, 3).long()),
        ),
    ]


def test_triton_comes_after_cuda_and_before_cpu():
    for _, backends_list, _ in cpu_inputs():
        assert [b.name for b in backends_list] == ["cuda", "triton", "cpu", "reference"]


def test_automatic_selection_on_cpu_never_picks_triton(monkeypatch):
    # Even with the interpreter on (as in these tests), automatic selection keeps the C++ kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op, backends_list, inputs in cpu_inputs():
        assert S.select(op, backends_list, None, **inputs).name == "cpu", op
    # Nor is it the fallback when cpu declines (fp16 logits): the reference is.
    fp16 = dict(logits=torch.randn(4, 8).half(), bias=None, k=2)
    assert S.select("topk_gating", topk_gating.BACKENDS, None, **fp16).name == "reference"


def test_reason_without_forcing_names_the_way_to_ask():
    triton_backend = families.make("dispatch_combine")
    reasons = triton_backend.not_supported_reasons(x=torch.randn(3, 4), weights=None, forced=False)
    assert len(reasons) == 1
    assert "backend='triton'" in reasons[0] and "TRITON_INTERPRET=1" in reasons[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter rule, with no CUDA")
def test_forced_on_cpu_without_the_interpreter(monkeypatch):
    x = torch.randn(4, 8)
    # Unset: declined, even after earlier tests here ran the kernels interpreted.
    mk.topk_gating(x, 2, backend="triton")  # loads the kernels (interpreted) if not yet
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(S.NoBackendError, match=r"triton: CPU tensors need Triton's interpreter"):
        mk.topk_gating(x, 2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # any spelling triton reads as true
    assert families.device_reasons(x, forced=True) == []
    # Kernels already loaded for the GPU: setting the variable now is too late, and says so.
    monkeypatch.setattr(families, "kernels_interpreted", lambda: False)
    (reason,) = families.device_reasons(x, forced=True)
    assert "loaded the Triton kernels before TRITON_INTERPRET=1 was set" in reason


def test_interpreter_is_off_outside_this_folder():
    # conftest.py sets it only around these modules (here it is on); the suite's other tests
    # (benchmark smoke runs that ask for backend="triton" on CPU) run without it.
    assert families.interpreter_requested() == (not torch.cuda.is_available())


def test_other_reasons(monkeypatch):
    gmm = families.make("grouped_mm")
    x64 = torch.randn(4, 8, dtype=torch.float64)
    reasons = gmm.not_supported_reasons(x=x64, w=torch.randn(2, 8, 3).double(), forced=True)
    assert any("dtype torch.float64 not in" in r for r in reasons)
    many = torch.empty(families.MAX_EXPERTS + 1, 8, 3, device="meta")
    reasons = gmm.not_supported_reasons(x=torch.empty(4, 8, device="meta"), w=many, forced=True)
    assert any("needs CUDA tensors" in r and "meta" in r for r in reasons)
    assert any(f"experts > {families.MAX_EXPERTS}" in r for r in reasons)
    experts = torch.zeros(4, 2, dtype=torch.int32)
    (reason,) = families.make("route").not_supported_reasons(
        experts=experts, weights=None, num_experts=4, forced=True
    )
    assert "no Triton route kernel" in reason
    monkeypatch.setattr(families, "TRITON_INSTALLED", False)
    (reason,) = families.device_reasons(torch.randn(2), forced=True)
    assert "triton is not installed" in reason


def test_moe_kernels_never_imports_triton_itself():
    # Importing moe_kernels (and running an op on CPU) must not import triton from moe_kernels'
    # own code: it is slow and optional. torch may import it for its own purposes (torch._dynamo
    # does when it is installed), so the check is on the file whose import statement loads it.
    code = """
import builtins, sys, traceback
importers = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "triton" and "triton" not in sys.modules:
        importers.append(traceback.extract_stack()[-2].filename)
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import torch, moe_kernels
moe_kernels.topk_gating(torch.randn(4, 8), 2)
assert not [f for f in importers if "moe_kernels" in f], importers
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_backward_of_a_triton_forward_follows_the_one_rule(monkeypatch):
    # The backward reuses the forward's backend where automatic selection would accept it: on
    # CUDA tensors that is Triton; on CPU tensors Triton runs only when named (its interpreter),
    # so the backward's ops run on the C++ cpu backend (gating's backward: the reference, the
    # first with a backward kernel that takes CPU tensors).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    calls = []

    def wrap(fn, name, method):
        def wrapper(*args, **kwargs):
            calls.append((name, method))
            return fn(*args, **kwargs)

        return wrapper

    for mod, methods in (
        (dispatch_combine, ["dispatch", "combine", "weight_grad"]),
        (grouped_mm, ["forward", "dw"]),
        (topk_gating, ["forward", "backward"]),
    ):
        for b in mod.BACKENDS:
            for m in methods:
                if callable(getattr(b, m, None)):
                    monkeypatch.setattr(b, m, wrap(getattr(b, m), b.name, m))

    bwd = "triton" if on_gpu else "cpu"
    plan = mk.route(torch.tensor([[0, 1], [1, 2], [2, 0]], dtype=torch.int32, device=device), 3)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    w = torch.rand(3, 2, device=device, requires_grad=True)
    mk.dispatch(x, plan, weights_TK=w, backend="triton").sum().backward()
    assert calls == [("triton", "dispatch"), (bwd, "combine"), (bwd, "weight_grad")]

    calls.clear()
    xs = torch.randn(16, 16, device=device, requires_grad=True)
    ws = torch.randn(3, 16, 16, device=device, requires_grad=True)
    offsets = torch.tensor([0, 4, 9, 16], device=device)
    mk.grouped_mm(xs, ws, offsets, backend="triton").sum().backward()
    assert calls == [("triton", "forward"), (bwd, "forward"), (bwd, "dw")]

    calls.clear()
    z = torch.randn(4, 8, device=device, requires_grad=True)
    mk.topk_gating(z, 2, backend="triton")[0].sum().backward()
    # Triton has no gating backward: afresh in automatic order (cuda on a GPU with a CUDA build).
    assert calls[0] == ("triton", "forward") and len(calls) == 2
    assert calls[1][1] == "backward" and calls[1][0] in (
        ("cuda", "reference") if on_gpu else ("reference",)
    )
