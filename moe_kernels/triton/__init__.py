"""Triton kernels of moe_kernels: a second GPU backend for each op family.

Kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` they also run on CPU tensors through
Triton's interpreter (slow, for tests), and are then chosen only when ``backend="triton"`` is
forced. Importing this package does not import triton; the kernels are loaded on first use.

Besides the op backends (``families.py``), the package offers a fused expert GEMM that gathers
its input rows straight from the token rows (not wired into the layer):
:func:`gather_grouped_mm` and its weight gradient :func:`gather_grouped_mm_dw`.
"""

from __future__ import annotations

import torch


def _check_gather(x_TD, offsets_E1, row_token_N, *, w_EDF=None, dy_NF=None):
    from moe_kernels.ops import _select as S
    from moe_kernels.triton import families

    S.check_tensor("x_TD", x_TD, ndim=2, dtypes=families.DTYPES)
    dev, D = x_TD.device, x_TD.shape[1]
    S.check_tensor("row_token_N", row_token_N, ndim=1, dtypes=(torch.int32,), device=dev)
    S.check_contiguous("row_token_N", row_token_N)
    S.check_tensor("offsets_E1", offsets_E1, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    S.check_contiguous("offsets_E1", offsets_E1)
    if w_EDF is not None:
        S.check_tensor("w_EDF", w_EDF, ndim=3, dtypes=(x_TD.dtype,), device=dev)
        if w_EDF.shape[1] != D:
            raise ValueError(
                f"w_EDF: expected shape (E, {D}, F) to match x_TD's D, got {tuple(w_EDF.shape)}"
            )
        S.check_shape("offsets_E1", offsets_E1, (w_EDF.shape[0] + 1,))
    if dy_NF is not None:
        S.check_tensor("dy_NF", dy_NF, ndim=2, dtypes=(x_TD.dtype,), device=dev)
        if dy_NF.shape[0] != row_token_N.shape[0]:
            raise ValueError(
                f"dy_NF: expected {row_token_N.shape[0]} rows (row_token_N's N), "
                f"got shape {tuple(dy_NF.shape)}"
            )
        if offsets_E1.shape[0] < 1:
            raise ValueError("offsets_E1: expected shape (E + 1,) with E >= 0, got (0,)")
    reasons = families.device_reasons(x_TD, forced=True)
    if reasons:
        raise ValueError(f"x_TD: the Triton kernels cannot run on it: {'; '.join(reasons)}")


def gather_grouped_mm(x_TD, w_EDF, offsets_E1, row_token_N):
    """``grouped_mm(x_TD[row_token_N], w_EDF, offsets_E1)`` with the token rows gathered inside
    the GEMM (no permuted copy of the activations). Forward only.

    Args:
        x_TD: (T, D) token rows, fp32/bf16/fp16, any strides.
        w_EDF: (E, D, F) expert weights, same dtype and device, any strides.
        offsets_E1: (E + 1,) int32/int64 row offsets (``RoutingPlan.offsets_E1``).
        row_token_N: (N,) int32 token of each row, -1 for padding (``RoutingPlan.row_token_N``).

    Returns: (N, F) in expert order; rows past ``offsets_E1[E]`` are zero. Equals
    ``grouped_mm(dispatch(x_TD, plan), w_EDF, plan.offsets_E1)``.
    Raises: TypeError/ValueError naming the argument; ValueError when the Triton kernels cannot
    run on these tensors (no triton, or CPU tensors without ``TRITON_INTERPRET=1``).
    """
    _check_gather(x_TD, offsets_E1, row_token_N, w_EDF=w_EDF)
    from moe_kernels.triton import families, grouped_mm

    with families.on_device(x_TD):
        return grouped_mm.gather_grouped_mm(x_TD, w_EDF, offsets_E1, row_token_N)


def gather_grouped_mm_dw(x_TD, dy_NF, offsets_E1, row_token_N):
    """Weight gradient of :func:`gather_grouped_mm`: (E, D, F) with ``dw[e] =
    x_TD[row_token_N[rows of e]]^T @ dy_NF[rows of e]`` (zero for empty experts), again without
    the gathered copy. ``dy_NF``: (N, F), same dtype and device as ``x_TD``; other arguments as
    in :func:`gather_grouped_mm`."""
    _check_gather(x_TD, offsets_E1, row_token_N, dy_NF=dy_NF)
    from moe_kernels.triton import families, grouped_mm

    with families.on_device(x_TD):
        return grouped_mm.gather_grouped_mm_dw(x_TD, dy_NF, offsets_E1, row_token_N)
