"""First-use self-check of the GPU backends (installed into ``moe_kernels.ops._select`` when
moe_kernels is imported).

The first time automatic selection picks a ``cuda`` or ``triton`` backend for an (op family,
dtype, device) in a process, that backend runs the family's fixed edge-case inputs
(``moe_kernels._selfcheck_cases``) and its outputs are compared with the reference's on the same
device. On a mismatch or an exception the backend is marked unusable for that key for the rest of
the process, one warning says what failed and how to report it, and selection falls through to
the next backend in the order. The verdict is kept, so later calls pay one dict lookup.

``MOE_KERNELS_SELFCHECK``: ``1`` (default) the quick cases, ``full`` more shapes, ``0`` off.

The check never runs inside a traced or captured region. Under torch.compile, Dynamo calls the
verdict natively while tracing (``_select.first_use_verdict`` is marked as having a constant
result), so the check runs before the op is traced, on real tensors, and the graph holds nothing
of it. Under a dispatch mode (fake tensors, make_fx tracing, e.g. AOTAutograd tracing a
backward), while a CUDA graph is being captured or while ``torch.cuda.set_sync_debug_mode`` is
on, the backend is used unchecked, with a one-time note, and checked at the next call outside;
meta tensors are never checked.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from moe_kernels import _selfcheck_cases as C
from moe_kernels.ops import _select as S

ENV = "MOE_KERNELS_SELFCHECK"
MODES = {"1": "quick", "full": "full", "0": "off"}
REPORT = (
    "Please report it with the output of `python -m moe_kernels.selfcheck --full --device {dev} "
    "--json selfcheck.json` (and `python -c 'import moe_kernels; print(moe_kernels.build_info())'`"
    "); set MOE_KERNELS_SELFCHECK=0 to skip the check."
)

_noted: set[tuple] = set()


class SelfCheckWarning(RuntimeWarning):
    """A GPU backend failed its first-use self-check and was bypassed, or was used unchecked."""


def mode() -> str:
    """The self-check mode from ``MOE_KERNELS_SELFCHECK``: "quick", "full" or "off" (read each
    time a check would run; an unknown value warns once and means "quick")."""
    raw = os.environ.get(ENV, "1").strip().lower()
    if raw in MODES:
        return MODES[raw]
    if ("mode", raw) not in _noted:
        _noted.add(("mode", raw))
        warnings.warn(
            f"{ENV}: expected one of {sorted(MODES)}, got {raw!r}; running the quick check",
            SelfCheckWarning,
            stacklevel=4,
        )
    return "quick"


def _family_backends(family: str) -> list[S.Backend]:
    return importlib.import_module(f"moe_kernels.ops.{family}").BACKENDS


def _cannot_run_here(device: torch.device) -> str | None:
    """Why no check can run at this point (None: it can): a dispatch mode is active (fake
    tensors, make_fx tracing), a CUDA graph is being captured on the current stream, or CUDA
    synchronisations are being reported (the check's comparisons synchronise)."""
    if torch._C._len_torch_dispatch_stack() > 0:
        return "under a tracing or fake-tensor mode"
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return "inside a CUDA graph capture"
        if torch.cuda.get_sync_debug_mode() != 0:
            return "while torch.cuda.set_sync_debug_mode is on (the check synchronises)"
    return None


def check(family: str, name: str, dtype, device):
    """``_select.first_use_check`` for backend ``name`` of op family ``family``: True (usable),
    False (failed: warned, bypassed from now on) or None (not checked now: ask again later)."""
    how = mode()
    if how == "off":
        return True
    if device.type == "meta":
        return None
    why = _cannot_run_here(device)
    if why:
        key = ("skipped", family, name, dtype, device)
        if key not in _noted:
            _noted.add(key)
            warnings.warn(
                f"moe_kernels: the {name} backend of {family} ({dtype}, {device}) is used "
                f"unchecked {why}; its first-use self-check runs at the next call outside it "
                "(or run `python -m moe_kernels.selfcheck` first).",
                SelfCheckWarning,
                stacklevel=4,
            )
        return None
    backends = _family_backends(family)
    backend = S.by_name(backends, name)
    reference = S.by_name(backends, "reference")
    rows = C.check_backend(family, backend, reference, dtype, device, full=how == "full")
    bad = [r for r in rows if not r.ok]
    if not bad:
        return True
    first = bad[0]
    err = "an exception" if first.max_err is None else f"max abs error {first.max_err:.3g}"
    dev = f"{device.type}:{device.index}" if device.index is not None else device.type
    warnings.warn(
        f"moe_kernels: the {name} backend of {family} failed its first-use self-check "
        f"for {dtype} on {device} ({len(bad)} of {len(rows)} checks; first: {first.op} on "
        f"{first.shape}: {err}, tolerance {first.tol}; {first.verdict}). It is bypassed for "
        f"{family} in {dtype} on {device} for the rest of this process: the next backend in the "
        f"order runs instead. " + REPORT.format(dev=dev),
        SelfCheckWarning,
        stacklevel=4,
    )
    return False


def install() -> None:
    S.first_use_check = check
