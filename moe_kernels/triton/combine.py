"""Combine in Triton: the weighted un-permute from expert rows back to tokens, and the gate-weight
gradient shared by combine's and dispatch's backward.

Legend: N plan rows, D model dim, T tokens, K top-k.
- combine: ``out_TD[t] = sum_k w[t, k] * y_ND[slot_row[t, k]]``, summed in slot order from zero in
  fp32 and rounded once (as ``combine_reference``); dropped slots (row -1) add nothing. Every
  output element is written by one program, so the result is deterministic (no atomics).
- weight_grad: ``g_TK[t, k] = <a_TD[t], b_ND[slot_row[t, k]]>`` in fp32, 0 for dropped slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.triton._common import reduce_sum, row_blocks


@triton.jit
def _combine_kernel(
    y_ptr,
    slot_row_ptr,
    w_ptr,
    out_ptr,
    T,
    D,
    K,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tokens < T
    col_ok = cols < D
    acc = tl.full((BLOCK_T, BLOCK_D), 0, tl.float32)
    for k in range(K):
        slot = tokens.to(tl.int64) * K + k
        row = tl.load(slot_row_ptr + slot, mask=tok_ok, other=-1)
        valid = row >= 0
        src = y_ptr + tl.where(valid, row, 0).to(tl.int64)[:, None] * D + cols[None, :]
        v = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + slot, mask=valid, other=0)[:, None]
        acc += v
    dst = out_ptr + tokens.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    a_ptr,
    b_ptr,
    slot_row_ptr,
    out_ptr,
    T,
    D,
    K,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1)
    tok_ok = tokens < T
    slot = tokens.to(tl.int64) * K + k
    row = tl.load(slot_row_ptr + slot, mask=tok_ok, other=-1)
    valid = row >= 0
    a_rows = a_ptr + tokens.to(tl.int64)[:, None] * D
    b_rows = b_ptr + tl.where(valid, row, 0).to(tl.int64)[:, None] * D
    acc = tl.full((BLOCK_T, BLOCK_D), 0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        a = tl.load(a_rows + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :], other=0)
        b = tl.load(b_rows + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    dot = reduce_sum(acc, 1)
    tl.store(out_ptr + slot, dot.to(out_ptr.dtype.element_ty), mask=tok_ok)


def combine(y_ND: torch.Tensor, slot_row_TK: torch.Tensor, weights_TK=None) -> torch.Tensor:
    """(T, D) token rows from contiguous ``y_ND``; ``weights_TK`` fp32 contiguous or None."""
    T, K = slot_row_TK.shape
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=y_ND.dtype, device=y_ND.device)
    if out.numel() == 0:
        return out
    block_t, block_d = row_blocks(D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](
        y_ND,
        slot_row_TK,
        y_ND if weights_TK is None else weights_TK,
        out,
        T,
        D,
        K,
        HAS_W=weights_TK is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def weight_grad(a_TD, b_ND, slot_row_TK, wdtype: torch.dtype) -> torch.Tensor:
    """(T, K) ``<a_TD[t], b_ND[slot_row[t, k]]>`` of contiguous inputs, 0 for dropped slots."""
    T, K = slot_row_TK.shape
    D = a_TD.shape[1]
    out = torch.empty(T, K, dtype=wdtype, device=a_TD.device)
    if out.numel() == 0:
        return out
    block_t, block_d = row_blocks(D)
    _weight_grad_kernel[(triton.cdiv(T, block_t), K)](
        a_TD, b_ND, slot_row_TK, out, T, D, K, BLOCK_T=block_t, BLOCK_D=block_d
    )
    return out
