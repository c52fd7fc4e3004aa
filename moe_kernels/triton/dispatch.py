"""Dispatch in Triton: gather token rows into the plan's expert-contiguous rows.

Legend: T tokens, D model dim, K top-k, N plan rows. ``x_ND[n] = w[slot] * x_TD[slot // K]`` for
the flat slot held by row n, zero for padding rows (slot -1). Each program copies a tile of
(BLOCK_R rows) x (BLOCK_D columns); the weight multiply is done in fp32 and rounded once, as in
``dispatch_reference``, so fp32 and bf16 outputs match it bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.triton._common import row_blocks


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
