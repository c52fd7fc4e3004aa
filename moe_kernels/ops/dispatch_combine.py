"""Dispatch and combine: the adjoint pair that moves rows between tokens and experts.

Legend: T tokens, D model dim, K top-k, N plan rows.

- dispatch: gather token rows into the plan's expert-contiguous rows, ``x_ND[n] = w[slot] *
  x_TD[token]`` for the (token, slot) held by row n (unit weight when ``weights_TK`` is None),
  zero for padding rows.
- combine: the weighted un-permute back to tokens, ``out_TD[t] = sum_k w[t, k] *
  y_ND[slot_row[t, k]]``, summed in slot order in fp32 (fp64 for fp64); dropped slots add 0.
- weight_grad: ``g_TK[t, k] = <a_TD[t], b_ND[slot_row[t, k]]>`` (0 for dropped slots), the
  gate-weight gradient of both.

Each is the other's backward: d x = combine(d x_ND) (each token sums its K rows in order:
deterministic) and d y = dispatch(d out, weights); the weights get d w[t, k] = <d x_ND[row],
x_TD[t]> and <d out[t], y_ND[row]>. One backend list serves the pair, so a backend named for
one op is the same implementation for its adjoint; its selection arguments are ``x`` (the rows
being moved: x_TD for dispatch, y_ND for combine) and ``weights``.
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _select as S
from moe_kernels.ops.route import RoutingPlan
from moe_kernels.triton import families


def dispatch_reference(x_TD, row_slot_N, K, weights_TK=None):
    valid = row_slot_N >= 0
    slot = row_slot_N.long().clamp(min=0)
    out = x_TD[torch.div(slot, K, rounding_mode="floor")]
    if weights_TK is not None:
        acc = S.weight_dtype_for(x_TD.dtype)
        out = (out.to(acc) * weights_TK.reshape(-1)[slot].unsqueeze(-1).to(acc)).to(x_TD.dtype)
    return torch.where(
        valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )


def combine_reference(y_ND, slot_row_TK, weights_TK=None):
    acc = S.weight_dtype_for(y_ND.dtype)
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
    acc = S.weight_dtype_for(a_TD.dtype)
    row = slot_row_TK.long()
    if b_ND.shape[0] == 0:
        return torch.zeros(slot_row_TK.shape, dtype=wdtype, device=a_TD.device)
    rows = b_ND[row.clamp(min=0)].to(acc)  # (T, K, D)
    dot = (rows * a_TD.to(acc).unsqueeze(1)).sum(-1)
    return torch.where(row >= 0, dot, 0).to(wdtype)


class ReferenceDispatchCombine(S.Backend):
    name = "reference"

    def not_supported_reasons(self, x, weights):
        return []

    def dispatch(self, x, row_slot, K, weights):
        return dispatch_reference(x, row_slot, K, weights)

    def combine(self, y, slot_row, weights):
        return combine_reference(y, slot_row, weights)

    def weight_grad(self, a, b, slot_row, wdtype):
        return weight_grad_reference(a, b, slot_row, wdtype)


class CpuDispatchCombine(S.CpuKernels):
    """C++ kernels (csrc/cpu/dispatch_combine.cpp); the CUDA backend reuses this launch layout."""

    def not_supported_reasons(self, x, weights):
        return S.cpu_reasons(x, weights)

    def dispatch(self, x, row_slot, K, weights):
        T, D = x.shape
        N = row_slot.shape[0]
        out = torch.empty(N, D, dtype=x.dtype, device=x.device)
        wcode = S.DTYPE_CODES[weights.dtype] if weights is not None else 0
        self.launch(
            "dispatch",
            x,
            S.ptr(x),
            S.DTYPE_CODES[x.dtype],
            T,
            D,
            K,
            S.ptr(row_slot),
            N,
            S.ptr(weights),
            wcode,
            S.ptr(out),
        )
        return out

    def combine(self, y, slot_row, weights):
        N, D = y.shape
        T, K = slot_row.shape
        out = torch.empty(T, D, dtype=y.dtype, device=y.device)
        wcode = S.DTYPE_CODES[weights.dtype] if weights is not None else 0
        self.launch(
            "combine",
            y,
            S.ptr(y),
            S.DTYPE_CODES[y.dtype],
            N,
            D,
            S.ptr(slot_row),
            T,
            K,
            S.ptr(weights),
            wcode,
            S.ptr(out),
        )
        return out

    def weight_grad(self, a, b, slot_row, wdtype):
        T, K = slot_row.shape
        out = torch.empty(T, K, dtype=wdtype, device=a.device)
        self.launch(
            "weight_grad",
            a,
            S.ptr(a),
            S.ptr(b),
            S.DTYPE_CODES[a.dtype],
            T,
            a.shape[1],
            K,
            S.ptr(slot_row),
            S.ptr(out),
            S.DTYPE_CODES[wdtype],
        )
        return out


# Storage dtypes of the CUDA kernels (csrc/cuda/dispatch_combine.cu); gate weights fp32/fp64.
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CUDA_WEIGHT_DTYPES = (torch.float32, torch.float64)


class CudaDispatchCombine(S.CudaKernels, CpuDispatchCombine):
    """CpuDispatchCombine's launch layout on the CUDA kernels (csrc/cuda/dispatch_combine.cu)."""

    name = "cuda"

    def not_supported_reasons(self, x, weights):
        reasons = S.cuda_reasons(x, weights, dtypes=CUDA_DTYPES)
        if weights is not None and weights.dtype not in CUDA_WEIGHT_DTYPES:
            reasons.append(f"weights dtype {weights.dtype} not in [torch.float32, torch.float64]")
        return reasons

    def weight_grad(self, a, b, slot_row, wdtype):
        if a.dtype != b.dtype:
            raise TypeError(
                f"weight_grad: expected a and b of one dtype, got {a.dtype} and {b.dtype}"
            )
        if wdtype not in (torch.float32, torch.float64):
            raise TypeError(f"weight_grad: expected wdtype float32 or float64, got {wdtype}")
        return super().weight_grad(a, b, slot_row, wdtype)


