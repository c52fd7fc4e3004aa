"""Routing histogram in Triton: label x expert counts (and gate-weight sums), in place.

Legend: T tokens, K top-k, G label groups, E experts. Each program takes BLOCK (token, slot) pairs
and adds 1 to ``out_GE[label, expert]`` (and the gate weight to ``out_w_GE``) with atomics.
Pairs with a label or expert id outside [0, G) / [0, E) are skipped (padding labels -1, dropped
slots -1; out-of-range ids cannot raise without a host synchronisation). Counts are exact; the
fp32 weight sums are added in an unspecified order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels.triton._common import INTERPRETED


@triton.jit
def _histogram_kernel(
    experts_ptr,
    labels_ptr,
    weights_ptr,
    out_ptr,
    out_w_ptr,
    P,
    K,
    G,
    E,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = pairs < P
    expert = tl.load(experts_ptr + pairs, mask=ok, other=-1).to(tl.int64)
    label = tl.load(labels_ptr + pairs // K, mask=ok, other=-1).to(tl.int64)
    ok = ok & (expert >= 0) & (expert < E) & (label >= 0) & (label < G)
    bins = tl.where(ok, label * E + expert, 0)
    tl.atomic_add(out_ptr + bins, tl.full((BLOCK,), 1, tl.int64), mask=ok)
    if HAS_W:
        w = tl.load(weights_ptr + pairs, mask=ok, other=0)
        tl.atomic_add(out_w_ptr + bins, w, mask=ok)


def routing_histogram(experts_TK, labels_T, out_GE, weights_TK=None, out_w_GE=None) -> None:
    """Accumulate into ``out_GE`` (int64) and ``out_w_GE`` (fp32); int32 experts, int64 labels,
    fp32 weights, all contiguous."""
    T, K = experts_TK.shape
    G, E = out_GE.shape
    P = T * K
    if P == 0 or G * E == 0:
        return
    block = 16 if INTERPRETED else 1024
    _histogram_kernel[(triton.cdiv(P, block),)](
        experts_TK,
        labels_T,
        experts_TK if weights_TK is None else weights_TK,
        out_GE,
        out_GE if out_w_GE is None else out_w_GE,
        P,
        K,
        G,
        E,
        HAS_W=weights_TK is not None,
        BLOCK=block,
    )
