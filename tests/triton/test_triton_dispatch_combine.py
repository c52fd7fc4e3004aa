"""Triton dispatch, combine and the gate-weight gradient against the plain-torch references."""

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, assert_close, random_experts, requires_triton

import moe_kernels as mk
from moe_kernels.ops.dispatch_combine import (
    combine_reference,
    dispatch_reference,
    weight_grad_reference,
)
from moe_kernels.triton import families

pytestmark = requires_triton

# (T, K, E, D, capacity); interpreter tiles are 4 rows x 16 columns.
CASES = [
    (13, 2, 6, 20, None),  # dropless; D not a multiple of the tile
    (13, 2, 6, 20, 3),  # capacity drops: padding rows and dropped slots
    (7, 1, 5, 16, None),  # K = 1
    (9, 4, 4, 33, 2),  # K = E, heavy drops
    (1, 3, 7, 8, None),  # T = 1, D smaller than a tile
]


def make_plan(T, K, E, capacity, seed):
    experts = random_experts(T, K, E, seed=seed).to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    return mk.route(experts, E, capacity=capacity), w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,D,capacity", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_dispatch_matches_reference(dtype, T, K, E, D, capacity, weighted):
    plan, w = make_plan(T, K, E, capacity, seed=T + D)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    w = w if weighted else None
    out = mk.dispatch(x, plan, weights_TK=w, backend="triton")
    ref = dispatch_reference(x, plan.row_slot_N, K, w)
    assert out.dtype == dtype and out.shape == ref.shape
    if weighted:
        # One fp32 multiply rounded to the output dtype, as in the reference; under the
        # interpreter (triton 3.9) fp32 -> bf16 truncates instead of rounding, so compare with
        # the dtype's tolerance rather than bit for bit.
        assert_close(out, ref, dtype, "dispatch")
    else:
        assert torch.equal(out, ref)  # a pure copy
    assert torch.all(out[plan.row_slot_N < 0] == 0)  # padding rows are zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,D,capacity", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_matches_reference(dtype, T, K, E, D, capacity, weighted):
    plan, w = make_plan(T, K, E, capacity, seed=2 * T + D)
    y = torch.randn(plan.num_rows, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = y.to(DEVICE)
    w = w if weighted else None
    out = mk.combine(y, w, plan, backend="triton")
    ref = combine_reference(y, plan.slot_row_TK, w)
    assert out.dtype == dtype and out.shape == (T, D)
    assert_close(out, ref, dtype, "combine")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,D,capacity", CASES)
def test_weight_grad_matches_reference(dtype, T, K, E, D, capacity):
    plan, _ = make_plan(T, K, E, capacity, seed=3 * T + D)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(plan.num_rows, D, generator=g).to(dtype).to(DEVICE)
    got = families.make("dispatch_combine").weight_grad(a, b, plan.slot_row_TK, torch.float32)
    ref = weight_grad_reference(a.double(), b.double(), plan.slot_row_TK, torch.float64)
    assert got.dtype == torch.float32
    # fp32 products of (exact) bf16/fp32 inputs summed in fp32: a length-D dot product.
    assert_close(got, ref, torch.float32, "weight_grad", reduction=D)
    assert torch.all(got[plan.slot_row_TK < 0] == 0)  # dropped slots get no gradient


def test_combine_is_the_adjoint_of_dispatch():
    # <dispatch(x, w), y> == <x, combine(y, w)>: both Triton kernels, one identity.
    plan, w = make_plan(11, 3, 5, 2, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(11, 24, generator=g, dtype=torch.float32).to(DEVICE)
    y = torch.randn(plan.num_rows, 24, generator=g, dtype=torch.float32).to(DEVICE)
    lhs = (mk.dispatch(x, plan, weights_TK=w, backend="triton") * y).sum()
    rhs = (x * mk.combine(y, w, plan, backend="triton")).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_reference(dtype):
    # Autograd through both ops with backend="triton". The adjoint ops in backward follow the one
    # backward rule (moe_kernels.ops._select.backward_backend): Triton on a GPU, the C++ cpu
    # backend on CPU, where Triton runs only when named; the Triton kernels of the backward
    # (dispatch, combine, weight_grad) are checked directly above.
    T, K, E, D = 10, 2, 4, 20
    plan, w0 = make_plan(T, K, E, 4, seed=7)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    dout = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)

    def run(fn):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        out = fn(x, w)
        out.backward(dout)
        return out, x.grad, w.grad

    def chain(backend):
        def fn(x, w):
            rows = mk.dispatch(x, plan, weights_TK=w, backend=backend)
            return mk.combine(rows * 2, w, plan, backend=backend)

        return fn

    out, dx, dw = run(chain("triton"))
    out_r, dx_r, dw_r = run(chain("reference"))
    assert_close(out, out_r, dtype, "out")
    assert_close(dx, dx_r, dtype, "dx")
    assert_close(dw, dw_r, dtype, "dw")


def test_empty_tokens():
    # T = 0: no rows, no tokens; every kernel returns an empty result without launching.
    plan = mk.route(torch.empty(0, 2, dtype=torch.int32, device=DEVICE), 4)
    x = torch.empty(0, 16, device=DEVICE)
    assert mk.dispatch(x, plan, backend="triton").shape == (0, 16)
    y = torch.empty(0, 16, device=DEVICE)
    assert mk.combine(y, None, plan, backend="triton").shape == (0, 16)
    wg = families.make("dispatch_combine").weight_grad(x, x, plan.slot_row_TK, torch.float32)
    assert wg.shape == (0, 2)
