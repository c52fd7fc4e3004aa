"""Grouped GEMM in Triton: one matmul per expert over its contiguous rows, and its weight grad.

Legend: N rows, D input dim, F output dim, E experts, T tokens (the gathered variant).

Forward tiles the output over (row block, column block). Row blocks never straddle two experts:
each expert's rows [offsets[e], offsets[e+1]) are cut into blocks of BLOCK_M rows, and the rows
past offsets[E] (capacity padding) form one more group that is written with zeros. Every program
finds its group from the offsets on the device (block counts per group, an inclusive cumsum and
a count of the sums <= its block id), so the launch needs no host synchronisation: the grid is an
upper bound on the block count (N // BLOCK_M + E + 1, and at most N) and surplus programs exit.

The weight gradient dw[e] = x_e^T dy_e tiles over (D block, F block, expert) and loops over the
expert's rows (a reduction of variable length, read from the offsets on the device); an empty
expert runs no iteration and stores zeros.

Both kernels take every tensor with arbitrary strides (so ``w.transpose(1, 2)`` needs no copy),
accumulate in fp32 and round once to the output dtype (that of x).

The gathered variant reads row n of A as ``x_TD[row_token_N[n]]`` instead of ``x_ND[n]``: it fuses
the dispatch gather into the GEMM, so the permuted copy of the activations is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.triton._common import (
    INTERPRETED,
    dot_precision,
    dot_upcast,
    inclusive_sum,
    next_pow2,
    reduce_sum,
)


@triton.jit
def _block_rows(
    offsets_ptr, pid_m, N, E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr
):
    """(group, first row, end row) of row block ``pid_m``. Groups 0..E-1 are the experts, group E
    the padding rows [offsets[E], N); a group > E means the block is past the last one."""
    g = tl.arange(0, BLOCK_G)
    # Offsets clamped into [0, N]: malformed ones (unchecked on the device) never reach past x or
    # y; a group whose end precedes its start gets no block.
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + g, mask=g <= E, other=0), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + g + 1, mask=g < E, other=0), 0), N)
    lo = lo.to(tl.int32)
    hi = tl.where(g == E, N, hi.to(tl.int32))
    blocks = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    through = inclusive_sum(blocks, 0)  # blocks of groups 0..g
    group = reduce_sum((through <= pid_m).to(tl.int32), 0)
    mine = g == group
    first_block = reduce_sum(tl.where(mine, through - blocks, 0), 0)
    start = reduce_sum(tl.where(mine, lo, 0), 0) + (pid_m - first_block) * BLOCK_M
    end = reduce_sum(tl.where(mine, hi, 0), 0)
    return group, start, end


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    row_token_ptr,
    N,
    D,
    F,
    stride_xr,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wf,
    stride_yn,
    stride_yf,
    E: tl.constexpr,
    GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, start, end = _block_rows(offsets_ptr, pid_m, N, E, BLOCK_G, BLOCK_M)
    if group > E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    col_ok = cols < F
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :] * stride_yf
    out_ok = row_ok[:, None] & col_ok[None, :]
    if group == E:
        zero = tl.full((BLOCK_M, BLOCK_N), 0, y_ptr.dtype.element_ty)
        tl.store(y_ptrs, zero, mask=out_ok)
        return
    if GATHER:
        src = tl.load(row_token_ptr + rows, mask=row_ok, other=-1)
        row_ok = row_ok & (src >= 0)
    else:
        src = rows
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xr
    b_ptrs = w_ptr + group.to(tl.int64) * stride_we + cols[None, :] * stride_wf
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptrs + ks[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs + ks[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_mm_dw_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    row_token_ptr,
    N,
    D,
    F,
    stride_xr,
    stride_xd,
    stride_yn,
    stride_yf,
    stride_we,
    stride_wd,
    stride_wf,
    GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.program_id(1)
    tiles_f = (F + BLOCK_N - 1) // BLOCK_N
    ds = (tile // tiles_f) * BLOCK_M + tl.arange(0, BLOCK_M)
    fs = (tile % tiles_f) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = ds < D
    f_ok = fs < F
    # Offsets clamped into [0, N] as in _block_rows; hi < lo leaves the loop empty (dw[e] = 0).
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), N).to(tl.int32)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), 0), N).to(tl.int32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < hi
        if GATHER:
            src = tl.load(row_token_ptr + rs, mask=r_ok, other=-1)
            src_ok = r_ok & (src >= 0)
        else:
            src = rs
            src_ok = r_ok
        # x_e^T tile: (BLOCK_M of D) x (BLOCK_K rows).
        a_ptrs = x_ptr + src.to(tl.int64)[None, :] * stride_xr + ds[:, None] * stride_xd
        a = tl.load(a_ptrs, mask=d_ok[:, None] & src_ok[None, :], other=0)
        b_ptrs = dy_ptr + rs.to(tl.int64)[:, None] * stride_yn + fs[None, :] * stride_yf
        b = tl.load(b_ptrs, mask=r_ok[:, None] & f_ok[None, :], other=0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we
    dw_ptrs += ds[:, None] * stride_wd + fs[None, :] * stride_wf
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_ok[:, None] & f_ok[None, :])


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter runs one program at a time, so it gets the smallest tiles that
    ``tl.dot`` takes (tests then cover many blocks, partial blocks and block-crossing experts
    with small shapes). On a GPU: 64 x 128 output tiles, K steps of 128 bytes per row."""
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    return dict(
        BLOCK_M=64,
        BLOCK_N=128,
        BLOCK_K=32 if dtype == torch.float32 else 64,
        num_warps=4,
        num_stages=3,
    )


