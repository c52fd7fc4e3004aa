"""Combine: the weighted un-permute from expert rows back to tokens (the adjoint of dispatch).

Legend: N plan rows, D model dim, T tokens, K top-k. ``out_TD[t] = sum_k w[t, k] *
y_ND[slot_row[t, k]]``, summed in slot order in fp32 (fp64 for fp64); dropped slots add 0.
Backward: d y = dispatch(d out, weights), d w[t, k] = <d out[t], y_ND[row]>.
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _select as B
from moe_kernels.ops.dispatch import check_plan, check_weights, cuda_permute_reasons
from moe_kernels.ops.route import RoutingPlan


def combine_reference(y_ND, slot_row_TK, weights_TK=None):
    acc = B.weight_dtype_for(y_ND.dtype)
    T, K = slot_row_TK.shape
    out = torch.zeros(T, y_ND.shape[1], dtype=acc, device=y_ND.device)
    for k in range(K):
        row = slot_row_TK[:, k].long()
        valid = (row >= 0).unsqueeze(-1)
        v = y_ND[row.clamp(min=0)].to(acc) if y_ND.shape[0] else out.new_zeros(out.shape)
        if weights_TK is not None:
            v = v * weights_TK[:, k].to(acc).unsqueeze(-1)
        out = out + torch.where(valid, v, 0)
    return out.to(y_ND.dtype)


def weight_grad_reference(a_TD, b_ND, slot_row_TK, wdtype):
    acc = B.weight_dtype_for(a_TD.dtype)
    row = slot_row_TK.long()
    if b_ND.shape[0] == 0:
        return torch.zeros(slot_row_TK.shape, dtype=wdtype, device=a_TD.device)
    rows = b_ND[row.clamp(min=0)].to(acc)  # (T, K, D)
    dot = (rows * a_TD.to(acc).unsqueeze(1)).sum(-1)
    return torch.where(row >= 0, dot, 0).to(wdtype)


class ReferenceCombine(B.Backend):
    name = "reference"

    def forward(self, y, slot_row, weights):
        return combine_reference(y, slot_row, weights)

    def weight_grad(self, a, b, slot_row, wdtype):
        return weight_grad_reference(a, b, slot_row, wdtype)


class CpuCombine(B.CpuKernels):
    def not_supported_reasons(self, y, weights=None, **_):
        return B.cpu_reasons(y, weights)

    def forward(self, y, slot_row, weights):
        N, D = y.shape
        T, K = slot_row.shape
        out = torch.empty(T, D, dtype=y.dtype, device=y.device)
        wcode = B.DTYPE_CODES[weights.dtype] if weights is not None else 0
        self.launch(
            "combine",
            y,
            B.ptr(y),
            B.DTYPE_CODES[y.dtype],
            N,
            D,
            B.ptr(slot_row),
            T,
            K,
            B.ptr(weights),
            wcode,
            B.ptr(out),
        )
        return out

    def weight_grad(self, a, b, slot_row, wdtype):
        T, K = slot_row.shape
        out = torch.empty(T, K, dtype=wdtype, device=a.device)
        self.launch(
            "weight_grad",
            a,
            B.ptr(a),
            B.ptr(b),
            B.DTYPE_CODES[a.dtype],
            T,
            a.shape[1],
            K,
            B.ptr(slot_row),
            B.ptr(out),
            B.DTYPE_CODES[wdtype],
        )
        return out


class CudaCombine(B.CudaKernels, CpuCombine):
    """CpuCombine's launch layout on the CUDA kernels (csrc/cuda/permute.cu)."""

    name = "cuda"

    def not_supported_reasons(self, y, weights=None, **_):
        return cuda_permute_reasons(y, weights)

    def weight_grad(self, a, b, slot_row, wdtype):
        if a.dtype != b.dtype:
            raise TypeError(
                f"weight_grad: expected a and b of one dtype, got {a.dtype} and {b.dtype}"
            )
        if wdtype not in (torch.float32, torch.float64):
            raise TypeError(f"weight_grad: expected wdtype float32 or float64, got {wdtype}")
        return super().weight_grad(a, b, slot_row, wdtype)


