"""Dispatch: gather token rows into expert-contiguous rows (the adjoint of combine).

Legend: T tokens, D model dim, K top-k, N plan rows. ``x_ND[n] = w[slot] * x_TD[token]`` for the
(token, slot) held by row n (unit weight when ``weights_TK`` is None), zero for padding rows.
Backward: d x = combine(d x_ND) (each token sums its K rows in order: deterministic) and, for
weights, d w[t, k] = <d x_ND[row], x_TD[t]>.
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _select as B
from moe_kernels.ops.route import RoutingPlan


def dispatch_reference(x_TD, row_slot_N, K, weights_TK=None):
    valid = row_slot_N >= 0
    slot = row_slot_N.long().clamp(min=0)
    out = x_TD[torch.div(slot, K, rounding_mode="floor")]
    if weights_TK is not None:
        acc = B.weight_dtype_for(x_TD.dtype)
        out = (out.to(acc) * weights_TK.reshape(-1)[slot].unsqueeze(-1).to(acc)).to(x_TD.dtype)
    return torch.where(
        valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )


class ReferenceDispatch(B.Backend):
    name = "reference"

    def forward(self, x, row_slot, K, weights):
        return dispatch_reference(x, row_slot, K, weights)


class CpuDispatch(B.CpuKernels):
    def not_supported_reasons(self, x, weights=None, **_):
        return B.cpu_reasons(x, weights)

    def forward(self, x, row_slot, K, weights):
        T, D = x.shape
        N = row_slot.shape[0]
        out = torch.empty(N, D, dtype=x.dtype, device=x.device)
        wcode = B.DTYPE_CODES[weights.dtype] if weights is not None else 0
        self.launch(
            "dispatch",
            x,
            B.ptr(x),
            B.DTYPE_CODES[x.dtype],
            T,
            D,
            K,
            B.ptr(row_slot),
            N,
            B.ptr(weights),
            wcode,
            B.ptr(out),
        )
        return out


# Storage dtypes of the CUDA permute kernels (csrc/cuda/permute.cu); gate weights are fp32/fp64.
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CUDA_WEIGHT_DTYPES = (torch.float32, torch.float64)


def cuda_permute_reasons(t: torch.Tensor, weights: torch.Tensor | None) -> list[str]:
    """Why the CUDA dispatch/combine kernels cannot take ``t`` (and ``weights``)."""
    reasons = B.cuda_reasons(t, weights, dtypes=CUDA_DTYPES)
    if weights is not None and weights.dtype not in CUDA_WEIGHT_DTYPES:
        reasons.append(f"weights dtype {weights.dtype} not in [torch.float32, torch.float64]")
    return reasons


class CudaDispatch(B.CudaKernels, CpuDispatch):
    """CpuDispatch's launch layout on the CUDA kernels (csrc/cuda/permute.cu)."""

    name = "cuda"

    def not_supported_reasons(self, x, weights=None, **_):
        return cuda_permute_reasons(x, weights)


BACKENDS: list[B.Backend] = [
    CudaDispatch(),
    B.triton_backend("dispatch"),
    CpuDispatch(),
    ReferenceDispatch(),
]


@torch.library.custom_op("moe_kernels::dispatch", mutates_args=())
def _dispatch_op(
    x: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    weights: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return B.by_name(BACKENDS, backend).forward(x, row_slot, slot_row.shape[1], weights)


@_dispatch_op.register_fake
def _(x, row_slot, slot_row, weights, backend):
    return x.new_empty(row_slot.shape[0], x.shape[1])


def _setup(ctx, inputs, output):
    x, row_slot, slot_row, weights, _ = inputs
    ctx.save_for_backward(x if weights is not None else None, row_slot, slot_row, weights)


def _backward(ctx, grad_ND):
    from moe_kernels.ops.combine import combine_tensors, weight_grad_tensors

    x, row_slot, slot_row, weights = ctx.saved_tensors
    grad_ND = grad_ND.contiguous()
    dx = combine_tensors(grad_ND, row_slot, slot_row, weights)
    dw = None
    if weights is not None and ctx.needs_input_grad[3]:
        dw = weight_grad_tensors(x, grad_ND, slot_row, weights.dtype)
    return dx, None, None, dw, None


_dispatch_op.register_autograd(_backward, setup_context=_setup)


def dispatch_tensors(x_TD, row_slot_N, slot_row_TK, weights_TK=None, backend=None):
    """Dispatch on raw plan tensors (inputs already validated)."""
    chosen = B.select("dispatch", BACKENDS, backend, x=x_TD, weights=weights_TK)
    return _dispatch_op(x_TD, row_slot_N, slot_row_TK, weights_TK, chosen.name)


def dispatch(
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    *,
    weights_TK: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather ``x_TD`` (T, D) into the plan's expert-contiguous rows, shape (N, D).

    Optionally scales each row by its gate weight (``weights_TK``, (T, K)). Differentiable in
    ``x_TD`` and ``weights_TK``. Raises TypeError/ValueError naming the argument for a wrong
    dtype, rank, device, shape or a non-contiguous ``x_TD``.
    """
    B.check_tensor("x_TD", x_TD, ndim=2, dtypes=B.FLOAT_DTYPES)
    B.check_contiguous("x_TD", x_TD)
    check_plan(plan, x_TD)
    weights_TK = check_weights(weights_TK, plan, x_TD)
    return dispatch_tensors(x_TD, plan.row_slot_N, plan.slot_row_TK, weights_TK, backend)


def check_plan(plan, like: torch.Tensor) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(
            f"plan: expected a RoutingPlan from moe_kernels.route, got {type(plan).__name__}"
        )
    if plan.slot_row_TK.device != like.device:
        raise ValueError(
            f"plan: expected plan tensors on {like.device}, got {plan.slot_row_TK.device}"
        )


def check_weights(weights_TK, plan, like):
    if weights_TK is None:
        return None
    B.check_tensor("weights_TK", weights_TK, ndim=2, dtypes=B.FLOAT_DTYPES, device=like.device)
    B.check_shape("weights_TK", weights_TK, tuple(plan.slot_row_TK.shape))
    return weights_TK.to(B.weight_dtype_for(like.dtype)).contiguous()
