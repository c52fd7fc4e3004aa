import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops.grouped_mm import grouped_mm_dw_reference, grouped_mm_reference

from .util import CPU_BACKENDS, DTYPES, assert_close


def offsets_from_sizes(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)


CASES = [
    ([5, 0, 7, 3], 16, 32, 0),  # an empty expert in the middle
    ([8], 32, 16, 0),  # E = 1
    ([0, 0, 12], 16, 16, 0),  # leading empty experts
    ([3, 4, 5, 6, 7], 48, 32, 5),  # prime E, 5 padding rows past the last expert
    ([1, 1, 1], 8, 8, 0),  # one row per expert
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("sizes,D,F,pad", CASES)
def test_matches_reference(backend, dtype, sizes, D, F, pad):
    g = torch.Generator().manual_seed(len(sizes) + D)
    N = sum(sizes) + pad
    x = torch.randn(N, D, generator=g).to(dtype)
    w = torch.randn(len(sizes), D, F, generator=g).to(dtype)
    offs = offsets_from_sizes(sizes)
    y = mk.grouped_mm(x, w, offs, backend=backend)
    ref = grouped_mm_reference(x.double(), w.double(), offs)
    tol_ref = grouped_mm_reference(x, w, offs)  # the op chain in the same low precision
    err_allowed = 2 * (tol_ref.double() - ref).abs().max().item() + 1e-6
    print(f"{dtype}: max err {(y.double() - ref).abs().max().item():.3e} allowed {err_allowed:.3e}")
    assert (y.double() - ref).abs().max().item() <= err_allowed + 1e-4 * ref.abs().max().item()
    assert torch.all(y[sum(sizes) :] == 0)  # padding rows are zero


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(7)
    sizes = [6, 0, 9, 1]
    offs = offsets_from_sizes(sizes)
    x = torch.randn(18, 16, generator=g).to(dtype).requires_grad_(True)  # 2 padding rows
    w = torch.randn(4, 16, 32, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(18, 32, generator=g).to(dtype)
    mk.grouped_mm(x, w, offs, backend=backend).backward(dy)
    dx_ref = grouped_mm_reference(dy.float(), w.detach().float().transpose(1, 2), offs)
    dw_ref = grouped_mm_dw_reference(x.detach().float(), dy.float(), offs)
    assert_close(x.grad.float(), dx_ref, dtype, "dx")
    assert_close(w.grad.float(), dw_ref, dtype, "dw")
    assert torch.all(w.grad[1] == 0)  # empty expert gets a zero gradient


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(1)
    offs = offsets_from_sizes([3, 0, 4])
    x = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mk.grouped_mm(x, w, offs, backend=backend), (x, w))


def test_unaligned_dims_fall_back_to_loop():
    # D * 4 bytes not a multiple of 16: torch._grouped_mm refuses, the cpu backend loops.
    x, w, offs = torch.randn(7, 3), torch.randn(2, 3, 5), offsets_from_sizes([4, 3])
    torch.testing.assert_close(mk.grouped_mm(x, w, offs), grouped_mm_reference(x, w, offs))


def test_empty_rows():
    y = mk.grouped_mm(torch.empty(0, 16), torch.randn(3, 16, 8), torch.zeros(4, dtype=torch.int32))
    assert y.shape == (0, 8)


def test_bad_arguments():
    x, w, offs = torch.randn(6, 16), torch.randn(2, 16, 8), offsets_from_sizes([3, 3])
    with pytest.raises(ValueError, match="w_EDF: expected shape"):
        mk.grouped_mm(x, torch.randn(2, 8, 8), offs)
    with pytest.raises(ValueError, match=r"offsets_E1: expected shape \(3,\)"):
        mk.grouped_mm(x, w, offs[:2])
    with pytest.raises(TypeError, match="w_EDF: expected dtype"):
        mk.grouped_mm(x, w.double(), offs)
    with pytest.raises(TypeError, match="offsets_E1: expected dtype"):
        mk.grouped_mm(x, w, offs.float())


def test_opcheck():
    offs = offsets_from_sizes([3, 0, 5])
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    for backend in CPU_BACKENDS:
        torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, (x, w, offs, backend))
        torch.library.opcheck(
            torch.ops.moe_kernels.grouped_mm_dw.default,
            (x.detach(), torch.randn(10, 8), offs, backend),
        )


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=9),
    pad=st.integers(0, 3),
    D=st.sampled_from([4, 5, 8, 16]),
    F=st.sampled_from([3, 4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_equals_reference(sizes, pad, D, F, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes) + pad
    x = torch.randn(N, D, generator=g)
    w = torch.randn(len(sizes), D, F, generator=g)
    offs = offsets_from_sizes(sizes)
    y = mk.grouped_mm(x, w, offs, backend="cpu")
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs), atol=1e-4, rtol=1e-4)
    dy = torch.randn(N, F, generator=g)
    dw = torch.ops.moe_kernels.grouped_mm_dw(x, dy, offs, "cpu")
    torch.testing.assert_close(dw, grouped_mm_dw_reference(x, dy, offs), atol=1e-4, rtol=1e-4)


# Malformed offsets (the reproductions of the input audit) on the CPU path, read before any
# kernel runs: N = 4 rows, E = 2 experts.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "offsets,match",
    [
        (
            [0, 2, 9],
            r"offsets_E1: expected offsets <= 4 \(the rows of x_ND\), got offsets_E1\[2\] = 9",
        ),
        (
            [0, 3, 2],
            r"offsets_E1: expected non-decreasing.*offsets_E1\[2\] = 2 < offsets_E1\[1\] = 3",
        ),
        ([-1, 2, 4], r"offsets_E1: expected offsets_E1\[0\] = 0, got -1"),  # negative
        ([1, 2, 4], r"offsets_E1: expected offsets_E1\[0\] = 0, got 1"),  # rows before expert 0
        ([0, -2, 4], r"offsets_E1: expected non-decreasing.*offsets_E1\[1\] = -2"),
    ],
)
def test_malformed_offsets_raise(backend, offsets, match):
    for dtype in (torch.int32, torch.int64):
        with pytest.raises(ValueError, match=match):
            mk.grouped_mm(
                torch.randn(4, 8),
                torch.randn(2, 8, 8),
                torch.tensor(offsets, dtype=dtype),
                backend=backend,
            )


def test_user_offsets_checked_route_offsets_trusted_until_modified():
    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    x, w = torch.randn(plan.num_rows, 8), torch.randn(4, 8, 8)
    offs = plan.offsets_E1.clone()  # valid values in a tensor route did not produce: checked
    torch.testing.assert_close(
        mk.grouped_mm(x, w, offs), grouped_mm_reference(x, w, plan.offsets_E1)
    )
    plan.offsets_E1[-1] = plan.num_rows + 5  # an in-place change drops route's mark
    with pytest.raises(ValueError, match=rf"offsets_E1\[4\] = {plan.num_rows + 5}"):
        mk.grouped_mm(x, w, plan.offsets_E1)
