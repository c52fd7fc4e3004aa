"""Backend selection shared by every op family, and the one rule for backward passes.

Each op family keeps an ordered list of backends (``cuda``, ``triton``, ``cpu``, ``reference``).
A backend says why it cannot run some inputs through ``not_supported_reasons``, whose keyword
arguments are the selection arguments its op defines, spelled out (no catch-all ``**kwargs``: a
misspelled or missing argument is a TypeError, never a silently skipped check):

==================  =================================  ==========================================
op family           selection arguments                backward ops (backend method)
==================  =================================  ==========================================
topk_gating         ``logits, bias, k``                topk_gating_backward (``backward``)
route               ``experts, weights, num_experts``  -
dispatch_combine    ``x, weights``                     each other (``dispatch`` / ``combine``),
                                                       weight_grad (``weight_grad``)
grouped_mm          ``x, w``                           grouped_mm (``forward``), grouped_mm_dw
                                                       (``dw``)
routing_histogram   ``experts, out``                   -
==================  =================================  ==========================================

A backend with ``takes_forced = True`` (Triton, whose CPU path is its slow interpreter) also
takes ``forced``: whether it was asked for by name. The first backend with no reasons wins,
``backend="name"`` forces one, and when none fits :class:`NoBackendError` shows the inputs and
every backend with its reasons. Reasons look only at metadata (device, dtype, shape), never at
data, so selection needs no host synchronisation and is traced by ``torch.compile``.

First-use self-check: the first time automatic selection picks a ``cuda`` or ``triton`` backend
for an (op family, dtype, device) in a process, ``moe_kernels._first_use`` runs it on small fixed
inputs against the reference; a backend that fails is skipped for that key from then on (the
next backend in the order is taken). A backend named with ``backend=`` is never checked or
skipped. After the first call per key the check costs one dict lookup; torch.compile runs it
natively while tracing, outside the graph (see ``first_use_verdict``).

This module imports no other module of moe_kernels (only the compiled ``moe_kernels._C`` and the
leaf ``moe_kernels.tolerances``): the op modules and the Triton backends
(``moe_kernels.triton.families``) import it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

# Re-exported: the per-dtype tolerances live in moe_kernels.tolerances (which imports nothing of
# moe_kernels), shared by the tests and the self-checks.
from moe_kernels.tolerances import DEFAULT_TOLERANCES, Tolerance  # noqa: F401

try:
    import moe_kernels._C as _C
except ImportError as exc:  # source tree without a build, or a broken build
    _C = None
    _C_IMPORT_ERROR = f"moe_kernels._C is not built ({exc})"
else:
    _C_IMPORT_ERROR = ""

# Read once: backend selection runs inside torch.compile traces, which cannot call into _C.
_C_HAS_CUDA = bool(_C is not None and _C.build_info()["cuda"])

# Must match csrc/common.h::DType.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2, torch.float16: 3}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class NoBackendError(RuntimeError):
    """No backend of an op family accepts the inputs; the message shows the inputs, then every
    backend with its reasons."""


class Backend:
    """One implementation of an op family. Subclasses set ``name``, implement the family's ops
    and define ``not_supported_reasons(self, <the family's selection arguments>) -> list[str]``
    (see the module docstring)."""

    name = "?"
    tolerances = DEFAULT_TOLERANCES
    # True for a backend that accepts some inputs only when asked for by name: selection then
    # passes ``forced=True`` (asked for by name) or ``forced=False`` (automatic selection) to its
    # not_supported_reasons. The Triton backend uses it for CPU tensors (its slow interpreter).
    takes_forced = False
    # Whether automatic selection runs this backend's first-use self-check before relying on it
    # (see ``first_use_check`` below); None: only the GPU backends, named "cuda" or "triton".
    first_use_check: bool | None = None


class CpuKernels(Backend):
    """A backend whose op ``op`` runs ``_C.<op>_cpu(*args)``."""

    name = "cpu"

    def launch(self, op: str, like: torch.Tensor, *args: Any) -> None:
        getattr(_C, f"{op}_cpu")(*args)


class CudaKernels(Backend):
    """A backend whose op ``op`` runs ``_C.<op>_cuda(*args, stream)`` on ``like``'s device and
    current stream. Subclassing it before a CpuKernels backend reuses that backend's methods."""

    name = "cuda"

    def launch(self, op: str, like: torch.Tensor, *args: Any) -> None:
        with torch.cuda.device(like.device):
            getattr(_C, f"{op}_cuda")(*args, cuda_stream(like))


def cpu_reasons(
    *tensors: torch.Tensor | None, dtypes=(torch.float32, torch.bfloat16, torch.float64)
):
    """Reasons common to the C++ CPU kernels: built module, CPU tensors, contiguous, dtype."""
    reasons = []
    if _C is None:
        reasons.append(_C_IMPORT_ERROR)
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            reasons.append(f"needs CPU tensors, got {t.device}")
            break
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in dtypes:
            reasons.append(f"dtype {t.dtype} not in {[str(d) for d in dtypes]}")
            break
    return reasons


def cuda_reasons(*tensors: torch.Tensor | None, dtypes=None) -> list[str]:
    """Reasons common to the CUDA kernels: built with CUDA, CUDA tensors, supported dtypes."""
    reasons = []
    if _C is None:
        reasons.append(_C_IMPORT_ERROR)
    elif not _C_HAS_CUDA:
        reasons.append("moe_kernels._C was built without CUDA")
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            reasons.append(f"needs CUDA tensors, got {t.device}")
            break
    if dtypes is not None:
        for t in tensors:
            if t is not None and t.is_floating_point() and t.dtype not in dtypes:
                reasons.append(f"dtype {t.dtype} not in {[str(d) for d in dtypes]}")
                break
    return reasons


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer handle for ``_C``."""
    return torch.cuda.current_stream(t.device).cuda_stream


# ---- first-use self-check ----------------------------------------------------------------------

# Op name (as passed to select) -> op family (the module of moe_kernels.ops that owns the list).
OP_FAMILIES = {
    "topk_gating": "topk_gating",
    "topk_gating_backward": "topk_gating",
    "route": "route",
    "dispatch": "dispatch_combine",
    "combine": "dispatch_combine",
    "weight_grad": "dispatch_combine",
    "grouped_mm": "grouped_mm",
    "grouped_mm_dw": "grouped_mm",
    "routing_histogram": "routing_histogram",
}
FIRST_USE_CHECKED = ("cuda", "triton")

# Installed by moe_kernels._first_use when moe_kernels is imported: called as
# ``first_use_check(family, backend_name, dtype, device) -> bool | None`` (True: usable) the first
# time automatic selection picks a checked backend for a (family, dtype, device); a True or False
# answer is kept in ``first_use_verdicts`` for the rest of the process (None: not decided now,
# the backend is used and asked about again at the next call).
first_use_check = None
first_use_verdicts: dict[tuple, bool] = {}


def _passes_first_use(op: str, backend: Backend, inputs: dict[str, Any]) -> bool:
    """Whether ``backend`` passed (or need not take) its first-use self-check for these inputs'
    (family, dtype, device). The key tensor: the first float input, else the first tensor
    (integer ids for route and routing_histogram). Selection inputs are tensors, None or ints;
    this runs on every automatic selection, so it avoids isinstance on torch.Tensor."""
    flag = backend.first_use_check
    if not (backend.name in FIRST_USE_CHECKED if flag is None else flag):
        return True
    t = None
    for v in inputs.values():
        if v is None or v.__class__ is int:
            continue
        if v.dtype.is_floating_point:
            t = v
            break
        if t is None:
            t = v
    if t is None:
        return True
    family = OP_FAMILIES.get(op, op)
    return first_use_verdict(family, backend.name, t.dtype, t.is_cuda, t.get_device())


def first_use_verdict(family: str, name: str, dtype: torch.dtype, cuda: bool, index: int) -> bool:
    """The kept verdict of backend ``name`` of ``family`` for ``dtype`` on the device (CUDA device
    ``index``, or the CPU), running the check the first time. After that, one dict lookup (the
    key holds no torch.device: reading and hashing one costs more than the rest of selection).

    torch.compile does not trace into this function: it is marked as having a constant result
    (what ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo with
    moe_kernels), so Dynamo calls it once, natively, with the constant arguments while tracing,
    and bakes the answer into the graph: the check runs before the op is traced, outside the
    graph, and the compiled code contains nothing of it."""
    key = (family, name, dtype, cuda, index)
    verdict = first_use_verdicts.get(key)
    if verdict is not None:
        return verdict
    if first_use_check is None:
        return True
    device = torch.device("cuda", index) if cuda else torch.device("cpu")
    verdict = first_use_check(family, name, dtype, device)
    if verdict is None:
        return True
    first_use_verdicts[key] = verdict
    return verdict


first_use_verdict._dynamo_marked_constant = True  # type: ignore[attr-defined]


# ---- selection ---------------------------------------------------------------------------------


def _reasons(backend: Backend, inputs: dict[str, Any], forced: bool) -> list[str]:
    if backend.takes_forced:
        return backend.not_supported_reasons(**inputs, forced=forced)
    return backend.not_supported_reasons(**inputs)


def describe(value: Any) -> str:
    """An input as the error message shows it: shape, dtype and device of a tensor, else its
    value."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, {value.dtype}, on {value.device}"
    return repr(value)


def select(op: str, backends: list[Backend], forced: str | None, **inputs: Any) -> Backend:
    """The first backend of ``backends`` with no reasons, or the one named ``forced``.

    Args:
        op: the op's name, for messages.
        backends: the family's backends in automatic order.
        forced: a backend name (``backend=`` of the op), or None for automatic selection.
        **inputs: exactly the family's selection arguments (see the module docstring).

    Raises:
        ValueError: ``forced`` names no backend of the list.
        NoBackendError: no (or not the forced) backend accepts the inputs; the message lists the
            inputs, then every backend tried with its reasons.
        TypeError: ``inputs`` are not the family's selection arguments (a misspelled or missing
            name).
    """
    names = [b.name for b in backends]
    if forced is not None:
        if forced not in names:
            raise ValueError(f"backend: expected one of {names} for {op}, got {forced!r}")
        chosen = [b for b in backends if b.name == forced]
    else:
        chosen = backends
    report = []
    for b in chosen:
        reasons = _reasons(b, inputs, forced=forced is not None)
        if not reasons and (forced is not None or _passes_first_use(op, b, inputs)):
            return b
        if not reasons:
            reasons = ["failed its first-use self-check in this process (warned then)"]
        report.append(f"  {b.name}: " + "; ".join(reasons))
    shown = [f"  {name}: {describe(value)}" for name, value in inputs.items()]
    raise NoBackendError(
        f"no {op} backend accepts these inputs:\n"
        + "\n".join(shown)
        + "\nbackends and why they declined:\n"
        + "\n".join(report)
    )


def backward_backend(
    op: str, backends: list[Backend], forward: str, method: str, **inputs: Any
) -> Backend:
    """The backend that runs backward op ``op`` (the backend method ``method``) of a forward
    that ran on the backend named ``forward``. Every op's backward chooses its backends here.

    The rule: **the backward reuses the forward's backend when that backend implements the
    backward op and accepts the backward's inputs (judged as automatic selection judges them);
    otherwise it selects afresh, in the family's automatic order, among the backends that
    implement it.**

    Why this rule:

    - ``backend="name"`` then means that backend for the whole op, gradients included: a user
      debugging with ``backend="reference"``, or a benchmark timing one backend's forward+backward
      on a GPU, gets what it asked for, and the gradients come from the same kernels (and
      roundings) as the forward values.
    - An automatic forward picked the first backend that took the forward's inputs; the backward's
      inputs live on the same device with the same dtypes, so reusing it is what a fresh selection
      would pick in the common case, and the choice stays stable across forward and backward.
    - A backend with no kernel for the backward (the cpu and triton gating backends) or one that
      declines the backward's inputs (a layout or alignment its forward kernel took but the
      backward's does not) never makes the backward fail: the automatic order then takes the
      first backend that can, ending at the reference, which implements every backward op and
      accepts every input.
    - The backward's ops are not named by the caller, so a backend that takes some inputs only
      when named (``takes_forced``: Triton on CPU tensors, through its one-program-at-a-time
      interpreter, a test tool) is reused only where automatic selection would accept it: on
      CPU tensors the backward of ``backend="triton"`` runs on the C++ cpu backend.

    Args:
        op: the backward op's name, for messages.
        backends: the family's backends in automatic order.
        forward: the name of the backend the forward ran on.
        method: the backend method that implements the backward op.
        **inputs: the family's selection arguments, describing the backward op's inputs.

    Raises: NoBackendError when no backend implementing ``method`` accepts the inputs.
    """
    first = by_name(backends, forward)
    if callable(getattr(first, method, None)) and not _reasons(first, inputs, forced=False):
        return first
    able = [b for b in backends if callable(getattr(b, method, None))]
    return select(op, able, None, **inputs)


def by_name(backends: list[Backend], name: str) -> Backend:
    for b in backends:
        if b.name == name:
            return b
    raise ValueError(f"backend: expected one of {[b.name for b in backends]}, got {name!r}")


# ---- argument checks shared by the op wrappers (metadata only: no host sync) -----------------


def check_tensor(name: str, t: Any, *, ndim: int | None = None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (like the first input), got {t.device}"
        )


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape "
            f"{tuple(t.shape)}; call .contiguous() first"
        )


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def weight_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Gate weights are fp32, or fp64 alongside fp64 activations (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- data checks (they read tensor values: CPU tensors only, never while tracing) -------------
#
# An op reads the values of an argument only where that costs no device synchronisation (a CPU
# tensor) and no graph break (outside torch.compile tracing); each op's docstring says what its
# CUDA path does instead. Tensors an op of this package produced valid (a RoutingPlan built by
# ``route``) carry a mark with their version counter, so a later op skips the read unless they
# were modified in place since.

_VALID = "_moe_kernels_valid_version"


def reads_data(t: torch.Tensor) -> bool:
    """Whether a data check may read ``t``: a CPU tensor, outside torch.compile tracing and any
    dispatch mode (fake tensors, make_fx), where values cannot be read."""
    return (
        not torch.compiler.is_compiling()  # first: nothing of ``t`` enters a traced graph
        and torch._C._len_torch_dispatch_stack() == 0
        and t.is_cpu
    )


def mark_valid(*tensors: torch.Tensor) -> None:
    """Mark tensors this package just produced valid (see :func:`is_marked_valid`). Inference
    tensors have no version counter, so they can never be proven unmodified: never marked."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if not t.is_inference():
            setattr(t, _VALID, t._version)


def is_marked_valid(t: torch.Tensor) -> bool:
    """Whether ``t`` was marked by :func:`mark_valid` and not modified in place since."""
    v = getattr(t, _VALID, None)
    # A marked tensor is no inference tensor (those are never marked), so it has a version.
    return v is not None and v == t._version


def check_int_range(
    name: str, t: torch.Tensor, lo: int, hi: int, what: str, note: str = ""
) -> None:
    """ValueError naming ``name`` unless every value of the integer tensor ``t`` is in
    ``[lo, hi)``: one min/max pass, then a search for the first bad value only on failure.
    The message reads "{name}: expected {what} in [lo, hi){note}, got {name}[i] = value"."""
    if t.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.aminmax(t))
    if lo <= mn and mx < hi:
        return
    bad_value = mn if mn < lo else mx
    at = [int(i) for i in (t == bad_value).nonzero()[0]]
    where = f"{name}[{', '.join(map(str, at))}]"
    raise ValueError(f"{name}: expected {what} in [{lo}, {hi}){note}, got {where} = {bad_value}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """ValueError naming ``name`` and the first NaN or inf of the float tensor ``t``."""
    ok = torch.isfinite(t)
    if bool(ok.all()):
        return
    at = [int(i) for i in (~ok).nonzero()[0]]
    where = f"{name}[{', '.join(map(str, at))}]"
    raise ValueError(f"{name}: expected finite values, got {where} = {t[tuple(at)].item()}")


def check_offsets(name: str, offsets: list[int], n: int, rows: str) -> None:
    """ValueError naming ``name`` unless ``offsets`` starts at 0, never decreases and ends at
    most at ``n`` (the rows of ``rows``)."""
    if offsets[0] == 0 and offsets[-1] <= n and all(map(operator.le, offsets, offsets[1:])):
        return
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] = 0, got {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"{name}: expected non-decreasing offsets, got {name}[{i}] = {offsets[i]} < "
                f"{name}[{i - 1}] = {offsets[i - 1]}"
            )
    raise ValueError(
        f"{name}: expected offsets <= {n} (the rows of {rows}), got "
        f"{name}[{len(offsets) - 1}] = {offsets[-1]}"
    )
