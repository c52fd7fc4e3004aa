"""Backend dispatch shared by every op family.

Each op family keeps an ordered list of backends (``cuda``, ``triton``, ``cpu``, ``reference``).
A backend says why it cannot run some inputs through ``not_supported_reasons(**inputs)``; the
first backend with no reasons wins, ``backend="name"`` forces one, and when none fits the error
lists every backend with its reasons. Reasons look only at metadata (device, dtype, shape), never
at data, so selection is free of host synchronisation and traceable by ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    from moe_kernels import _C
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
    """No backend of an op family accepts the inputs; the message lists every backend's reasons."""


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# Per-dtype tolerances for float outputs compared with the fp32/fp64 reference.
DEFAULT_TOLERANCES = {
    torch.float64: Tolerance(1e-10, 1e-8),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.bfloat16: Tolerance(2e-2, 2e-2),
    torch.float16: Tolerance(2e-3, 2e-3),
}


class Backend:
    """One implementation of an op family. Subclasses set ``name`` and implement the op."""

    name = "?"
    tolerances = DEFAULT_TOLERANCES
    # True for a backend that accepts some inputs only when asked for by name: select() then
    # passes ``forced=True`` (backend="name") or ``forced=False`` (automatic selection) to its
    # not_supported_reasons. The Triton backend uses it for CPU tensors (its slow interpreter).
    takes_forced = False

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        return []


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


class NotImplementedBackend(Backend):
    """Placeholder slot in the ordered list for a backend this op family does not have yet."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self._why = why

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        return [self._why]


def cpu_reasons(*tensors: torch.Tensor, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
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


def cuda_reasons(*tensors: torch.Tensor, dtypes=None) -> list[str]:
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


def triton_backend(family: str) -> Backend:
    """The Triton backend of an op family (``moe_kernels.triton.families``; not named
    ``backends``: torch.compile never traces files under a path containing "triton/backends",
    and selection calls their not_supported_reasons inside compiled code)."""
    from moe_kernels.triton import families

    return families.make(family)


def select(op: str, backends: list[Backend], forced: str | None, **inputs: Any) -> Backend:
    """The first backend with no reasons (or the forced one); NoBackendError otherwise."""
    names = [b.name for b in backends]
    if forced is not None:
        if forced not in names:
            raise ValueError(f"backend: expected one of {names} for {op}, got {forced!r}")
        chosen = [b for b in backends if b.name == forced]
    else:
        chosen = backends
    report = []
    for b in chosen:
        if b.takes_forced:
            reasons = b.not_supported_reasons(**inputs, forced=forced is not None)
        else:
            reasons = b.not_supported_reasons(**inputs)
        if not reasons:
            return b
        report.append(f"  {b.name}: " + "; ".join(reasons))
    raise NoBackendError(f"no {op} backend accepts these inputs:\n" + "\n".join(report))


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
