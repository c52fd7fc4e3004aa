"""Routing histogram: label x expert counts (and gate-weight sums), accumulated in place.

Legend: T tokens, K top-k, G label groups (domains), E experts. ``out_GE[labels[t],
experts[t, k]] += 1`` and ``out_w_GE[...] += weights[t, k]``; entries with label -1 (padding)
or expert id -1 (a dropped slot) are skipped. Accumulates across calls and layers without a
host synchronisation, so statistics can be collected at full training speed.

Any other label outside [0, G) or id outside [0, E): the reference and CPU backends raise a
ValueError naming the argument, the entry and its value (the CPU kernel notes it in its counting
loop, at no extra pass). The CUDA and Triton backends cannot without a host synchronisation, so
they skip such entries like -1. int64 expert ids are cast to int32 for the kernels; on CPU they
are range-checked first, elsewhere clamped into [-1, E] (skipped) so that none wraps into range.
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _select as S
from moe_kernels.triton import families


def routing_histogram_reference(experts_TK, labels_T, out_GE, weights_TK=None, out_w_GE=None):
    G, E = out_GE.shape
    K = experts_TK.shape[1]
    lab = labels_T.long().unsqueeze(1).expand(-1, K).reshape(-1)
    ex = experts_TK.long().reshape(-1)
    S.check_int_range("labels_T", labels_T, -1, G, "labels", " (-1 = skip; rows of out_GE)")
    note = " (-1 = skip; columns of out_GE)"
    S.check_int_range("experts_TK", experts_TK, -1, E, "expert ids", note)
    valid = (lab >= 0) & (ex >= 0)
    idx = (lab * E + ex)[valid]
    out_GE.view(-1).index_add_(0, idx, torch.ones_like(idx))
    if weights_TK is not None:
        out_w_GE.view(-1).index_add_(0, idx, weights_TK.reshape(-1)[valid].to(out_w_GE.dtype))


class ReferenceRoutingHistogram(S.Backend):
    name = "reference"

    def not_supported_reasons(self, experts, out):
        return []

    def forward(self, experts, labels, out, weights, out_w):
        routing_histogram_reference(experts, labels, out, weights, out_w)


class CpuRoutingHistogram(S.Backend):
    name = "cpu"

    def not_supported_reasons(self, experts, out):
        return S.cpu_reasons(experts, out)

    def forward(self, experts, labels, out, weights, out_w):
        T, K = experts.shape
        G, E = out.shape
        S._C.routing_histogram_cpu(
            S.ptr(experts), S.ptr(labels), S.ptr(weights), T, K, G, E, S.ptr(out), S.ptr(out_w)
        )


class CudaRoutingHistogram(S.Backend):
    name = "cuda"

    def not_supported_reasons(self, experts, out):
        return S.cuda_reasons(experts, out)

    def forward(self, experts, labels, out, weights, out_w):
        T, K = experts.shape
        G, E = out.shape
        stream = S.cuda_stream(experts)
        S._C.routing_histogram_cuda(
            S.ptr(experts),
            S.ptr(labels),
            S.ptr(weights),
            T,
            K,
            G,
            E,
            S.ptr(out),
            S.ptr(out_w),
            stream,
        )


BACKENDS: list[S.Backend] = [
    CudaRoutingHistogram(),
    families.make("routing_histogram"),
    CpuRoutingHistogram(),
    ReferenceRoutingHistogram(),
]


@torch.library.custom_op("moe_kernels::routing_histogram", mutates_args=("out", "out_w"))
def _routing_histogram_op(
    experts: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None,
    out_w: torch.Tensor | None,
    backend: str,
) -> None:
    S.by_name(BACKENDS, backend).forward(experts, labels, out, weights, out_w)


@_routing_histogram_op.register_fake
def _(experts, labels, out, weights, out_w, backend):
    return None


def routing_histogram(
    experts_TK: torch.Tensor,
    labels_T: torch.Tensor,
    out_GE: torch.Tensor,
    weights_TK: torch.Tensor | None = None,
    out_w_GE: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Accumulate routing counts by label into ``out_GE`` (and weight sums into ``out_w_GE``).

    Args:
        experts_TK: (T, K) int32/int64 expert ids in [-1, E); -1 = skip (a dropped slot).
        labels_T: (T,) int64/int32 labels in [-1, G); -1 = skip (padding).
        out_GE: (G, E) int64, contiguous, updated in place.
        weights_TK: optional (T, K) float gate weights; requires ``out_w_GE``.
        out_w_GE: (G, E) float32, contiguous, updated in place.

    Raises: TypeError/ValueError naming the argument (dtype, shape, device; on CPU ids and
    labels outside [-1, E) / [-1, G), see the module docstring for the CUDA path).
    """
    S.check_tensor("experts_TK", experts_TK, ndim=2, dtypes=(torch.int32, torch.int64))
    dev = experts_TK.device
    S.check_tensor("labels_T", labels_T, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    S.check_shape("labels_T", labels_T, (experts_TK.shape[0],))
    S.check_tensor("out_GE", out_GE, ndim=2, dtypes=(torch.int64,), device=dev)
    S.check_contiguous("out_GE", out_GE)
    if (weights_TK is None) != (out_w_GE is None):
        raise ValueError(
            "weights_TK, out_w_GE: expected both or neither, got "
            f"weights_TK={'a tensor' if weights_TK is not None else None}, "
            f"out_w_GE={'a tensor' if out_w_GE is not None else None}"
        )
    if weights_TK is not None:
        S.check_tensor("weights_TK", weights_TK, ndim=2, dtypes=S.FLOAT_DTYPES, device=dev)
        S.check_shape("weights_TK", weights_TK, tuple(experts_TK.shape))
        S.check_tensor("out_w_GE", out_w_GE, ndim=2, dtypes=(torch.float32,), device=dev)
        S.check_shape("out_w_GE", out_w_GE, tuple(out_GE.shape))
        S.check_contiguous("out_w_GE", out_w_GE)
        weights_TK = weights_TK.detach().float().contiguous()
    experts = experts_TK.detach()
    if experts.dtype == torch.int64:  # never wrap into [0, E) on the cast to int32
        if S.reads_data(experts):
            note = " (-1 = skip; columns of out_GE)"
            S.check_int_range("experts_TK", experts, -1, out_GE.shape[1], "expert ids", note)
        else:
            experts = experts.clamp(-1, out_GE.shape[1])
    experts = experts.to(torch.int32).contiguous()
    labels = labels_T.detach().to(torch.int64).contiguous()
    chosen = S.select("routing_histogram", BACKENDS, backend, experts=experts, out=out_GE)
    _routing_histogram_op(experts, labels, out_GE, weights_TK, out_w_GE, chosen.name)
