"""Grouped GEMM: one matmul per expert over its contiguous rows.

Legend: N rows, D input dim, F output dim, E experts. ``y_NF[rows of e] = x_ND[rows of e] @
w_EDF[e]``; rows past ``offsets_E1[E]`` (capacity padding) are zero; empty experts are allowed.
Backward: d x = grouped_mm(d y, w^T) and d w[e] = x_e^T d y_e (zero for empty experts).
"""

from __future__ import annotations

import functools

import torch

from moe_kernels.ops import _select as S
from moe_kernels.triton import families

_HAS_TORCH_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _zero_tail(y_NF, offsets_E1):
    """Zero rows past the last expert (capacity padding). CPU only: reading the offset is free."""
    n = int(offsets_E1[-1])
    if n < y_NF.shape[0]:
        y_NF[n:].zero_()
    return y_NF


def grouped_mm_reference(x_ND, w_EDF, offsets_E1):
    """Per-expert ``torch.mm`` loop (reads the offsets on the host)."""
    y = x_ND.new_zeros(x_ND.shape[0], w_EDF.shape[2])
    bounds = offsets_E1.tolist()
    for e in range(w_EDF.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = x_ND[lo:hi] @ w_EDF[e]
    return y


def grouped_mm_dw_reference(x_ND, dy_NF, offsets_E1):
    E = offsets_E1.shape[0] - 1
    dw = x_ND.new_zeros(E, x_ND.shape[1], dy_NF.shape[1])
    bounds = offsets_E1.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            dw[e] = x_ND[lo:hi].t() @ dy_NF[lo:hi]
    return dw


def _torch_grouped_mm_reasons(x, w):
    reasons = []
    if not _HAS_TORCH_GROUPED_MM:
        reasons.append("torch._grouped_mm is not available in this torch")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"torch._grouped_mm does not take {x.dtype}")
    elif (x.shape[1] * x.element_size()) % 16 or (w.shape[2] * w.element_size()) % 16:
        reasons.append("torch._grouped_mm needs D and F rows that are multiples of 16 bytes")
    return reasons


# ---- CUDA: CUTLASS grouped GEMM (csrc/cuda/gemm) -------------------------------------------

# Kernel families compiled into _C (80: CUTLASS 2 for sm_80 and later, 90: CUTLASS 3 for sm_90a).
# Read once: backend selection runs inside torch.compile traces, which cannot call into _C.
_CUDA_GEMM_ARCHS = (
    tuple(S._C.grouped_mm_cuda_archs())
    if S._C_HAS_CUDA and hasattr(S._C, "grouped_mm_cuda_archs")
    else ()
)
_CUDA_GEMM_DTYPES = (torch.bfloat16, torch.float16)
# Must match csrc/cuda/gemm/grouped_mm.h::Kind.
_FORWARD_B_ROW, _FORWARD_B_COL, _WEIGHT_GRAD = 0, 1, 2
_ALIGN = 8  # elements of 2 bytes per 16 bytes: TMA and cp.async need 16-byte aligned rows


def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


# A device's capability is fixed, so torch.compile may treat it as a constant instead of tracing
# into CUDA. Only CUDA builds of torch can reach this (CUDA tensors); marking it on a CPU build
# would import torch._dynamo with moe_kernels for nothing (about 1 s).
if torch.version.cuda is not None:
    _device_capability = torch.compiler.assume_constant_result(_device_capability)


def _kernel_arch(device: torch.device) -> int | None:
    """Hopper kernels on sm_90, Ampere kernels on any other sm_80 or later (PTX beyond sm_8x)."""
    cap = _device_capability(device)
    if cap == (9, 0) and 90 in _CUDA_GEMM_ARCHS:
        return 90
    if cap >= (8, 0) and 80 in _CUDA_GEMM_ARCHS:
        return 80
    return None


def _b_layout(w_EDF: torch.Tensor) -> tuple[int, int] | None:
    """(kind, leading dimension) of each expert's D x F matrix, or None without a unit stride."""
    _, sD, sF = w_EDF.stride()
    if sF == 1:
        return _FORWARD_B_ROW, sD
    if sD == 1:
        return _FORWARD_B_COL, sF
    return None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _workspace_bytes(arch: int, kind: int, dtype: int, E: int, D: int, F: int, sms: int) -> int:
    return S._C.grouped_mm_workspace_bytes(arch, kind, dtype, E, D, F, sms)


