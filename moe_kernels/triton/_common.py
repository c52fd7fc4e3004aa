"""Helpers shared by the Triton kernel modules (imports triton: load only on first use)."""

from __future__ import annotations

import torch
import triton


@triton.jit
def _probe():
    pass


# True when this process decorated its kernels for Triton's interpreter (TRITON_INTERPRET=1 was
# set before the first kernel module loaded): they then run on CPU tensors, one program at a time.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


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
