"""dispatch and combine (moe_kernels/ops/dispatch_combine.py) on the CPU backends against the
plain-torch references: values, gradients, opcheck, edge cases and hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops.dispatch_combine import combine_reference, dispatch_reference

from .util import CPU_BACKENDS, DTYPES, assert_close, random_experts

# ---- dispatch ----------------------------------------------------------------------------------

DISPATCH_CASES = [
    (64, 32, 2, 8, None),
    (1, 16, 1, 4, None),  # T = 1, K = 1
    (17, 8, 5, 5, None),  # K = E, prime E
    (64, 32, 2, 8, 6),  # capacity overflow: padding rows must be zero
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", DISPATCH_CASES)
def test_dispatch_matches_reference(backend, dtype, weighted, T, D, K, E, capacity):
    g = torch.Generator().manual_seed(T + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g) if weighted else None
    plan = mk.route(random_experts(T, K, E, seed=2, skew=1.0), E, capacity=capacity)
    out = mk.dispatch(x, plan, weights_TK=w, backend=backend)
    w_cast = None if w is None else w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref = dispatch_reference(x, plan.row_slot_N, K, w_cast)
    assert out.shape == (plan.num_rows, D) and out.dtype == dtype
    if weighted:
        assert_close(out, ref, dtype, "dispatch")
    else:
        assert torch.equal(out, ref)  # a pure gather is exact
    n = int(plan.offsets_E1[-1])
    assert torch.all(out[n:] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("capacity", [None, 3])
def test_dispatch_gradcheck(backend, capacity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(12, 2, dtype=torch.float64, generator=g, requires_grad=True)
    plan = mk.route(random_experts(12, 2, 4, skew=1.0), 4, capacity=capacity)
    fn = lambda x, w: mk.dispatch(x, plan, weights_TK=w, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradcheck(lambda x: mk.dispatch(x, plan, backend=backend), (x,))


def test_dispatch_then_combine_is_identity():
    # Dispatch, then combine with unit weights and k = 1: every token comes back unchanged.
    x = torch.randn(40, 16)
    plan = mk.route(random_experts(40, 1, 7), 7)
    assert torch.equal(mk.combine(mk.dispatch(x, plan), None, plan), x)


def test_dispatch_empty_tokens():
    plan = mk.route(torch.empty(0, 2, dtype=torch.int32), 4)
    assert mk.dispatch(torch.empty(0, 8), plan).shape == (0, 8)


def test_dispatch_bad_arguments():
    plan = mk.route(random_experts(8, 2, 4), 4)
    with pytest.raises(ValueError, match="x_TD: expected a contiguous"):
        mk.dispatch(torch.randn(16, 8).t(), plan)
    with pytest.raises(TypeError, match="plan: expected a RoutingPlan"):
        mk.dispatch(torch.randn(8, 16), (1, 2))
    with pytest.raises(ValueError, match="weights_TK: expected shape"):
        mk.dispatch(torch.randn(8, 16), plan, weights_TK=torch.rand(8, 3))
    with pytest.raises(TypeError, match="x_TD: expected dtype"):
        mk.dispatch(torch.ones(8, 16, dtype=torch.int64), plan)


def test_dispatch_opcheck():
    plan = mk.route(random_experts(16, 2, 4), 4, capacity=5)
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.rand(16, 2, requires_grad=True)
    for backend in CPU_BACKENDS:
        for weights in (None, w):
            torch.library.opcheck(
                torch.ops.moe_kernels.dispatch.default,
                (x, plan.row_slot_N, plan.slot_row_TK, weights, backend),
            )


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(0, 40),
    D=st.integers(1, 24),
    E=st.integers(1, 12),
    data=st.data(),
    cf=st.sampled_from([None, 0.5, 1.0, 2.0]),
    skew=st.sampled_from([0.0, 2.0]),
    seed=st.integers(0, 2**16),
    bf16=st.booleans(),
)
def test_dispatch_property_cpu_equals_reference(T, D, E, data, cf, skew, seed, bf16):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    x = x.bfloat16() if bf16 else x
    w = torch.rand(T, K, generator=g)
    cap = None if cf is None else math.ceil(cf * T * K / E)
    plan = mk.route(random_experts(T, K, E, seed=seed, skew=skew), E, capacity=cap)
    assert torch.equal(
        mk.dispatch(x, plan, backend="cpu"), dispatch_reference(x, plan.row_slot_N, K)
    )
    out = mk.dispatch(x, plan, weights_TK=w, backend="cpu")
    torch.testing.assert_close(out, dispatch_reference(x, plan.row_slot_N, K, w))


# ---- combine -----------------------------------------------------------------------------------

COMBINE_CASES = [
    (64, 32, 2, 8, None),
    (1, 16, 1, 4, None),  # T = 1, K = 1
    (17, 8, 5, 5, None),  # K = E, prime E
    (64, 32, 2, 8, 6),  # capacity overflow: dropped slots add zero
    (20, 8, 1, 8, 0),  # capacity 0: every token dropped, output all zero
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", COMBINE_CASES)
def test_combine_matches_reference(backend, dtype, weighted, T, D, K, E, capacity):
    g = torch.Generator().manual_seed(T + D)
    plan = mk.route(random_experts(T, K, E, seed=3, skew=1.0), E, capacity=capacity)
    y = torch.randn(plan.num_rows, D, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g) if weighted else None
    out = mk.combine(y, w, plan, backend=backend)
    w_cast = None if w is None else w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref = combine_reference(y, plan.slot_row_TK, w_cast)
    assert out.shape == (T, D) and out.dtype == dtype
    assert_close(out, ref, dtype, "combine")
    if capacity == 0:
        assert torch.all(out == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("capacity", [None, 3])
def test_combine_gradcheck(backend, capacity):
    g = torch.Generator().manual_seed(0)
    plan = mk.route(random_experts(12, 2, 4, skew=1.0), 4, capacity=capacity)
    y = torch.randn(plan.num_rows, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(12, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: mk.combine(y, w, plan, backend=backend), (y, w))
    assert torch.autograd.gradcheck(lambda y: mk.combine(y, None, plan, backend=backend), (y,))


def test_combine_deterministic():
    plan = mk.route(random_experts(300, 4, 8), 8)
    y = torch.randn(plan.num_rows, 64)
    w = torch.rand(300, 4)
    a = mk.combine(y, w, plan)
    assert all(torch.equal(a, mk.combine(y, w, plan)) for _ in range(3))


def test_combine_bad_arguments():
    plan = mk.route(random_experts(8, 2, 4), 4)
    with pytest.raises(ValueError, match=r"y_ND: expected 16 rows \(plan.num_rows\), got 15"):
        mk.combine(torch.randn(15, 4), None, plan)
    with pytest.raises(ValueError, match="y_ND: expected a contiguous"):
        mk.combine(torch.randn(4, 16).t(), None, plan)
    with pytest.raises(ValueError, match="weights_TK: expected shape"):
        mk.combine(torch.randn(16, 4), torch.rand(8, 1), plan)


def test_combine_opcheck():
    plan = mk.route(random_experts(16, 2, 4), 4, capacity=5)
    y = torch.randn(plan.num_rows, 8, requires_grad=True)
    w = torch.rand(16, 2, requires_grad=True)
    for backend in CPU_BACKENDS:
        for weights in (None, w):
            torch.library.opcheck(
                torch.ops.moe_kernels.combine.default,
                (y, plan.row_slot_N, plan.slot_row_TK, weights, backend),
            )
        torch.library.opcheck(
            torch.ops.moe_kernels.weight_grad.default,
            (torch.randn(16, 8), y.detach(), plan.slot_row_TK, torch.float32, backend),
        )


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(0, 40),
    D=st.integers(1, 24),
    E=st.integers(1, 12),
    data=st.data(),
    cf=st.sampled_from([None, 0.5, 1.0, 2.0]),
    skew=st.sampled_from([0.0, 2.0]),
    seed=st.integers(0, 2**16),
    bf16=st.booleans(),
)
def test_combine_property_cpu_equals_reference(T, D, E, data, cf, skew, seed, bf16):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    cap = None if cf is None else math.ceil(cf * T * K / E)
    plan = mk.route(random_experts(T, K, E, seed=seed, skew=skew), E, capacity=cap)
    y = torch.randn(plan.num_rows, D, generator=g)
    y = y.bfloat16() if bf16 else y
    w = torch.rand(T, K, generator=g)
    out = mk.combine(y, w, plan, backend="cpu")
    ref = combine_reference(y, plan.slot_row_TK, w)
    tol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    dw = torch.ops.moe_kernels.weight_grad(
        y.new_ones(T, D), y, plan.slot_row_TK, torch.float32, "cpu"
    )
    dw_ref = torch.ops.moe_kernels.weight_grad(
        y.new_ones(T, D), y, plan.slot_row_TK, torch.float32, "reference"
    )
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)


# ---- the plan against its inputs -----------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dispatch_token_count_must_match_plan(backend):
    # The reproduction: a plan of 6 tokens used to read x_TD's 3 rows and heap garbage beyond.
    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    with pytest.raises(ValueError, match=r"x_TD: expected 6 rows \(the tokens of plan\), got 3"):
        mk.dispatch(torch.ones(3, 8), plan, backend=backend)
    with pytest.raises(ValueError, match=r"weights_TK: expected shape \(6, 2\), got \(3, 2\)"):
        mk.combine(torch.ones(plan.num_rows, 8), torch.rand(3, 2), plan, backend=backend)
    with pytest.raises(ValueError, match=r"y_ND: expected 12 rows \(plan.num_rows\), got 11"):
        mk.combine(torch.ones(11, 8), None, plan, backend=backend)


def _plan_with(plan, **tensors):
    return plan._replace(**tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "field,value,error,match",
    [
        # a row pointing past the T * K = 12 slots: dispatch would read past x_TD
        ("row_slot_N", 12, ValueError, r"plan.row_slot_N: expected slots in \[-1, 12\).*= 12"),
        ("row_slot_N", -2, ValueError, r"plan.row_slot_N: expected slots in \[-1, 12\).*= -2"),
        # a slot pointing past the N = 12 rows: combine would read past y_ND
        ("slot_row_TK", 40, ValueError, r"plan.slot_row_TK: expected rows in \[-1, 12\).*= 40"),
    ],
)
def test_hand_made_plan_values_checked(backend, field, value, error, match):
    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    bad = getattr(plan, field).clone()
    bad.view(-1)[1] = value
    plan = _plan_with(plan, **{field: bad})
    with pytest.raises(error, match=match):
        mk.dispatch(torch.ones(6, 8), plan, backend=backend)
    with pytest.raises(error, match=match):
        mk.combine(torch.ones(12, 8), None, plan, backend=backend)


def test_hand_made_plan_dtype_checked():
    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    plan = _plan_with(plan, row_slot_N=plan.row_slot_N.long())  # the kernels read int32
    with pytest.raises(TypeError, match=r"plan.row_slot_N: expected dtype in \['torch.int32'\]"):
        mk.dispatch(torch.ones(6, 8), plan)


def test_valid_hand_made_plan_and_in_place_change():
    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    x = torch.randn(6, 8)
    copy = _plan_with(plan, row_slot_N=plan.row_slot_N.clone())  # valid, not from route
    assert torch.equal(mk.dispatch(x, copy), dispatch_reference(x, plan.row_slot_N, 2))
    plan.row_slot_N[0] = 99  # modified in place after route: checked again
    with pytest.raises(ValueError, match=r"plan.row_slot_N\[0\] = 99"):
        mk.dispatch(x, plan)


def test_hand_made_plan_sanitised_where_values_cannot_be_read():
    # The device path (no host read): out-of-range entries become -1 (padding row / dropped
    # slot) instead of indexing outside x_TD or y_ND. Exercised on CPU through torch.compile's
    # tracing, where values cannot be read either.
    from moe_kernels.ops.dispatch_combine import check_plan

    _, e = mk.topk_gating(torch.randn(6, 4), 2)
    plan = mk.route(e, 4)
    row_slot, slot_row = plan.row_slot_N.clone(), plan.slot_row_TK.clone()
    row_slot[1], slot_row[0, 1] = 40, -7
    bad = plan._replace(row_slot_N=row_slot, slot_row_TK=slot_row)
    x = torch.randn(6, 8)
    traced = torch.compile(lambda p: check_plan(p, x, "x_TD", 6), backend="eager", fullgraph=True)
    rs, sr = traced(bad)
    want_rs, want_sr = row_slot.clone(), slot_row.clone()
    want_rs[1], want_sr[0, 1] = -1, -1
    assert torch.equal(rs, want_rs) and torch.equal(sr, want_sr)


def test_inference_mode_plan_is_always_checked():
    # Inference tensors have no version counter: an in-place change could not be seen, so their
    # plans are never trusted, and a change is caught by the check.
    with torch.inference_mode():
        _, e = mk.topk_gating(torch.randn(6, 4), 2)
        plan = mk.route(e, 4)
        x = torch.randn(6, 8)
        assert torch.equal(mk.dispatch(x, plan), dispatch_reference(x, plan.row_slot_N, 2))
        plan.row_slot_N[2] = 77
        with pytest.raises(ValueError, match=r"plan.row_slot_N\[2\] = 77"):
            mk.dispatch(x, plan)
