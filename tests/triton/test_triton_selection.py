"""When the Triton backend is chosen, and the reasons it gives when it is not."""

import importlib
import subprocess
import sys

import pytest
import torch
from triton_helpers import requires_triton

import moe_kernels as mk
from moe_kernels.ops import _select as B
from moe_kernels.triton import families

# The modules themselves (moe_kernels.ops re-exports functions of the same names).
gating, route, dispatch, combine, grouped_mm, histogram = (
    importlib.import_module(f"moe_kernels.ops.{name}")
    for name in ("topk_gating", "route", "dispatch", "combine", "grouped_mm", "routing_histogram")
)

pytestmark = requires_triton


def cpu_inputs():
    """(op name, backend list, select() inputs) of every family on CPU tensors."""
    x = torch.randn(6, 8)
    return [
        ("topk_gating", gating.BACKENDS, dict(logits=x, bias=None)),
        ("route", route.BACKENDS, dict(experts=torch.zeros(6, 2, dtype=torch.int32), weights=None)),
        ("dispatch", dispatch.BACKENDS, dict(x=x, weights=None)),
        ("combine", combine.BACKENDS, dict(y=x, weights=torch.rand(6, 2))),
        ("grouped_mm", grouped_mm.BACKENDS, dict(x=x, w=torch.randn(2, 8, 4))),
        (
            "routing_histogram",
            histogram.BACKENDS,
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
        assert B.select(op, backends_list, None, **inputs).name == "cpu", op
    # Nor is it the fallback when cpu declines (fp16 logits): the reference is.
    fp16 = dict(logits=torch.randn(4, 8).half(), bias=None)
    assert B.select("topk_gating", gating.BACKENDS, None, **fp16).name == "reference"


def test_reason_without_forcing_names_the_way_to_ask():
    reasons = families.make("dispatch").not_supported_reasons(x=torch.randn(3, 4), forced=False)
    assert len(reasons) == 1
    assert "backend='triton'" in reasons[0] and "TRITON_INTERPRET=1" in reasons[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter rule, with no CUDA")
def test_forced_on_cpu_without_the_interpreter(monkeypatch):
    x = torch.randn(4, 8)
    # Unset: declined, even after earlier tests here ran the kernels interpreted.
    mk.topk_gating(x, 2, backend="triton")  # loads the kernels (interpreted) if not yet
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(B.NoBackendError, match=r"triton: CPU tensors need Triton's interpreter"):
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
    assert "no Triton route kernel" in families.make("route").not_supported_reasons()[0]
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
