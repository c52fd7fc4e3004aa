"""Helpers shared by the Triton kernel modules (imports triton: load only on first use)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# True when this process decorated its kernels for Triton's interpreter (TRITON_INTERPRET=1 was
# set before the first kernel module loaded): they then run on CPU tensors, one program at a time.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


# Reductions and scans over our own combine functions instead of tl.sum / tl.max / tl.min /
# tl.cumsum: those are triton library functions whose interpreter mode is fixed when triton is
# imported (torch may import it long before TRITON_INTERPRET is set), while these take the mode
# of our kernels. Compiled for a GPU they are the same reductions.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maximum)


@triton.jit
def reduce_min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _minimum)


@triton.jit
def inclusive_sum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _add)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def row_blocks(D: int) -> tuple[int, int]:
    """(rows, BLOCK_D) per program for the row-copy kernels: whole rows up to 1024 columns,
    about 4096 elements per program (the interpreter gets the smallest tiles so that tests cross
    tile edges with small shapes)."""
    if INTERPRETED:
        return 4, 16
    block_d = min(next_pow2(D), 1024)
    return max(1, 4096 // block_d), block_d


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs use IEEE fp32 products unless torch allows TF32
    for matmuls (``torch.backends.cuda.matmul.allow_tf32``), as torch's own matmuls do; 16-bit
    inputs use the default tensor-core path."""
    if INTERPRETED or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are cast to fp32 first: only for bf16 under the interpreter,
    which stores bf16 as raw 16-bit integers and multiplies those bit patterns in ``tl.dot``
    (triton 3.9). Products of bf16 values are exact in fp32, so with fp32 accumulation the result
    matches a bf16 tensor-core dot up to summation order."""
    return INTERPRETED and dtype == torch.bfloat16
