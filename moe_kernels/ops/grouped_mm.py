"""Grouped GEMM: one matmul per expert over its contiguous rows.

Legend: N rows, D input dim, F output dim, E experts. ``y_NF[rows of e] = x_ND[rows of e] @
w_EDF[e]``; rows past ``offsets_E1[E]`` (capacity padding) are zero; empty experts are allowed.
Backward: d x = grouped_mm(d y, w^T) and d w[e] = x_e^T d y_e (zero for empty experts).
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _backend as B

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


class ReferenceGroupedMM(B.Backend):
    name = "reference"

    def forward(self, x, w, offsets):
        return grouped_mm_reference(x, w, offsets)

    def dw(self, x, dy, offsets):
        return grouped_mm_dw_reference(x, dy, offsets)


class CpuGroupedMM(B.Backend):
    """CPU through torch: ``torch._grouped_mm`` when it takes the inputs, else the mm loop."""

    name = "cpu"

    def not_supported_reasons(self, x, w, **_):
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


BACKENDS: list[B.Backend] = [
    B.NotImplementedBackend("cuda", "no CUDA grouped GEMM in this version"),
    B.triton_backend("grouped_mm"),
    CpuGroupedMM(),
    ReferenceGroupedMM(),
]


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str
) -> torch.Tensor:
    return B.by_name(BACKENDS, backend).forward(x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, backend):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, backend: str
) -> torch.Tensor:
    return B.by_name(BACKENDS, backend).dw(x, dy, offsets)


@_grouped_mm_dw_op.register_fake
def _(x, dy, offsets, backend):
    return x.new_empty(offsets.shape[0] - 1, x.shape[1], dy.shape[1])


def _setup(ctx, inputs, output):
    x, w, offsets, backend = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        wt = w.transpose(1, 2)
        chosen = B.select("grouped_mm", BACKENDS, None, x=dy, w=wt)
        dx = _grouped_mm_op(dy, wt, offsets, chosen.name)
    if ctx.needs_input_grad[1]:
        dw = _grouped_mm_dw_op(x, dy, offsets, ctx.backend)
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
    Raises: TypeError/ValueError naming the argument for dtype, rank, device or shape mismatches.
    """
    B.check_tensor("x_ND", x_ND, ndim=2, dtypes=B.FLOAT_DTYPES)
    B.check_tensor("w_EDF", w_EDF, ndim=3, dtypes=(x_ND.dtype,), device=x_ND.device)
    B.check_tensor(
        "offsets_E1", offsets_E1, ndim=1, dtypes=(torch.int32, torch.int64), device=x_ND.device
    )
    if w_EDF.shape[1] != x_ND.shape[1]:
        raise ValueError(
            f"w_EDF: expected shape (E, {x_ND.shape[1]}, F) to match x_ND's D, "
            f"got {tuple(w_EDF.shape)}"
        )
    B.check_shape("offsets_E1", offsets_E1, (w_EDF.shape[0] + 1,))
    chosen = B.select("grouped_mm", BACKENDS, backend, x=x_ND, w=w_EDF)
    return _grouped_mm_op(x_ND, w_EDF, offsets_E1, chosen.name)
