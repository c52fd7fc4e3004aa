"""Routing plan: expert ids -> expert-contiguous row layout, with optional capacity dropping.

Legend: T tokens, K top-k, E experts, N allocated rows (T*K dropless, min(T*K, E*capacity)
with a capacity). All plan tensors are int32 on the device of ``experts_TK``. Rows of one
expert are contiguous and in token order; rows past ``offsets_E1[E]`` are padding
(``row_slot_N = -1``). Building a plan needs no host synchronisation.

Out-of-range expert ids: the reference and CPU backends raise a ValueError. The CUDA backend
cannot without a host synchronisation, so it skips them: such a slot is not counted in
``counts_E``, gets no row (``slot_row_TK = -1``, like a dropped slot) and shifts nothing else.
int64 ids outside int32 never wrap into range: on CPU ``route`` raises for them before the cast
to int32, on CUDA it clamps them into [-1, E] first (one elementwise pass, int64 input only), so
they are skipped like any other out-of-range id.
The CUDA ``topk_gating`` flags tokens with non-finite logits with ids -1, which are skipped so.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels.ops import _select as S
from moe_kernels.triton import families

DROPS = ("position", "score")


class RoutingPlan(NamedTuple):
    """Where every (token, slot) pair goes.

    counts_E: requested selections per expert (before capacity).
    kept_E: selections kept per expert (after capacity).
    offsets_E1: exclusive prefix sum of kept_E, length E + 1; expert e owns rows
        [offsets_E1[e], offsets_E1[e + 1]).
    row_slot_N: flat slot index t * K + k held by each row, -1 for padding rows.
    slot_row_TK: row of each (token, slot), -1 when dropped.
    row_token_N: token of each row, -1 for padding rows.
    """

    counts_E: torch.Tensor
    kept_E: torch.Tensor
    offsets_E1: torch.Tensor
    row_slot_N: torch.Tensor
    slot_row_TK: torch.Tensor
    row_token_N: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def top_k(self) -> int:
        return self.slot_row_TK.shape[1]

    @property
    def num_rows(self) -> int:
        """Allocated rows N (an upper bound on the kept rows; no sync)."""
        return self.row_slot_N.shape[0]

    def kept_sizes(self) -> list[int]:
        """Kept rows per expert as Python ints (one host synchronisation)."""
        return self.kept_E.tolist()


def num_rows(T: int, K: int, E: int, capacity: int | None) -> int:
    return T * K if capacity is None else min(T * K, E * capacity)


def route_reference(experts_TK, num_experts, capacity=None, weights_TK=None, drop="position"):
    """Plain-torch routing plan (sorts; synchronises on CUDA)."""
    T, K = experts_TK.shape
    E = num_experts
    dev = experts_TK.device
    flat = experts_TK.reshape(-1).long()
    S = flat.numel()
    if S and (int(flat.min()) < 0 or int(flat.max()) >= E):
        bad = int(((flat < 0) | (flat >= E)).nonzero()[0, 0])
        raise ValueError(
            f"experts_TK: expected expert ids in [0, {E}), found {int(flat[bad])} at token "
            f"{bad // K}, slot {bad % K}"
        )
    counts = torch.bincount(flat, minlength=E)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)  # by expert, then token order
    ar = torch.arange(S, device=dev)
    if capacity is None:
        keep_sorted = torch.ones(S, dtype=torch.bool, device=dev)
    elif drop == "position":
        keep_sorted = (ar - start[flat[order]]) < capacity
    else:
        w = weights_TK.reshape(-1)
        by_w = torch.argsort(-w.double(), stable=True)  # weight desc, ties by slot index asc
        o = by_w[torch.argsort(flat[by_w], stable=True)]
        keep_flat = torch.zeros(S, dtype=torch.bool, device=dev)
        keep_flat[o] = (ar - start[flat[o]]) < capacity
        keep_sorted = keep_flat[order]
    kept_order = order[keep_sorted]
    kept = torch.bincount(flat[kept_order], minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(kept, 0)
    N = num_rows(T, K, E, capacity)
    row_slot = torch.full((N,), -1, dtype=torch.long, device=dev)
    row_slot[: kept_order.numel()] = kept_order
    slot_row = torch.full((S,), -1, dtype=torch.long, device=dev)
    slot_row[kept_order] = torch.arange(kept_order.numel(), device=dev)
    i32 = lambda t: t.to(torch.int32)
    return i32(counts), i32(kept), i32(offsets), i32(row_slot), i32(slot_row.view(T, K))


class ReferenceRoute(S.Backend):
    name = "reference"

    def not_supported_reasons(self, experts, weights, num_experts):
        return []

    def forward(self, experts, E, capacity, weights, drop):
        return route_reference(experts, E, None if capacity < 0 else capacity, weights, drop)


class CpuRoute(S.Backend):
    name = "cpu"

    def not_supported_reasons(self, experts, weights, num_experts):
        return S.cpu_reasons(experts, weights)

    def forward(self, experts, E, capacity, weights, drop):
        T, K = experts.shape
        N = num_rows(T, K, E, None if capacity < 0 else capacity)
        i32 = dict(dtype=torch.int32)
        counts, kept, offsets = (
            torch.empty(E, **i32),
            torch.empty(E, **i32),
            torch.empty(E + 1, **i32),
        )
        row_slot, slot_row = torch.empty(N, **i32), torch.empty(T, K, **i32)
        wcode = S.DTYPE_CODES[weights.dtype] if weights is not None else 0
        S._C.route_cpu(
            S.ptr(experts),
            T,
            K,
            E,
            capacity,
            DROPS.index(drop),
            S.ptr(weights),
            wcode,
            N,
            S.ptr(counts),
            S.ptr(kept),
            S.ptr(offsets),
            S.ptr(row_slot),
            S.ptr(slot_row),
        )
        return counts, kept, offsets, row_slot, slot_row


# Limits of the CUDA kernels (csrc/cuda/route.h; _C.route_cuda_max_experts).
CUDA_MAX_EXPERTS = 8192
CUDA_MAX_SLOTS = 2**31 - 2**16


class CudaRoute(S.Backend):
    """Stable counting sort on device (csrc/cuda/route.cu), CUB radix sort for score dropping;
    every buffer, the workspace included, allocated here with torch: no sync, graph-capturable."""

    name = "cuda"

    def not_supported_reasons(self, experts, weights, num_experts):
        reasons = S.cuda_reasons(experts, weights, dtypes=(torch.float32, torch.float64))
        if num_experts > CUDA_MAX_EXPERTS:
            reasons.append(
                f"num_experts = {num_experts} > {CUDA_MAX_EXPERTS} (per-warp expert counters "
                "in shared memory)"
            )
        if experts.numel() > CUDA_MAX_SLOTS:
            reasons.append(f"T * K = {experts.numel()} > {CUDA_MAX_SLOTS} (int32 rows)")
        return reasons

    def forward(self, experts, E, capacity, weights, drop):
        T, K = experts.shape
        N = num_rows(T, K, E, None if capacity < 0 else capacity)
        i32 = dict(dtype=torch.int32, device=experts.device)
        counts, kept, offsets = (
            torch.empty(E, **i32),
            torch.empty(E, **i32),
            torch.empty(E + 1, **i32),
        )
        row_slot, slot_row = torch.empty(N, **i32), torch.empty(T, K, **i32)
        wcode = S.DTYPE_CODES[weights.dtype] if weights is not None else 0
        code = DROPS.index(drop)
        nbytes = S._C.route_cuda_workspace_size(T, K, E, capacity, code, wcode)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=experts.device)
        S._C.route_cuda(
            S.ptr(experts),
            T,
            K,
            E,
            capacity,
            code,
            S.ptr(weights),
            wcode,
            N,
            S.ptr(counts),
            S.ptr(kept),
            S.ptr(offsets),
            S.ptr(row_slot),
            S.ptr(slot_row),
            S.ptr(workspace),
            nbytes,
            S.cuda_stream(experts),
        )
        return counts, kept, offsets, row_slot, slot_row


BACKENDS: list[S.Backend] = [
    CudaRoute(),
    families.make("route"),
    CpuRoute(),
    ReferenceRoute(),
]


@torch.library.custom_op("moe_kernels::route", mutates_args=())
def _route_op(
    experts: torch.Tensor,
    num_experts: int,
    capacity: int,
    weights: torch.Tensor | None,
    drop: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return S.by_name(BACKENDS, backend).forward(experts, num_experts, capacity, weights, drop)


@_route_op.register_fake
def _(experts, num_experts, capacity, weights, drop, backend):
    T, K = experts.shape
    N = num_rows(T, K, num_experts, None if capacity < 0 else capacity)
    new = lambda *shape: experts.new_empty(*shape, dtype=torch.int32)
    return new(num_experts), new(num_experts), new(num_experts + 1), new(N), new(T, K)


def route(
    experts_TK: torch.Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    weights_TK: torch.Tensor | None = None,
    drop: str = "position",
    backend: str | None = None,
) -> RoutingPlan:
    """Build the routing plan of ``experts_TK`` (see :class:`RoutingPlan`).

    Args:
        experts_TK: expert ids, shape (T, K), int32 or int64, values in [0, num_experts).
        num_experts: E >= 1.
        capacity: rows per expert (None = dropless). Beyond it, (token, slot) pairs are dropped:
            ``drop="position"`` drops later tokens first, ``drop="score"`` drops the lowest
            ``weights_TK`` first (ties: later slot first).
        weights_TK: gate weights, shape (T, K), needed for ``drop="score"``.
        backend: force a backend.

    Raises:
        TypeError / ValueError naming the argument (dtype, rank, device, ids out of range,
        negative capacity, unknown drop policy, missing weights for score dropping). The CUDA
        backend skips out-of-range ids instead of raising (see the module docstring).
    """
    S.check_tensor("experts_TK", experts_TK, ndim=2, dtypes=(torch.int32, torch.int64))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0
    ):
        raise ValueError(f"capacity: expected None or an int >= 0, got {capacity!r}")
    if drop not in DROPS:
        raise ValueError(f"drop: expected one of {DROPS}, got {drop!r}")
    if weights_TK is not None:
        S.check_tensor(
            "weights_TK", weights_TK, ndim=2, dtypes=S.FLOAT_DTYPES, device=experts_TK.device
        )
        S.check_shape("weights_TK", weights_TK, tuple(experts_TK.shape))
        weights_TK = weights_TK.detach()
        if weights_TK.dtype != torch.float64:
            weights_TK = weights_TK.float()
        weights_TK = weights_TK.contiguous()
    if drop == "score" and capacity is not None and weights_TK is None:
        raise ValueError('weights_TK: required with drop="score" and a capacity, got None')
    experts = _int32_ids(experts_TK, num_experts)
    chosen = S.select(
        "route", BACKENDS, backend, experts=experts, weights=weights_TK, num_experts=num_experts
    )
    cap = -1 if capacity is None else capacity
    counts, kept, offsets, row_slot, slot_row = _route_op(
        experts, num_experts, cap, weights_TK, drop, chosen.name
    )
    K = experts.shape[1]
    row_token = torch.where(row_slot >= 0, torch.div(row_slot, K, rounding_mode="floor"), -1)
    plan = RoutingPlan(counts, kept, offsets, row_slot, slot_row, row_token.to(torch.int32))
    S.mark_valid(plan.offsets_E1, plan.row_slot_N, plan.slot_row_TK)  # what ops check
    return plan


def _int32_ids(experts_TK: torch.Tensor, E: int) -> torch.Tensor:
    """The ids as the contiguous int32 tensor the kernels read. int64 ids are range-checked
    before the cast so that none wraps into [0, E): on CPU (ValueError), or on other devices
    clamped into [-1, E], out of range either way, so the backends skip them as any other."""
    if experts_TK.dtype == torch.int64:
        if S.reads_data(experts_TK):
            S.check_int_range("experts_TK", experts_TK, 0, E, "expert ids")
        else:
            experts_TK = experts_TK.clamp(-1, E)
    return experts_TK.to(torch.int32).contiguous()
