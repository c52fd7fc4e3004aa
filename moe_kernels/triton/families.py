"""Triton backend objects for the op families (see moe_kernels.ops._select).

Which inputs the Triton backend takes:
- CUDA tensors: always (it comes after the cuda backend in every family's list);
- CPU tensors: only through Triton's interpreter and only when asked for by name
  (``backend="triton"``), so automatic selection on CPU keeps the C++ cpu backend; the
  interpreter runs one program at a time and is meant for tests. ``TRITON_INTERPRET=1`` must be
  set when the kernels load (triton fixes a kernel's mode when it decorates it) and still be set
  when they run: unsetting it switches CPU tensors off again.

Nothing here imports triton: its presence is checked with ``importlib.util.find_spec`` and the
kernel modules (``moe_kernels.triton.<family>``, named like the op modules) load on first use.
Of moe_kernels this module imports only ``moe_kernels.ops._select``, which imports nothing back;
the op modules import this one to build their backend lists. Its name is not ``backends``:
torch.compile skips every file under a path containing "triton/backends", and backend selection
runs these reasons inside compiled code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from moe_kernels.ops import _select as S


def _triton_installed() -> bool:
    # A directory named "triton" on sys.path without an __init__.py (a test folder, say) is found
    # as a namespace package with no origin; only a real package counts.
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None


TRITON_INSTALLED = _triton_installed()

# Data dtypes of every Triton kernel (they compute in fp32; fp64 stays on cpu/reference).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest expert count: gating holds a row of E logits per program, grouped_mm E + 1 offsets.
MAX_EXPERTS = 4096
MAX_ROWS = 2**31 - 1  # row indices are int32 inside the kernels

# Values of TRITON_INTERPRET that triton reads as true.
_TRUE = {"1", "true", "yes", "on", "y"}


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (read now, from the environment)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def kernels_interpreted() -> bool | None:
    """Whether this process loaded the Triton kernels for the interpreter; None before the first
    kernel module loads (triton fixes the mode when it decorates a kernel)."""
    common = sys.modules.get("moe_kernels.triton._common")
    return None if common is None else bool(common.INTERPRETED)


def kernels(family: str) -> ModuleType:
    """The kernel module of an op family (imports triton on first use)."""
    return importlib.import_module(f"moe_kernels.triton.{family}")


def device_reasons(t: torch.Tensor, forced: bool) -> list[str]:
    """Why the Triton kernels cannot run on ``t``'s device (empty when they can)."""
    if not TRITON_INSTALLED:
        return ["triton is not installed (pip install 'moe-testbed[triton]')"]
    kind = t.device.type
    if kind == "cuda":
        return []
    if kind != "cpu":
        return [f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {t.device}"]
    if not forced:
        return [
            "CPU tensors run only through Triton's interpreter, so only when asked for with "
            "backend='triton' (and TRITON_INTERPRET=1); automatic selection leaves them to cpu"
        ]
    if not interpreter_requested():
        return [
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 (before the first "
            "Triton call)"
        ]
    if kernels_interpreted() is False:
        return [
            "CPU tensors need Triton's interpreter, but this process loaded the Triton kernels "
            "before TRITON_INTERPRET=1 was set"
        ]
    return []


def on_device(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (Triton launches on the current device and its
    current torch stream); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dtype_reasons(*tensors: torch.Tensor | None) -> list[str]:
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in DTYPES:
            return [f"dtype {t.dtype} not in {[str(d) for d in DTYPES]}"]
    return []


class TritonBackend(S.Backend):
    name = "triton"
    takes_forced = True


class TritonTopkGating(TritonBackend):
    def not_supported_reasons(self, logits, bias, k, forced):
        reasons = device_reasons(logits, forced) + dtype_reasons(logits)
        if logits.shape[1] > MAX_EXPERTS:
            reasons.append(f"E = {logits.shape[1]} experts > {MAX_EXPERTS}")
        return reasons

    def forward(self, logits, k, score, bias, normalize):
        with on_device(logits):
            return kernels("topk_gating").topk_gating(logits, k, score, bias, normalize)


class TritonRoute(TritonBackend):
    """The route slot of the list: there is no Triton route kernel yet."""

    def not_supported_reasons(self, experts, weights, num_experts, forced):
        return ["no Triton route kernel in this version"]


class TritonDispatchCombine(TritonBackend):
    def not_supported_reasons(self, x, weights, forced):
        return device_reasons(x, forced) + dtype_reasons(x)

    def dispatch(self, x, row_slot, K, weights):
        mod = kernels("dispatch_combine")
        with on_device(x):
            return mod.dispatch(x.contiguous(), row_slot.contiguous(), K, weights)

    def combine(self, y, slot_row, weights):
        mod = kernels("dispatch_combine")
        with on_device(y):
            return mod.combine(y.contiguous(), slot_row.contiguous(), weights)

    def weight_grad(self, a, b, slot_row, wdtype):
        mod = kernels("dispatch_combine")
        with on_device(a):
            return mod.weight_grad(a.contiguous(), b.contiguous(), slot_row.contiguous(), wdtype)


class TritonGroupedMM(TritonBackend):
    def not_supported_reasons(self, x, w, forced):
        reasons = device_reasons(x, forced) + dtype_reasons(x)
        if w.shape[0] > MAX_EXPERTS:
            reasons.append(f"E = {w.shape[0]} experts > {MAX_EXPERTS}")
        if x.shape[0] > MAX_ROWS:
            reasons.append(f"N = {x.shape[0]} rows > {MAX_ROWS}")
        return reasons

    def forward(self, x, w, offsets):
        with on_device(x):
            return kernels("grouped_mm").grouped_mm(x, w, offsets)

    def dw(self, x, dy, offsets):
        with on_device(x):
            return kernels("grouped_mm").grouped_mm_dw(x, dy, offsets)


class TritonRoutingHistogram(TritonBackend):
    def not_supported_reasons(self, experts, out, forced):
        return device_reasons(experts, forced)

    def forward(self, experts, labels, out, weights, out_w):
        with on_device(experts):
            kernels("routing_histogram").routing_histogram(experts, labels, out, weights, out_w)


_FAMILIES = {
    "topk_gating": TritonTopkGating,
    "route": TritonRoute,
    "dispatch_combine": TritonDispatchCombine,
    "grouped_mm": TritonGroupedMM,
    "routing_histogram": TritonRoutingHistogram,
}


def make(family: str) -> S.Backend:
    """The Triton backend of op family ``family`` (a module name of ``moe_kernels.ops``).

    Raises: ValueError for an unknown family."""
    if family not in _FAMILIES:
        raise ValueError(f"family: expected one of {sorted(_FAMILIES)}, got {family!r}")
    return _FAMILIES[family]()