def _forward(x, w, offsets, row_token):
    N = x.shape[0] if row_token is None else row_token.shape[0]
    D = x.shape[1]
    E, _, F = w.shape
    y = torch.empty(N, F, dtype=x.dtype, device=x.device)
    if N == 0 or F == 0:
        return y
    cfg = _config(x.dtype)
    grid = (min(N // cfg["BLOCK_M"] + E + 1, N), triton.cdiv(F, cfg["BLOCK_N"]))
    _grouped_mm_kernel[grid](
        x,
        w,
        y,
        offsets,
        offsets if row_token is None else row_token,
        N,
        D,
        F,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        y.stride(0),
        y.stride(1),
        E=E,
        GATHER=row_token is not None,
        PRECISION=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        BLOCK_G=next_pow2(E + 1),
        **cfg,
    )
    return y


def _dw(x, dy, offsets, row_token):
    E = offsets.shape[0] - 1
    D, F = x.shape[1], dy.shape[1]
    dw = torch.empty(E, D, F, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    cfg = _config(x.dtype)
    grid = (triton.cdiv(D, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"]), E)
    _grouped_mm_dw_kernel[grid](
        x,
        dy,
        dw,
        offsets,
        offsets if row_token is None else row_token,
        dy.shape[0],
        D,
        F,
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        GATHER=row_token is not None,
        PRECISION=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        **cfg,
    )
    return dw


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """y_NF[rows of e] = x_ND[rows of e] @ w_EDF[e]; rows past offsets_E1[E] are zero.

    Inputs as validated by ``moe_kernels.grouped_mm`` (same dtype and device, any strides)."""
    return _forward(x_ND, w_EDF, offsets_E1, None)


def grouped_mm_dw(x_ND: torch.Tensor, dy_NF: torch.Tensor, offsets_E1: torch.Tensor):
    """dw_EDF[e] = x_ND[rows of e]^T @ dy_NF[rows of e]; zero for empty experts."""
    return _dw(x_ND, dy_NF, offsets_E1, None)


def gather_grouped_mm(x_TD, w_EDF, offsets_E1, row_token_N):
    """grouped_mm(x_TD[row_token_N], w_EDF, offsets_E1) without materialising the gathered rows.

    ``row_token_N``: (N,) int32 token of each row (``RoutingPlan.row_token_N``; -1 for padding
    rows, which come out zero). Equals ``grouped_mm(dispatch(x_TD, plan), w, offsets)`` for an
    unweighted dispatch."""
    return _forward(x_TD, w_EDF, offsets_E1, row_token_N)


def gather_grouped_mm_dw(x_TD, dy_NF, offsets_E1, row_token_N):
    """dw_EDF[e] = x_TD[row_token_N[rows of e]]^T @ dy_NF[rows of e] (the weight gradient of
    ``gather_grouped_mm``), again without the gathered copy."""
    return _dw(x_TD, dy_NF, offsets_E1, row_token_N)
