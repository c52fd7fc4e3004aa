"""Triton kernels of moe_kernels: a second GPU backend for each op family.

Kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` they also run on CPU tensors through
Triton's interpreter (slow, for tests), and are then chosen only when ``backend="triton"`` is
forced. Importing this package does not import triton; the kernels are loaded on first use.
"""
