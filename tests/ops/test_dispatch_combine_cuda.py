"""CUDA dispatch, combine and weight_grad (csrc/cuda/dispatch_combine.cu) against the plain-torch
references.

GPU tests (marked ``gpu``) force ``backend=BACKEND`` on random plans built on the CPU and moved to
the device, so they exercise these kernels and nothing else. Dispatch (a copy or one rounded
multiply) and combine (fp32 sums in slot order, rounded once) match the references bit for bit in
every dtype; weight_grad sums in a different order than ``torch.sum``, so it is checked against the
fp64 value within the accumulation dtype's tolerance relative to sum |a_i b_i|. The CPU tests check
the build exports the kernels and that the backend declines what it cannot run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops import _select as S
from moe_kernels.ops.dispatch_combine import (
    BACKENDS,
    combine_reference,
    dispatch_reference,
    weight_grad_reference,
)
from moe_kernels.ops.route import RoutingPlan

from .util import assert_close, random_experts

DEVICE = "cuda"
BACKEND = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (T, D, K, E, capacity)
SHAPES = [
    (64, 32, 2, 8, None),  # 16-byte packs in every dtype
    (0, 32, 2, 4, None),  # T = 0: empty plan, nothing launched
    (1, 16, 1, 4, None),  # T = 1, K = 1
    (17, 13, 5, 5, None),  # D = 13: scalar path in every dtype; K = E, prime E
    (33, 12, 3, 7, None),  # D = 12: packs for fp32 (48 bytes), scalar for bf16/fp16 (24 bytes)
    (64, 32, 2, 8, 6),  # capacity overflow: dropped slots and padding rows
    (20, 8, 1, 8, 0),  # capacity 0: every slot dropped, N = 0
    (256, 4096, 4, 16, None),  # large D: several packs per thread
    (3000, 64, 8, 64, 300),  # many tokens, K = 8, skewed routing with drops
]


def make_plan(T, K, E, capacity, seed=0):
    """A plan built by the CPU router, moved to the device (isolates these kernels)."""
    plan = mk.route(random_experts(T, K, E, seed=seed, skew=1.0), E, capacity=capacity)
    return RoutingPlan(*(t.to(DEVICE) for t in plan))


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def gate_weights(T, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, K, generator=g).to(S.weight_dtype_for(dtype)).to(DEVICE)


def poison_cache():
    """Leave NaN in freed allocator blocks so an output element a kernel never writes is more
    likely to show up as NaN (torch.empty hands back cached memory as it is)."""
    blocks = [torch.full((n,), float("nan"), device=DEVICE) for n in (1 << 24, 1 << 17, 1 << 10)]
    del blocks


def assert_equal(actual, expected, what):
    err = (actual.double() - expected.double()).abs()
    if err.numel():
        print(f"{what} {actual.dtype}: max err {err.max().item():.3e}")
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), what


def assert_dot_close(grad_w, a, b, slot_row, dtype, what):
    """grad_w[t, k] = <a[t], b[slot_row[t, k]]>: within the accumulation dtype's tolerance of the
    fp64 value, relative to sum_i |a_i b_i| (the error bound of a summed dot product)."""
    acc = S.weight_dtype_for(dtype)
    tol = S.DEFAULT_TOLERANCES[acc]
    exact = weight_grad_reference(a.double(), b.double(), slot_row, torch.float64)
    scale = weight_grad_reference(a.double().abs(), b.double().abs(), slot_row, torch.float64)
    assert grad_w.dtype == acc and grad_w.shape == slot_row.shape
    err = (grad_w.double() - exact).abs()
    if err.numel():
        print(f"{what} {dtype}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}")
    bad = err > tol.atol + tol.rtol * scale
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} outside the bound"


def reference_grads(fn, inputs, g):
    """Gradients of sum(fn(*inputs) * g) by autograd through a plain-torch reference; zeros for
    inputs the output does not depend on (e.g. y_ND when every slot is dropped)."""
    out = fn(*inputs)
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return torch.autograd.grad(out, inputs, g, allow_unused=True, materialize_grads=True)


def assert_weight_grad_close(actual, expected, a, b, slot_row, dtype, what):
    """Weight gradients against fp64 ones, bounded as in assert_dot_close."""
    tol = S.DEFAULT_TOLERANCES[S.weight_dtype_for(dtype)]
    scale = weight_grad_reference(a.double().abs(), b.double().abs(), slot_row, torch.float64)
    err = (actual.double() - expected.double()).abs()
    assert torch.all(err <= tol.atol + tol.rtol * scale), what


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", SHAPES)
def test_dispatch_matches_reference(dtype, weighted, T, D, K, E, capacity):
    plan = make_plan(T, K, E, capacity)
    x = randn(T, D, dtype=dtype, seed=T + D)
    w = gate_weights(T, K, dtype, seed=1) if weighted else None
    poison_cache()
    out = mk.dispatch(x, plan, weights_TK=w, backend=BACKEND)
    assert out.device == x.device
    assert_equal(out, dispatch_reference(x, plan.row_slot_N, K, w), "dispatch")
    n = int(plan.offsets_E1[-1])
    assert torch.all(out[n:] == 0)  # padding rows


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", SHAPES)
def test_combine_matches_reference(dtype, weighted, T, D, K, E, capacity):
    plan = make_plan(T, K, E, capacity)
    y = randn(plan.num_rows, D, dtype=dtype, seed=T + D)
    w = gate_weights(T, K, dtype, seed=2) if weighted else None
    poison_cache()
    out = mk.combine(y, w, plan, backend=BACKEND)
    assert out.device == y.device
    # Same operations in the same order as the reference: bit-identical, bf16 and fp16 included.
    assert_equal(out, combine_reference(y, plan.slot_row_TK, w), "combine")
    if capacity == 0:
        assert torch.all(out == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,K,E,capacity", SHAPES)
def test_weight_grad_matches_reference(dtype, T, D, K, E, capacity):
    plan = make_plan(T, K, E, capacity)
    a = randn(T, D, dtype=dtype, seed=3)
    b = randn(plan.num_rows, D, dtype=dtype, seed=4)
    wdtype = S.weight_dtype_for(dtype)
    poison_cache()
    dw = torch.ops.moe_kernels.weight_grad(a, b, plan.slot_row_TK, wdtype, BACKEND)
    assert_dot_close(dw, a, b, plan.slot_row_TK, dtype, "weight_grad")
    assert torch.all(dw[plan.slot_row_TK < 0] == 0)  # dropped slots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_inputs_take_the_scalar_path(dtype):
    # Contiguous views one element into their storage: rows are whole 16-byte packs but the
    # pointers are not 16-byte aligned, so the kernels must fall back to element accesses.
    T, D, K, E = 40, 64, 2, 8
    plan = make_plan(T, K, E, None)
    x = randn(T * D + 1, dtype=dtype, seed=5)[1:].view(T, D)
    y = randn(plan.num_rows * D + 1, dtype=dtype, seed=6)[1:].view(plan.num_rows, D)
    assert x.is_contiguous() and x.data_ptr() % 16 and y.data_ptr() % 16
    w = gate_weights(T, K, dtype, seed=7)
    out = mk.dispatch(x, plan, weights_TK=w, backend=BACKEND)
    assert_equal(out, dispatch_reference(x, plan.row_slot_N, K, w), "dispatch unaligned")
    out = mk.combine(y, w, plan, backend=BACKEND)
    assert_equal(out, combine_reference(y, plan.slot_row_TK, w), "combine unaligned")
    dw = torch.ops.moe_kernels.weight_grad(x, y, plan.slot_row_TK, torch.float32, BACKEND)
    assert_dot_close(dw, x, y, plan.slot_row_TK, dtype, "weight_grad unaligned")


@pytest.mark.gpu
def test_more_rows_than_one_grid():
    # The launchers cap the grid at 65535 blocks and the kernels stride over the rest.
    # D = 2048 bf16 is 256 packs: one row per 256-thread block, so 70000 rows need striding.
    T, D, K, E = 35000, 2048, 2, 8
    plan = make_plan(T, K, E, None)
    x = randn(T, D, dtype=torch.bfloat16, seed=8)
    w = gate_weights(T, K, torch.bfloat16, seed=9)
    x_ND = mk.dispatch(x, plan, weights_TK=w, backend=BACKEND)
    assert_equal(x_ND, dispatch_reference(x, plan.row_slot_N, K, w), "dispatch many rows")
    y = randn(plan.num_rows, D, dtype=torch.bfloat16, seed=10)
    out = mk.combine(y, w, plan, backend=BACKEND)
    assert_equal(out, combine_reference(y, plan.slot_row_TK, w), "combine many rows")
    # weight_grad: one warp per (token, slot), 8 per block, so > 65535 * 8 pairs need striding.
    T, D, K, E = 270000, 8, 2, 4
    plan = make_plan(T, K, E, None)
    a = randn(T, D, dtype=torch.float32, seed=11)
    b = randn(plan.num_rows, D, dtype=torch.float32, seed=12)
    dw = torch.ops.moe_kernels.weight_grad(a, b, plan.slot_row_TK, torch.float32, BACKEND)
    assert_dot_close(dw, a, b, plan.slot_row_TK, torch.float32, "weight_grad many pairs")


@pytest.mark.gpu
@settings(max_examples=100, deadline=None)
@given(
    T=st.integers(0, 40),
    D=st.integers(1, 40),
    E=st.integers(1, 12),
    data=st.data(),
    cf=st.sampled_from([None, 0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_property_cuda_equals_reference(T, D, E, data, cf, seed, dtype):
    K = data.draw(st.integers(1, E))
    cap = None if cf is None else math.ceil(cf * T * K / E)
    plan = make_plan(T, K, E, cap, seed=seed)
    x = randn(T, D, dtype=dtype, seed=seed)
    y = randn(plan.num_rows, D, dtype=dtype, seed=seed + 1)
    w = gate_weights(T, K, dtype, seed=seed + 2)
    assert torch.equal(
        mk.dispatch(x, plan, weights_TK=w, backend=BACKEND),
        dispatch_reference(x, plan.row_slot_N, K, w),
    )
    assert torch.equal(
        mk.combine(y, w, plan, backend=BACKEND), combine_reference(y, plan.slot_row_TK, w)
    )
    dw = torch.ops.moe_kernels.weight_grad(
        x, y, plan.slot_row_TK, S.weight_dtype_for(dtype), BACKEND
    )
    assert_dot_close(dw, x, y, plan.slot_row_TK, dtype, "weight_grad")


# ---- backward -------------------------------------------------------------------------------

BACKWARD_SHAPES = [
    (64, 32, 2, 8, None),  # packs
    (0, 32, 2, 4, None),  # T = 0
    (17, 13, 5, 5, None),  # scalar path
    (64, 32, 2, 8, 6),  # drops and padding rows
    (20, 8, 1, 8, 0),  # every slot dropped
    (128, 1024, 4, 16, 40),  # wide rows with drops
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", BACKWARD_SHAPES)
def test_dispatch_backward(dtype, weighted, T, D, K, E, capacity):
    plan = make_plan(T, K, E, capacity)
    x = randn(T, D, dtype=dtype, seed=13).requires_grad_()
    w = gate_weights(T, K, dtype, seed=14).requires_grad_() if weighted else None
    g = randn(plan.num_rows, D, dtype=dtype, seed=15)
    out = mk.dispatch(x, plan, weights_TK=w, backend=BACKEND)
    grads = torch.autograd.grad(out, (x, w) if weighted else (x,), g)
    wd = w.detach() if weighted else None
    # The adjoint: d x = combine(g, w) exactly, d w = <x[t], g[row]>.
    assert_equal(grads[0], combine_reference(g, plan.slot_row_TK, wd), "dispatch dx")
    if weighted:
        assert_dot_close(grads[1], x.detach(), g, plan.slot_row_TK, dtype, "dispatch dw")
    # And fp64 autograd through the plain-torch reference agrees.
    x64 = x.detach().double().requires_grad_()
    inputs = (x64, wd.double().requires_grad_()) if weighted else (x64,)
    fn = lambda x, w=None: dispatch_reference(x, plan.row_slot_N, K, w)
    ref = reference_grads(fn, inputs, g.double())
    assert_close(grads[0], ref[0], dtype, "dispatch dx vs fp64 autograd")
    if weighted:
        assert_weight_grad_close(grads[1], ref[1], x, g, plan.slot_row_TK, dtype, "dispatch dw")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T,D,K,E,capacity", BACKWARD_SHAPES)
def test_combine_backward(dtype, weighted, T, D, K, E, capacity):
    plan = make_plan(T, K, E, capacity)
    y = randn(plan.num_rows, D, dtype=dtype, seed=16).requires_grad_()
    w = gate_weights(T, K, dtype, seed=17).requires_grad_() if weighted else None
    g = randn(T, D, dtype=dtype, seed=18)
    out = mk.combine(y, w, plan, backend=BACKEND)
    grads = torch.autograd.grad(out, (y, w) if weighted else (y,), g)
    wd = w.detach() if weighted else None
    # The adjoint: d y = dispatch(g, w) exactly, d w = <g[t], y[row]>.
    assert_equal(grads[0], dispatch_reference(g, plan.row_slot_N, K, wd), "combine dy")
    if weighted:
        assert_dot_close(grads[1], g, y.detach(), plan.slot_row_TK, dtype, "combine dw")
    y64 = y.detach().double().requires_grad_()
    inputs = (y64, wd.double().requires_grad_()) if weighted else (y64,)
    fn = lambda y, w=None: combine_reference(y, plan.slot_row_TK, w)
    ref = reference_grads(fn, inputs, g.double())
    assert_close(grads[0], ref[0], dtype, "combine dy vs fp64 autograd")
    if weighted:
        assert_weight_grad_close(grads[1], ref[1], g, y, plan.slot_row_TK, dtype, "combine dw")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [5, 6])  # fp64 rows of 40 bytes (scalar) and 48 bytes (packs)
@pytest.mark.parametrize("capacity", [None, 3])
def test_gradcheck_fp64(D, capacity):
    plan = make_plan(12, 2, 4, capacity)
    x = randn(12, D, dtype=torch.float64, seed=19).requires_grad_()
    y = randn(plan.num_rows, D, dtype=torch.float64, seed=20).requires_grad_()
    w = gate_weights(12, 2, torch.float64, seed=21).requires_grad_()
    dispatch = lambda x, w: mk.dispatch(x, plan, weights_TK=w, backend=BACKEND)
    combine = lambda y, w: mk.combine(y, w, plan, backend=BACKEND)
    assert torch.autograd.gradcheck(dispatch, (x, w))
    assert torch.autograd.gradcheck(combine, (y, w))
    assert torch.autograd.gradcheck(lambda x: mk.dispatch(x, plan, backend=BACKEND), (x,))
    assert torch.autograd.gradcheck(lambda y: mk.combine(y, None, plan, backend=BACKEND), (y,))


# ---- determinism, synchronisation, graphs, selection ----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    T, D, K, E = 4096, 512, 8, 64
    plan = make_plan(T, K, E, None)
    y = randn(plan.num_rows, D, dtype=dtype, seed=22).requires_grad_()
    w = gate_weights(T, K, dtype, seed=23).requires_grad_()
    g = randn(T, D, dtype=dtype, seed=24)

    def run():
        out = mk.combine(y, w, plan, backend=BACKEND)
        return (out, *torch.autograd.grad(out, (y, w), g))

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


@pytest.mark.gpu
def test_no_host_sync():
    T, D, K, E = 256, 64, 2, 8
    plan = make_plan(T, K, E, 40)
    x = randn(T, D, dtype=torch.bfloat16, seed=25).requires_grad_()
    w = gate_weights(T, K, torch.bfloat16, seed=26).requires_grad_()
    g = randn(T, D, dtype=torch.bfloat16, seed=27)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:  # automatic backend selection, forward and backward
        out = mk.combine(mk.dispatch(x, plan, weights_TK=w) * 2, w, plan)
        out.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert x.grad is not None and w.grad is not None
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(w.grad).all()


@pytest.mark.gpu
def test_cuda_graph_capture():
    T, D, K, E = 64, 32, 2, 8
    plan = make_plan(T, K, E, 6)
    x = randn(T, D, dtype=torch.bfloat16, seed=28)
    w = gate_weights(T, K, torch.bfloat16, seed=29)
    step = lambda: mk.combine(mk.dispatch(x, plan, weights_TK=w, backend=BACKEND), w, plan)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream before capturing
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(randn(T, D, dtype=torch.bfloat16, seed=30))
    graph.replay()
    torch.cuda.synchronize()
    expected = combine_reference(dispatch_reference(x, plan.row_slot_N, K, w), plan.slot_row_TK, w)
    assert_equal(out, expected, "graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_automatic_selection_picks_cuda(dtype):
    x = randn(4, 8, dtype=dtype, seed=31)
    w = gate_weights(4, 2, dtype, seed=32)
    assert S.select("dispatch", BACKENDS, None, x=x, weights=w).name == "cuda"
    assert S.select("combine", BACKENDS, None, x=x, weights=w).name == "cuda"


# ---- CPU-runnable checks --------------------------------------------------------------------


def test_cuda_backend_is_first_and_declines_cpu_tensors():
    # One backend list serves the adjoint pair: its cuda backend runs both dispatch and combine.
    assert BACKENDS[0].name == "cuda"
    x = torch.randn(8, 16)
    assert "needs CUDA tensors, got cpu" in BACKENDS[0].not_supported_reasons(x=x, weights=None)
    plan = mk.route(random_experts(8, 2, 4), 4)
    with pytest.raises(S.NoBackendError, match="cuda: .*needs CUDA tensors, got cpu"):
        mk.dispatch(x, plan, backend="cuda")
    with pytest.raises(S.NoBackendError, match="cuda: .*needs CUDA tensors, got cpu"):
        mk.combine(torch.randn(16, 16), None, plan, backend="cuda")


def test_cuda_backend_declines_weights_it_has_no_kernel_for():
    x = torch.randn(8, 16)
    reasons = BACKENDS[0].not_supported_reasons(x=x, weights=torch.rand(8, 2, dtype=torch.bfloat16))
    assert "weights dtype torch.bfloat16 not in [torch.float32, torch.float64]" in reasons


@pytest.mark.skipif(S._C is None, reason="moe_kernels._C is not built")
def test_cuda_backend_says_when_built_without_cuda(monkeypatch):
    monkeypatch.setattr(S, "_C_HAS_CUDA", False)
    x = torch.randn(8, 16)
    assert "moe_kernels._C was built without CUDA" in BACKENDS[0].not_supported_reasons(
        x=x, weights=None
    )


needs_cuda_build = pytest.mark.skipif(not S._C_HAS_CUDA, reason="moe_kernels._C built without CUDA")


@needs_cuda_build
def test_C_exports_the_dispatch_combine_kernels():
    for name in ("dispatch_cuda", "combine_cuda", "weight_grad_cuda"):
        assert callable(getattr(S._C, name)), name


@needs_cuda_build
def test_bindings_reject_bad_dtype_codes():
    # Checked on the host before any CUDA call, so this runs without a GPU.
    with pytest.raises(ValueError, match="x_TD: unsupported dtype code 9"):
        S._C.dispatch_cuda(0, 9, 0, 8, 2, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="weights_TK: unsupported dtype code 1"):
        S._C.combine_cuda(0, 0, 0, 8, 0, 0, 2, 16, 1, 0, 0)
    with pytest.raises(ValueError, match="y_ND: unsupported dtype code -1"):
        S._C.combine_cuda(0, -1, 0, 8, 0, 0, 2, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="grad_w_TK: unsupported dtype code 1"):
        S._C.weight_grad_cuda(0, 0, 0, 0, 8, 2, 0, 0, 1, 0)