def _cuda_grouped_mm_reasons(x: torch.Tensor, w: torch.Tensor) -> list[str]:
    reasons = S.cuda_reasons(x, w, dtypes=_CUDA_GEMM_DTYPES)
    if not reasons and not _CUDA_GEMM_ARCHS:
        reasons.append("moe_kernels._C was built without the CUTLASS grouped GEMM (MOE_CUTLASS)")
    if reasons:
        return reasons
    if _kernel_arch(x.device) is None:
        cap = _device_capability(x.device)
        reasons.append(
            f"no kernels for compute capability {cap[0]}.{cap[1]} in this build "
            f"(compiled: {['sm' + str(a) for a in _CUDA_GEMM_ARCHS]}; needs >= 8.0)"
        )
    D, F = w.shape[1], w.shape[2]
    if D % _ALIGN or F % _ALIGN:
        reasons.append(
            f"D and F must be multiples of {_ALIGN} (16-byte aligned rows for TMA/cp.async), "
            f"got D={D}, F={F}"
        )
    layout = _b_layout(w)
    if layout is None:
        reasons.append(f"w_EDF: needs a unit stride along D or F, got strides {w.stride()}")
    elif layout[1] <= 0 or layout[1] % _ALIGN or w.stride(0) % _ALIGN:
        reasons.append(
            f"w_EDF: strides {w.stride()} must be multiples of {_ALIGN} elements "
            "(16-byte aligned TMA leading dimensions)"
        )
    if w.shape[0] > 65535:
        reasons.append(f"at most 65535 experts, got {w.shape[0]}")
    return reasons


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor starting 16-byte aligned; copied only when it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _aligned_start(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself when it starts 16-byte aligned (its strides are checked at selection), else
    a contiguous copy: a view into the middle of a storage is rare enough to copy."""
    return w if w.data_ptr() % 16 == 0 else w.clone(memory_format=torch.contiguous_format)


class CudaGroupedMM(S.Backend):
    """CUTLASS grouped GEMM, bf16/fp16 with fp32 accumulation: sm_90a pointer-array kernels
    (TMA, WGMMA) on Hopper, sm_80 grouped kernels elsewhere. Per-expert shapes are built on device
    from the offsets, so a call never synchronises and can be captured in a CUDA graph."""

    name = "cuda"

    def not_supported_reasons(self, x, w):
        return _cuda_grouped_mm_reasons(x, w)

    def forward(self, x, w, offsets):
        (N, D), (E, _, F) = x.shape, w.shape
        y = x.new_empty(N, F)
        if N == 0 or F == 0:
            return y
        if E == 0 or D == 0:
            return y.zero_()  # every row is padding, or every product is empty
        w = _aligned_start(w)
        kind, ldb = _b_layout(w)
        self._launch(kind, _aligned_rows(x), w, y, offsets, E, N, D, F, ldb, w.stride(0))
        return y

    def dw(self, x, dy, offsets):
        (N, D), F, E = x.shape, dy.shape[1], offsets.shape[0] - 1
        dw = x.new_empty(E, D, F)
        if dw.numel() == 0:
            return dw
        if N == 0:
            return dw.zero_()  # every expert is empty
        x, dy = _aligned_rows(x), _aligned_rows(dy)
        self._launch(_WEIGHT_GRAD, x, dy, dw, offsets, E, N, D, F, 0, 0)
        return dw

    @staticmethod
    def _launch(kind, x, b, out, offsets, E, N, D, F, ldb, b_group_stride):
        device = x.device
        arch = _kernel_arch(device)
        dtype = S.DTYPE_CODES[x.dtype]
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        nbytes = _workspace_bytes(arch, kind, dtype, E, D, F, sms)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
        offsets = offsets.contiguous()
        with torch.cuda.device(device):
            S._C.grouped_mm_cuda(
                arch,
                kind,
                dtype,
                S.ptr(x),
                S.ptr(b),
                S.ptr(out),
                S.ptr(offsets),
                offsets.dtype == torch.int64,
                E,
                N,
                D,
                F,
                ldb,
                b_group_stride,
                sms,
                S.ptr(workspace),
                nbytes,
                S.cuda_stream(x),
            )


class ReferenceGroupedMM(S.Backend):
    name = "reference"

    def not_supported_reasons(self, x, w):
        return []

    def forward(self, x, w, offsets):
        return grouped_mm_reference(x, w, offsets)

    def dw(self, x, dy, offsets):
        return grouped_mm_dw_reference(x, dy, offsets)


class CpuGroupedMM(S.Backend):
    """CPU through torch: ``torch._grouped_mm`` when it takes the inputs, else the mm loop."""

    name = "cpu"

    def not_supported_reasons(self, x, w):
        return [] if x.device.type == "cpu" else [f"needs CPU tensors, got {x.device}"]

    def forward(self, x, w, offsets):
        if _torch_grouped_mm_reasons(x, w):
            return grouped_mm_reference(x, w, offsets)
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[2])
        y = torch._grouped_mm(x, w, offs=offsets[1:].to(torch.int32))
        return _zero_tail(y, offsets)

    def dw(self, x, dy, offsets):
        if _torch_grouped_mm_reasons(x, dy.unsqueeze(0)) or x.shape[0] == 0:
            return grouped_mm_dw_reference(x, dy, offsets)
        # Rows past the last expert are not covered by any group, so they do not contribute.
        return torch._grouped_mm(x.t(), dy, offs=offsets[1:].to(torch.int32))


BACKENDS: list[S.Backend] = [
    CudaGroupedMM(),
    families.make("grouped_mm"),
    CpuGroupedMM(),
    ReferenceGroupedMM(),
]


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str
) -> torch.Tensor:
    return S.by_name(BACKENDS, backend).forward(x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, backend):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, backend: str
) -> torch.Tensor:
    return S.by_name(BACKENDS, backend).dw(x, dy, offsets)


@_grouped_mm_dw_op.register_fake
def _(x, dy, offsets, backend):
    return x.new_empty(offsets.shape[0] - 1, x.shape[1], dy.shape[1])


def _setup(ctx, inputs, output):
    x, w, offsets, backend = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, dy):
    """dx = grouped_mm(dy, w^T) and dw through grouped_mm_dw, each on the backend that the one
    backward rule picks (moe_kernels.ops._select.backward_backend). The dw op's selection
    arguments are x and w: its output has w's shape, dtype and device."""
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        wt = w.transpose(1, 2)
        chosen = S.backward_backend("grouped_mm", BACKENDS, ctx.backend, "forward", x=dy, w=wt)
        dx = _grouped_mm_op(dy, wt, offsets, chosen.name)
    if ctx.needs_input_grad[1]:
        chosen = S.backward_backend("grouped_mm_dw", BACKENDS, ctx.backend, "dw", x=x, w=w)
        dw = _grouped_mm_dw_op(x, dy, offsets, chosen.name)
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets_E1: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Per-expert matmul: rows [offsets_E1[e], offsets_E1[e+1]) of ``x_ND`` times ``w_EDF[e]``.

    Args:
        x_ND: (N, D) rows in expert order (for example ``dispatch``'s output).
        w_EDF: (E, D, F) expert weights, same dtype and device as ``x_ND``.
        offsets_E1: (E + 1,) int32/int64 row offsets, ``offsets_E1[0] == 0``, non-decreasing,
            ``offsets_E1[E] <= N`` (``RoutingPlan.offsets_E1``).

    Returns: (N, F); rows past ``offsets_E1[E]`` are zero. Differentiable in x and w.
    Raises: TypeError/ValueError naming the argument for dtype, rank, device or shape mismatches,
    and on CPU for offsets that do not start at 0, decrease or exceed N (the offsets of a plan
    that ``route`` built, unmodified, are valid by construction and not read again). The CUDA
    and Triton kernels read the offsets on the device only, so they cannot raise without a host
    synchronisation: they clamp every offset into [0, N] and treat a group whose end precedes
    its start as empty; they never read or write outside ``x_ND``, ``w_EDF`` or the output, but
    such offsets give a result no valid offsets give.
    """
    S.check_tensor("x_ND", x_ND, ndim=2, dtypes=S.FLOAT_DTYPES)
    S.check_tensor("w_EDF", w_EDF, ndim=3, dtypes=(x_ND.dtype,), device=x_ND.device)
    S.check_tensor(
        "offsets_E1", offsets_E1, ndim=1, dtypes=(torch.int32, torch.int64), device=x_ND.device
    )
    if w_EDF.shape[1] != x_ND.shape[1]:
        raise ValueError(
            f"w_EDF: expected shape (E, {x_ND.shape[1]}, F) to match x_ND's D, "
            f"got {tuple(w_EDF.shape)}"
        )
    S.check_shape("offsets_E1", offsets_E1, (w_EDF.shape[0] + 1,))
    if S.reads_data(offsets_E1) and not S.is_marked_valid(offsets_E1):
        S.check_offsets("offsets_E1", offsets_E1.tolist(), x_ND.shape[0], "x_ND")
    chosen = S.select("grouped_mm", BACKENDS, backend, x=x_ND, w=w_EDF)
    return _grouped_mm_op(x_ND, w_EDF, offsets_E1, chosen.name)