BACKENDS: list[S.Backend] = [
    CudaDispatchCombine(),
    families.make("dispatch_combine"),
    CpuDispatchCombine(),
    ReferenceDispatchCombine(),
]


# ---- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("moe_kernels::dispatch", mutates_args=())
def _dispatch_op(
    x: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    weights: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return S.by_name(BACKENDS, backend).dispatch(x, row_slot, slot_row.shape[1], weights)


@_dispatch_op.register_fake
def _(x, row_slot, slot_row, weights, backend):
    return x.new_empty(row_slot.shape[0], x.shape[1])


@torch.library.custom_op("moe_kernels::combine", mutates_args=())
def _combine_op(
    y: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    weights: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return S.by_name(BACKENDS, backend).combine(y, slot_row, weights)


@_combine_op.register_fake
def _(y, row_slot, slot_row, weights, backend):
    return y.new_empty(slot_row.shape[0], y.shape[1])


@torch.library.custom_op("moe_kernels::weight_grad", mutates_args=())
def _weight_grad_op(
    a: torch.Tensor, b: torch.Tensor, slot_row: torch.Tensor, wdtype: torch.dtype, backend: str
) -> torch.Tensor:
    """grad_w_TK[t, k] = <a_TD[t], b_ND[slot_row[t, k]]> (0 for dropped slots)."""
    return S.by_name(BACKENDS, backend).weight_grad(a, b, slot_row, wdtype)


@_weight_grad_op.register_fake
def _(a, b, slot_row, wdtype, backend):
    return a.new_empty(slot_row.shape, dtype=wdtype)


def _setup(ctx, inputs, output):
    rows, row_slot, slot_row, weights, backend = inputs
    ctx.save_for_backward(rows if weights is not None else None, row_slot, slot_row, weights)
    ctx.backend = backend


def _weight_grad(ctx, a, b, slot_row, weights):
    """The weights' gradient <a[t], b[row]>, on the backend the one backward rule picks."""
    chosen = S.backward_backend(
        "weight_grad", BACKENDS, ctx.backend, "weight_grad", x=b, weights=weights
    )
    return _weight_grad_op(a.contiguous(), b.contiguous(), slot_row, weights.dtype, chosen.name)


def _dispatch_backward(ctx, grad_ND):
    """d x = combine(d x_ND) and d w = <d x_ND[row], x_TD[t]>, on the backends that the one
    backward rule picks (moe_kernels.ops._select.backward_backend)."""
    x, row_slot, slot_row, weights = ctx.saved_tensors
    grad_ND = grad_ND.contiguous()
    chosen = S.backward_backend(
        "combine", BACKENDS, ctx.backend, "combine", x=grad_ND, weights=weights
    )
    dx = _combine_op(grad_ND, row_slot, slot_row, weights, chosen.name)
    dw = None
    if weights is not None and ctx.needs_input_grad[3]:
        dw = _weight_grad(ctx, x, grad_ND, slot_row, weights)
    return dx, None, None, dw, None


def _combine_backward(ctx, grad_TD):
    """d y = dispatch(d out, weights) and d w = <d out[t], y_ND[row]>, on the backends that the
    one backward rule picks (moe_kernels.ops._select.backward_backend)."""
    y, row_slot, slot_row, weights = ctx.saved_tensors
    grad_TD = grad_TD.contiguous()
    chosen = S.backward_backend(
        "dispatch", BACKENDS, ctx.backend, "dispatch", x=grad_TD, weights=weights
    )
    dy = _dispatch_op(grad_TD, row_slot, slot_row, weights, chosen.name)
    dw = None
    if weights is not None and ctx.needs_input_grad[3]:
        dw = _weight_grad(ctx, grad_TD, y, slot_row, weights)
    return dy, None, None, dw, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_setup)
_combine_op.register_autograd(_combine_backward, setup_context=_setup)


# ---- public functions --------------------------------------------------------------------------


def dispatch_tensors(x_TD, row_slot_N, slot_row_TK, weights_TK=None, backend=None):
    """Dispatch on raw plan tensors (inputs already validated)."""
    chosen = S.select("dispatch", BACKENDS, backend, x=x_TD, weights=weights_TK)
    return _dispatch_op(x_TD, row_slot_N, slot_row_TK, weights_TK, chosen.name)


def combine_tensors(y_ND, row_slot_N, slot_row_TK, weights_TK=None, backend=None):
    """Combine on raw plan tensors (inputs already validated)."""
    chosen = S.select("combine", BACKENDS, backend, x=y_ND, weights=weights_TK)
    return _combine_op(y_ND, row_slot_N, slot_row_TK, weights_TK, chosen.name)


def weight_grad_tensors(a_TD, b_ND, slot_row_TK, wdtype, backend=None):
    """``<a_TD[t], b_ND[slot_row_TK[t, k]]>`` as (T, K) ``wdtype`` (inputs already validated)."""
    chosen = S.select("weight_grad", BACKENDS, backend, x=b_ND, weights=None)
    return _weight_grad_op(a_TD.contiguous(), b_ND.contiguous(), slot_row_TK, wdtype, chosen.name)


def check_plan(
    plan, like: torch.Tensor, name: str, tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's ``(row_slot_N, slot_row_TK)``, safe for the kernels to index with.

    ``plan`` must be a RoutingPlan on ``like``'s device; ``tokens``, the rows of ``name`` when
    they are tokens (dispatch), must be the plan's token count. A plan that ``route`` built and
    nobody modified since is valid by construction and returned as is. Any other plan has its
    tensors checked: dtypes and shapes always, values on CPU (ValueError naming the entry); on
    other devices, or while tracing, values cannot be read without a host synchronisation, so
    out-of-range entries are replaced by -1 (a padding row, a dropped slot) on the device. The
    kernels then never index outside ``x_TD`` or ``y_ND``."""
    if not isinstance(plan, RoutingPlan):
        raise TypeError(
            f"plan: expected a RoutingPlan from moe_kernels.route, got {type(plan).__name__}"
        )
    if plan.slot_row_TK.device != like.device:
        raise ValueError(
            f"plan: expected plan tensors on {like.device}, got {plan.slot_row_TK.device}"
        )
    if tokens is not None and tokens != plan.slot_row_TK.shape[0]:
        raise ValueError(
            f"{name}: expected {plan.slot_row_TK.shape[0]} rows (the tokens of plan), got {tokens}"
        )
    row_slot, slot_row = plan.row_slot_N, plan.slot_row_TK
    if S.is_marked_valid(row_slot) and S.is_marked_valid(slot_row):
        return row_slot, slot_row
    check_plan_tensors(plan)
    if S.reads_data(row_slot):
        return row_slot, slot_row
    slots, rows = slot_row.numel(), row_slot.shape[0]
    row_slot = torch.where((row_slot >= 0) & (row_slot < slots), row_slot, -1)
    slot_row = torch.where((slot_row >= 0) & (slot_row < rows), slot_row, -1)
    return row_slot, slot_row


def check_plan_tensors(plan: RoutingPlan) -> None:
    """Dtypes, layout and (on CPU) values of the row <-> slot maps of a plan not built by
    ``route`` (see :func:`check_plan`)."""
    S.check_tensor("plan.slot_row_TK", plan.slot_row_TK, ndim=2, dtypes=(torch.int32,))
    S.check_contiguous("plan.slot_row_TK", plan.slot_row_TK)
    dev = plan.slot_row_TK.device
    S.check_tensor("plan.row_slot_N", plan.row_slot_N, ndim=1, dtypes=(torch.int32,), device=dev)
    S.check_contiguous("plan.row_slot_N", plan.row_slot_N)
    slots, rows = plan.slot_row_TK.numel(), plan.row_slot_N.shape[0]
    if S.reads_data(plan.row_slot_N):
        S.check_int_range("plan.row_slot_N", plan.row_slot_N, -1, slots, "slots", " (-1 = padding)")
        S.check_int_range("plan.slot_row_TK", plan.slot_row_TK, -1, rows, "rows", " (-1 = dropped)")


def check_weights(weights_TK, plan, like):
    if weights_TK is None:
        return None
    S.check_tensor("weights_TK", weights_TK, ndim=2, dtypes=S.FLOAT_DTYPES, device=like.device)
    S.check_shape("weights_TK", weights_TK, tuple(plan.slot_row_TK.shape))
    return weights_TK.to(S.weight_dtype_for(like.dtype)).contiguous()


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
    dtype, rank, device, shape or a non-contiguous ``x_TD``, for an ``x_TD`` whose token count
    is not the plan's, and for a plan not built by ``route`` whose tensors are malformed (their
    values are read on CPU only; see :func:`check_plan`).
    """
    S.check_tensor("x_TD", x_TD, ndim=2, dtypes=S.FLOAT_DTYPES)
    S.check_contiguous("x_TD", x_TD)
    row_slot, slot_row = check_plan(plan, x_TD, "x_TD", x_TD.shape[0])
    weights_TK = check_weights(weights_TK, plan, x_TD)
    return dispatch_tensors(x_TD, row_slot, slot_row, weights_TK, backend)


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
    in ``y_ND`` and ``weights_TK``. Raises TypeError/ValueError naming the argument, also for
    ``y_ND`` rows other than ``plan.num_rows`` and a malformed plan (see :func:`check_plan`).
    """
    S.check_tensor("y_ND", y_ND, ndim=2, dtypes=S.FLOAT_DTYPES)
    S.check_contiguous("y_ND", y_ND)
    row_slot, slot_row = check_plan(plan, y_ND, "y_ND")
    if y_ND.shape[0] != plan.num_rows:
        raise ValueError(
            f"y_ND: expected {plan.num_rows} rows (plan.num_rows), got {y_ND.shape[0]}"
        )
    weights_TK = check_weights(weights_TK, plan, y_ND)
    return combine_tensors(y_ND, row_slot, slot_row, weights_TK, backend)