BACKENDS: list[B.Backend] = [
    CudaCombine(),
    B.triton_backend("combine"),
    CpuCombine(),
    ReferenceCombine(),
]


@torch.library.custom_op("moe_kernels::combine", mutates_args=())
def _combine_op(
    y: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    weights: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return B.by_name(BACKENDS, backend).forward(y, slot_row, weights)


@_combine_op.register_fake
def _(y, row_slot, slot_row, weights, backend):
    return y.new_empty(slot_row.shape[0], y.shape[1])


@torch.library.custom_op("moe_kernels::weight_grad", mutates_args=())
def _weight_grad_op(
    a: torch.Tensor, b: torch.Tensor, slot_row: torch.Tensor, wdtype: torch.dtype, backend: str
) -> torch.Tensor:
    """grad_w_TK[t, k] = <a_TD[t], b_ND[slot_row[t, k]]> (0 for dropped slots)."""
    return B.by_name(BACKENDS, backend).weight_grad(a, b, slot_row, wdtype)


@_weight_grad_op.register_fake
def _(a, b, slot_row, wdtype, backend):
    return a.new_empty(slot_row.shape, dtype=wdtype)


def _setup(ctx, inputs, output):
    y, row_slot, slot_row, weights, _ = inputs
    ctx.save_for_backward(y if weights is not None else None, row_slot, slot_row, weights)


def _backward(ctx, grad_TD):
    from moe_kernels.ops.dispatch import dispatch_tensors

    y, row_slot, slot_row, weights = ctx.saved_tensors
    grad_TD = grad_TD.contiguous()
    dy = dispatch_tensors(grad_TD, row_slot, slot_row, weights)
    dw = None
    if weights is not None and ctx.needs_input_grad[3]:
        dw = weight_grad_tensors(grad_TD, y, slot_row, weights.dtype)
    return dy, None, None, dw, None


_combine_op.register_autograd(_backward, setup_context=_setup)


def combine_tensors(y_ND, row_slot_N, slot_row_TK, weights_TK=None, backend=None):
    """Combine on raw plan tensors (inputs already validated)."""
    chosen = B.select("combine", BACKENDS, backend, y=y_ND, weights=weights_TK)
    return _combine_op(y_ND, row_slot_N, slot_row_TK, weights_TK, chosen.name)


def weight_grad_tensors(a_TD, b_ND, slot_row_TK, wdtype, backend=None):
    chosen = B.select("combine", BACKENDS, backend, y=b_ND)
    return _weight_grad_op(a_TD.contiguous(), b_ND.contiguous(), slot_row_TK, wdtype, chosen.name)


def combine(
    y_ND: torch.Tensor,
    weights_TK: torch.Tensor | None,
    plan: RoutingPlan,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted un-permute of expert outputs ``y_ND`` (N, D) back to tokens, shape (T, D).

    ``weights_TK`` (T, K) are the gate weights (None = unit weights). Dropped slots contribute
    zero, so a fully dropped token gets a zero row (the layer adds its residual). Differentiable
    in ``y_ND`` and ``weights_TK``. Raises TypeError/ValueError naming the argument.
    """
    B.check_tensor("y_ND", y_ND, ndim=2, dtypes=B.FLOAT_DTYPES)
    B.check_contiguous("y_ND", y_ND)
    check_plan(plan, y_ND)
    if y_ND.shape[0] != plan.num_rows:
        raise ValueError(
            f"y_ND: expected {plan.num_rows} rows (plan.num_rows), got {y_ND.shape[0]}"
        )
    weights_TK = check_weights(weights_TK, plan, y_ND)
    return combine_tensors(y_ND, plan.row_slot_N, plan.slot_row_TK, weights_TK, backend)
