"""Top-k gating in Triton: router logits -> (gate weights, expert ids).

Legend: T tokens, E experts, K top-k. Each program holds BLOCK_T whole rows of logits in fp32
(E padded to a power of two with -inf). Scores are softmax or sigmoid of the logits; selection is
on the logits themselves when there is no bias (scores are monotonic in them, so exact ties
resolve as in the reference) and on score + bias otherwise. K rounds each take the row maximum
and, among equal values, the lowest expert id, then mask it out; the weights are the selected
scores, renormalised to sum to one when asked.

A row with a NaN or inf logit cannot raise without a host synchronisation, so it is flagged
instead: its weights are NaN and its expert ids -1 (the convention of the CUDA backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.triton._common import INTERPRETED, next_pow2, reduce_max, reduce_min, reduce_sum

SCORES = ("softmax", "sigmoid")  # same order as moe_kernels.ops.topk_gating.SCORES


@triton.jit
def _topk_gating_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    experts_ptr,
    T,
    E,
    K,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    tok_ok = tokens < T
    col_ok = cols < E
    ptrs = logits_ptr + tokens.to(tl.int64)[:, None] * E + cols[None, :]
    z = tl.load(ptrs, mask=tok_ok[:, None] & col_ok[None, :], other=0).to(tl.float32)
    # |z| < inf is false for NaN and +-inf. Such a row is flagged at the end; its values are
    # zeroed first so that no NaN arithmetic runs. Padding columns become -inf (never chosen).
    ok = tl.abs(z) < float("inf")
    finite = reduce_min(ok.to(tl.int32), 1)
    z = tl.where(col_ok[None, :], tl.where(ok, z, 0.0), float("-inf"))
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
    else:
        p = tl.exp(z - reduce_max(z, 1)[:, None])
        s = p / reduce_sum(p, 1)[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0)
        sel = tl.where(col_ok[None, :], s + bias[None, :], float("-inf"))
    else:
        sel = z
    ks = tl.arange(0, BLOCK_K)
    w = tl.full((BLOCK_T, BLOCK_K), 0, tl.float32)
    ids = tl.full((BLOCK_T, BLOCK_K), 0, tl.int32)
    for k in range(K):
        best = reduce_max(sel, 1)
        idx = reduce_min(tl.where(sel == best[:, None], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        sk = reduce_sum(tl.where(hit, s, 0.0), 1)
        w = tl.where(ks[None, :] == k, sk[:, None], w)
        ids = tl.where(ks[None, :] == k, idx[:, None], ids)
        sel = tl.where(hit, float("-inf"), sel)
    if NORMALIZE:
        w = w / reduce_sum(w, 1)[:, None]
    bad = finite == 0
    w = tl.where(bad[:, None], float("nan"), w)
    ids = tl.where(bad[:, None], -1, ids)
    out = tokens.to(tl.int64)[:, None] * K + ks[None, :]
    out_ok = tok_ok[:, None] & (ks[None, :] < K)
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=out_ok)
    tl.store(experts_ptr + out, ids, mask=out_ok)


def _block_t(block_e: int) -> int:
    """Rows per program: about 4096 logits held at once (one row per program in the
    interpreter, where the tile size buys nothing)."""
    return 1 if INTERPRETED else max(1, 4096 // block_e)


def topk_gating(logits_TE, k: int, score: str, bias_E=None, normalize: bool = True):
    """(weights_TK fp32, experts_TK int32) of contiguous ``logits_TE``; ``bias_E`` fp32 or None."""
    T, E = logits_TE.shape
    w = torch.empty(T, k, dtype=torch.float32, device=logits_TE.device)
    experts = torch.empty(T, k, dtype=torch.int32, device=logits_TE.device)
    if T == 0:
        return w, experts
    block_e = next_pow2(E)
    block_t = _block_t(block_e)
    _topk_gating_kernel[(triton.cdiv(T, block_t),)](
        logits_TE,
        logits_TE if bias_E is None else bias_E,
        w,
        experts,
        T,
        E,
        k,
        SIGMOID=SCORES.index(score) == 1,
        HAS_BIAS=bias_E is not None,
        NORMALIZE=bool(normalize),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=next_pow2(k),
    )
    return w, experts
