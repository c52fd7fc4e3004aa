"""Triton grouped GEMM (forward, dw, the gathered variant) against the plain-torch reference."""

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, assert_close, offsets_from_sizes, requires_triton

import moe_kernels as mk
from moe_kernels.ops.grouped_mm import grouped_mm_dw_reference, grouped_mm_reference
from moe_kernels.triton import families

pytestmark = requires_triton

# Interpreter tiles are 16 x 16 (K steps of 16): these shapes cross tile edges.
CASES = [
    ([5, 0, 37, 3], 24, 40, 5),  # empty expert, an expert over 3 row blocks, 5 padding rows, D, F
    # not multiples of the tile
    ([0, 0, 12], 16, 16, 0),  # leading empty experts, exact tiles
    ([8], 32, 8, 0),  # E = 1, F smaller than a tile
    ([3, 4, 5, 6, 7], 20, 17, 33),  # prime E, more padding rows than a block
    ([0, 0, 0], 16, 16, 4),  # every expert empty: only padding rows
]


def make_inputs(sizes, D, F, pad, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes) + pad
    x = torch.randn(N, D, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(len(sizes), D, F, generator=g).to(dtype).to(DEVICE)
    return x, w, offsets_from_sizes(sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,D,F,pad", CASES)
def test_forward_matches_reference(dtype, sizes, D, F, pad):
    x, w, offs = make_inputs(sizes, D, F, pad, dtype, seed=len(sizes) + D)
    y = mk.grouped_mm(x, w, offs, backend="triton")
    ref = grouped_mm_reference(x.double(), w.double(), offs)
    assert y.dtype == dtype and y.shape == ref.shape
    assert_close(y, ref, dtype, "y", reduction=D)
    assert torch.all(y[sum(sizes) :] == 0)  # padding rows are zero (written, not left garbage)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,D,F,pad", CASES)
def test_dw_matches_reference(dtype, sizes, D, F, pad):
    x, _, offs = make_inputs(sizes, D, F, pad, dtype, seed=3 * len(sizes) + F)
    dy = torch.randn(x.shape[0], F, generator=torch.Generator().manual_seed(9)).to(dtype)
    dy = dy.to(DEVICE)
    dw = families.make("grouped_mm").dw(x, dy, offs)
    ref = grouped_mm_dw_reference(x.double(), dy.double(), offs)
    assert dw.dtype == dtype and dw.shape == (len(sizes), D, F)
    assert_close(dw, ref, dtype, "dw", reduction=max(sizes))
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.all(dw[e] == 0)  # empty experts get exact zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_weights_and_rows(dtype):
    # The backward's dx = grouped_mm(dy, w^T) passes a transposed view; x may be a column slice.
    x, w, offs = make_inputs([6, 0, 11], 24, 40, 3, dtype, seed=5)
    wt = w.transpose(1, 2)  # (E, F, D) view, strides (D*F, 1, F)
    x_wide = torch.randn(x.shape[0], 64, generator=torch.Generator().manual_seed(6))
    x_wide = x_wide.to(dtype).to(DEVICE)
    x_view = x_wide[:, 3:43]  # (N, 40) with row stride 64
    y = mk.grouped_mm(x_view, wt, offs, backend="triton")
    assert_close(y, grouped_mm_reference(x_view.double(), wt.double(), offs), dtype, reduction=40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype):
    # Autograd through the op with backend="triton": dw comes from the Triton dw kernel; dx from
    # the automatically chosen backend (C++ cpu on CPU, checked separately above for Triton).
    x, w, offs = make_inputs([6, 0, 19, 1], 24, 40, 2, dtype, seed=7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    dy = torch.randn(x.shape[0], 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    dy = dy.to(DEVICE)
    mk.grouped_mm(x, w, offs, backend="triton").backward(dy)
    dx_ref = grouped_mm_reference(dy.double(), w.detach().double().transpose(1, 2), offs)
    dw_ref = grouped_mm_dw_reference(x.detach().double(), dy.double(), offs)
    assert_close(x.grad, dx_ref, dtype, "dx", reduction=40)
    assert_close(w.grad, dw_ref, dtype, "dw", reduction=19)
    assert torch.all(w.grad[1] == 0)  # the empty expert


def test_int64_offsets_and_empty_inputs():
    x, w, offs = make_inputs([4, 9], 16, 24, 1, torch.float32, seed=11)
    y = mk.grouped_mm(x, w, offs.long(), backend="triton")
    assert_close(y, grouped_mm_reference(x.double(), w.double(), offs), torch.float32, reduction=16)
    # N = 0 rows: an empty result; the dw of no rows is all zeros.
    x0 = torch.empty(0, 16, device=DEVICE)
    offs0 = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    y0 = mk.grouped_mm(x0, torch.randn(3, 16, 8, device=DEVICE), offs0, backend="triton")
    assert y0.shape == (0, 8)
    dw0 = families.make("grouped_mm").dw(x0, torch.empty(0, 8, device=DEVICE), offs0)
    assert dw0.shape == (3, 16, 8) and torch.all(dw0 == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [None, 3])
def test_gather_grouped_mm_matches_dispatch_then_grouped_mm(dtype, capacity):
    T, K, E, D, F = 19, 2, 5, 24, 20
    g = torch.Generator().manual_seed(12)
    experts = torch.topk(torch.rand(T, E, generator=g), K, dim=-1).indices.to(torch.int32)
    plan = mk.route(experts.to(DEVICE), E, capacity=capacity)
    x = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(E, D, F, generator=g).to(dtype).to(DEVICE)
    y = mk.triton.gather_grouped_mm(x, w, plan.offsets_E1, plan.row_token_N)
    x_ND = mk.dispatch(x, plan, backend="reference")  # exact copy of the rows
    ref = grouped_mm_reference(x_ND.double(), w.double(), plan.offsets_E1)
    assert_close(y, ref, dtype, "gather y", reduction=D)
    kept = int(plan.offsets_E1[-1])
    assert torch.all(y[kept:] == 0)  # padding rows (capacity drops) are zero

    dy = torch.randn(plan.num_rows, F, generator=g).to(dtype).to(DEVICE)
    dw = mk.triton.gather_grouped_mm_dw(x, dy, plan.offsets_E1, plan.row_token_N)
    dw_ref = grouped_mm_dw_reference(x_ND.double(), dy.double(), plan.offsets_E1)
    assert_close(dw, dw_ref, dtype, "gather dw", reduction=int(plan.kept_E.max()))


def test_gather_grouped_mm_bad_arguments():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(2, 8, 16, device=DEVICE)
    offs = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    rows = torch.arange(4, dtype=torch.int32, device=DEVICE)
    gmm = mk.triton.gather_grouped_mm
    with pytest.raises(TypeError, match="x_TD: expected dtype"):
        gmm(x.double(), w, offs, rows)
    with pytest.raises(ValueError, match=r"w_EDF: expected shape \(E, 8, F\)"):
        gmm(x, w[:, :4], offs, rows)
    with pytest.raises(ValueError, match="offsets_E1: expected shape"):
        gmm(x, w, offs[:2], rows)
    with pytest.raises(TypeError, match="row_token_N: expected dtype"):
        gmm(x, w, offs, rows.long())
    with pytest.raises(ValueError, match="dy_NF: expected 4 rows"):
        mk.triton.gather_grouped_mm_dw(x, torch.randn(3, 16, device=DEVICE), offs, rows)


# Offsets the device path cannot check without a host synchronisation: the kernels clamp each
# into [0, N] (a group whose end precedes its start is empty), so they stay inside x, y and dw.
# The public op raises for these on CPU, so the kernel module is called directly.
@pytest.mark.parametrize(
    "offsets,clamped",
    [
        ([0, 2, 9], [0, 2, 6]),  # past N = 6
        ([-3, 2, 6], [0, 2, 6]),  # negative
        ([0, 2**20, 2**20], [0, 6, 6]),  # far past N
    ],
)
def test_malformed_offsets_clamped(offsets, clamped):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).to(DEVICE)
    w = torch.randn(2, 16, 16, generator=g).to(DEVICE)
    dy = torch.randn(6, 16, generator=g).to(DEVICE)
    bad = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    good = torch.tensor(clamped, dtype=torch.int32, device=DEVICE)
    kernels = families.kernels("grouped_mm")
    y = kernels.grouped_mm(x, w, bad)
    assert_close(y, grouped_mm_reference(x.double(), w.double(), good), x.dtype, "y", reduction=16)
    dw = kernels.grouped_mm_dw(x, dy, bad)
    ref = grouped_mm_dw_reference(x.double(), dy.double(), good)
    assert_close(dw, ref, x.dtype, "dw", reduction=6)
