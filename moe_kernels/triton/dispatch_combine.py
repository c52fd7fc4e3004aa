"""Dispatch and combine in Triton: the adjoint pair between token rows and the plan's
expert-contiguous rows, and the gate-weight gradient shared by both backward passes.

Legend: T tokens, D model dim, K top-k, N plan rows.
- dispatch: ``x_ND[n] = w[slot] * x_TD[slot // K]`` for the flat slot held by row n, zero for
  padding rows (slot -1). Each program copies a tile of (BLOCK_R rows) x (BLOCK_D columns); the
  weight multiply is done in fp32 and rounded once, as in ``dispatch_reference``, so fp32 and bf16
  outputs match it bit for bit.
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
def _dispatch_kernel(
    x_ptr,
    row_slot_ptr,
    w_ptr,
    out_ptr,
    N,
    D,
    K,
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    slot = tl.load(row_slot_ptr + rows, mask=row_ok, other=-1)
    valid = slot >= 0
    token = tl.where(valid, slot, 0) // K
    src = x_ptr + token.to(tl.int64)[:, None] * D + cols[None, :]
    v = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0)
    if HAS_W:
        w = tl.load(w_ptr + slot, mask=valid, other=0)
        v = v.to(tl.float32) * w[:, None]
    dst = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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


def dispatch(x_TD: torch.Tensor, row_slot_N: torch.Tensor, K: int, weights_TK=None):
    """(N, D) expert-ordered rows of contiguous ``x_TD``; ``weights_TK`` fp32 contiguous or None."""
    D = x_TD.shape[1]
    N = row_slot_N.shape[0]
    out = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    if out.numel() == 0:
        return out
    block_r, block_d = row_blocks(D)
    grid = (triton.cdiv(N, block_r), triton.cdiv(D, block_d))
    _dispatch_kernel[grid](
        x_TD,
        row_slot_N,
        x_TD if weights_TK is None else weights_TK,
        out,
        N,
        D,
        K,
        HAS_W=weights_TK is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


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
