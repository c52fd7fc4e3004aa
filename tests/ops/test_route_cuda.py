"""CUDA routing plan (csrc/cuda/route.cu) against the plain-torch reference.

GPU tests carry the ``gpu`` marker (skipped without a device); the CPU tests at the end check the
backend's declines and the compiled exports.
"""

import importlib
import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.ops import _select as S
from moe_kernels.ops.route import num_rows, route_reference

from .test_route import assert_plans_equal, check_invariants
from .util import random_experts

route_mod = importlib.import_module("moe_kernels.ops.route")  # the package exports route()

CASES = [
    # T, K, E, capacity, skew
    (0, 2, 4, None, 0.0),  # T = 0: empty plan, no sort
    (0, 2, 4, 3, 0.0),
    (1, 1, 4, None, 0.0),  # T = 1, K = 1
    (31, 5, 5, None, 0.0),  # K = E, prime E
    (50, 2, 13, None, 0.0),  # prime E, empty experts likely
    (64, 2, 8, 10, 2.0),  # capacity overflow under skew
    (64, 2, 8, 0, 0.0),  # capacity 0 drops everything
    (16, 1, 8, 100, 0.0),  # capacity above every count: nothing dropped
    (4096, 8, 64, None, 0.0),  # many chunks per expert
    (4096, 8, 64, 300, 1.5),  # capacity with skew, many chunks
    (3000, 2, 256, 10, 2.0),  # E = 256, heavy skew: most experts overflow or are empty
    (1000, 4, 1000, 3, 1.0),  # E not a multiple of 32 or 128: chunks of 256 slots
    (500, 2, 8192, 1, 0.5),  # E at the limit: one warp per block
    (20000, 2, 8, 4000, 3.0),  # very skewed, long chunks walk
    (100000, 1, 3, None, 0.0),  # few experts, many slots
]


def run_both(experts, E, capacity, weights, drop):
    plan = mk.route(experts, E, capacity=capacity, weights_TK=weights, drop=drop, backend="cuda")
    ref = route_reference(
        experts.cpu(), E, capacity, None if weights is None else weights.cpu(), drop
    )
    return plan, ref


@pytest.mark.gpu
@pytest.mark.parametrize("drop", ["position", "score"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,K,E,capacity,skew", CASES)
def test_matches_reference(T, K, E, capacity, skew, drop, wdtype):
    experts = random_experts(T, K, E, seed=T + E + K, skew=skew).cuda()
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(1), dtype=wdtype).cuda()
    plan, ref = run_both(experts, E, capacity, weights, drop)
    assert plan.num_rows == num_rows(T, K, E, capacity)  # N from the host, no sync
    for t in plan:
        assert t.is_cuda and t.dtype == torch.int32
    assert_plans_equal([t.cpu() for t in plan[:5]], ref)
    check_invariants(mk.RoutingPlan(*[t.cpu() for t in plan]), experts.cpu(), E, capacity)


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64])
def test_score_ties_signed_zeros_and_nan(wdtype):
    # Quantised weights give many exact ties (kept by lower slot); -0.0 and +0.0 tie; negative
    # weights rank below zero; NaN weights rank last.
    T, K, E = 3000, 2, 6
    experts = random_experts(T, K, E, seed=4, skew=1.0).cuda()
    g = torch.Generator().manual_seed(9)
    weights = (torch.randint(-2, 3, (T, K), generator=g) / 2).to(wdtype)
    weights[weights == 0] = torch.where(
        torch.rand(int((weights == 0).sum()), generator=g) < 0.5, -0.0, 0.0
    ).to(wdtype)
    weights[torch.rand(T, K, generator=g) < 0.01] = float("nan")
    weights = weights.cuda()
    for capacity in (0, 1, 250, 600, 2000):
        plan, ref = run_both(experts, E, capacity, weights, "score")
        assert_plans_equal([t.cpu() for t in plan[:5]], ref)


@pytest.mark.gpu
def test_score_policy_small_examples():
    experts = torch.zeros(4, 1, dtype=torch.int32, device="cuda")
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9]], device="cuda")
    plan = mk.route(experts, 2, capacity=2, weights_TK=weights, drop="score", backend="cuda")
    assert plan.slot_row_TK[:, 0].tolist() == [-1, 0, -1, 1]  # rows stay in token order
    ties = torch.full((4, 1), 0.5, device="cuda")
    plan = mk.route(experts, 2, capacity=2, weights_TK=ties, drop="score", backend="cuda")
    assert plan.slot_row_TK[:, 0].tolist() == [0, 1, -1, -1]  # ties: later slots dropped first
    assert plan.row_slot_N.tolist() == [0, 1, -1, -1]


@pytest.mark.gpu
@pytest.mark.parametrize("drop", ["position", "score"])
def test_every_token_to_one_expert(drop):
    experts = torch.full((5000, 1), 3, dtype=torch.int32, device="cuda")
    weights = torch.rand(5000, 1, generator=torch.Generator().manual_seed(0)).cuda()
    plan, ref = run_both(experts, 6, 700, weights, drop)
    assert plan.kept_E.tolist() == [0, 0, 0, 700, 0, 0]
    assert plan.counts_E.tolist() == [0, 0, 0, 5000, 0, 0]
    assert_plans_equal([t.cpu() for t in plan[:5]], ref)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [None, 0, 2, 50])
@pytest.mark.parametrize("drop", ["position", "score"])
def test_out_of_range_ids_are_skipped(capacity, drop):
    """The CUDA backend cannot raise without a sync: ids outside [0, E) are not counted and get no
    row. Expected plan: the reference with those ids moved to an extra expert E, which sorts last
    and so shifts nothing, then cut back to E experts."""
    T, K, E = 300, 3, 7
    experts = random_experts(T, K, E, seed=2).long()
    g = torch.Generator().manual_seed(3)
    bad = torch.rand(T, K, generator=g) < 0.1
    experts[bad] = torch.tensor([-1, E, 100, -(2**31)])[
        torch.randint(0, 4, (int(bad.sum()),), generator=g)
    ]
    weights = torch.rand(T, K, generator=g)
    plan = mk.route(
        experts.cuda(), E, capacity=capacity, weights_TK=weights.cuda(), drop=drop, backend="cuda"
    )
    moved = torch.where(bad, E, experts).to(torch.int32)
    counts, kept, offsets, row_slot, slot_row = route_reference(
        moved, E + 1, capacity, weights, drop
    )
    used = int(offsets[E])
    assert torch.equal(plan.counts_E.cpu(), counts[:E])
    assert torch.equal(plan.kept_E.cpu(), kept[:E])
    assert torch.equal(plan.offsets_E1.cpu(), offsets[: E + 1])
    assert plan.num_rows == num_rows(T, K, E, capacity)
    assert torch.equal(plan.row_slot_N.cpu()[:used], row_slot[:used])
    assert (plan.row_slot_N.cpu()[used:] == -1).all()
    assert torch.equal(plan.slot_row_TK.cpu(), torch.where(bad, -1, slot_row))


@pytest.mark.gpu
@pytest.mark.parametrize("drop", ["position", "score"])
def test_no_host_sync(drop):
    experts = random_experts(2048, 4, 32, seed=1, skew=1.0).cuda()
    weights = torch.rand(2048, 4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = mk.route(experts, 32, capacity=200, weights_TK=weights, drop=drop, backend="cuda")
        dropless = mk.route(experts, 32, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_plans_equal(
        [t.cpu() for t in plan[:5]], route_reference(experts.cpu(), 32, 200, weights.cpu(), drop)
    )
    assert_plans_equal([t.cpu() for t in dropless[:5]], route_reference(experts.cpu(), 32))


@pytest.mark.gpu
def test_cuda_graph_capture_of_gating_and_route():
    T, E, K, cap = 1024, 16, 2, 100
    logits = torch.randn(T, E, device="cuda")

    def run():
        w, e = mk.topk_gating(logits, K, backend="cuda")
        return mk.route(e, E, capacity=cap, weights_TK=w, drop="score", backend="cuda"), w, e

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan, w, e = run()
    logits.copy_(torch.randn(T, E, generator=torch.Generator().manual_seed(5)) * 3)
    graph.replay()
    torch.cuda.synchronize()
    ref = route_reference(e.cpu(), E, cap, w.cpu(), "score")
    assert_plans_equal([t.cpu() for t in plan[:5]], ref)
    assert torch.equal(e.cpu(), mk.topk_gating(logits.cpu(), K, backend="reference")[1])


@pytest.mark.gpu
def test_property_random_sizes():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        T = int(torch.randint(0, 3000, (1,), generator=g))
        E = int(torch.randint(1, 300, (1,), generator=g))
        K = int(torch.randint(1, min(E, 8) + 1, (1,), generator=g))
        skew = [0.0, 1.2, 3.0][trial % 3]
        factor = [None, 0.0, 0.5, 1.0, 1.25][trial % 5]
        cap = None if factor is None else math.ceil(factor * T * K / E)
        drop = "score" if trial % 2 else "position"
        experts = random_experts(T, K, E, seed=trial, skew=skew).cuda()
        weights = torch.rand(T, K, generator=g).cuda()
        plan, ref = run_both(experts, E, cap, weights, drop)
        assert_plans_equal([t.cpu() for t in plan[:5]], ref)


@pytest.mark.gpu
def test_opcheck():
    e = random_experts(24, 2, 6).cuda()
    w = torch.rand(24, 2, device="cuda")
    for cap, drop in [(-1, "position"), (5, "position"), (5, "score")]:
        torch.library.opcheck(torch.ops.moe_kernels.route.default, (e, 6, cap, w, drop, "cuda"))


# ---- CPU-runnable: declines and exports --------------------------------------------------------


def test_cuda_backend_declines_cpu_tensors_with_a_reason():
    with pytest.raises(mk.NoBackendError) as info:
        mk.route(random_experts(8, 2, 4), 4, backend="cuda")
    msg = str(info.value)
    assert "cuda:" in msg
    assert "needs CUDA tensors, got cpu" in msg or "without CUDA" in msg or "not built" in msg


def test_cuda_backend_limits_are_reasons():
    cuda = S.by_name(route_mod.BACKENDS, "cuda")
    assert isinstance(cuda, route_mod.CudaRoute) and route_mod.BACKENDS[0] is cuda
    experts = torch.empty(4, 2, dtype=torch.int32)
    reasons = cuda.not_supported_reasons(experts=experts, weights=None, num_experts=9000)
    assert any("num_experts = 9000 > 8192" in r for r in reasons), reasons
    ok = cuda.not_supported_reasons(experts=experts, weights=None, num_experts=8192)
    assert not any("num_experts" in r for r in ok), ok


def test_cpu_selection_unchanged_by_the_cuda_backend():
    plan = mk.route(random_experts(8, 2, 4), 4)
    assert plan.counts_E.device.type == "cpu" and int(plan.counts_E.sum()) == 16


@pytest.mark.skipif(not S._C_HAS_CUDA, reason="moe_kernels._C built without CUDA")
def test_compiled_exports_and_binding_checks():
    for name in ("route_cuda", "route_cuda_workspace_size"):
        assert hasattr(S._C, name), name
    assert S._C.route_cuda_max_experts == route_mod.CUDA_MAX_EXPERTS
    # No slots: no workspace, answered without touching a device.
    assert S._C.route_cuda_workspace_size(0, 2, 4, -1, 0, 0) == 0
    assert S._C.route_cuda_workspace_size(0, 2, 4, 3, 1, 2) == 0
    with pytest.raises(ValueError, match="E: expected 1 <= E <= 8192, got 9000"):
        S._C.route_cuda_workspace_size(4, 2, 9000, -1, 0, 0)
    with pytest.raises(ValueError, match="drop: expected 0"):
        S._C.route_cuda_workspace_size(4, 2, 8, 3, 2, 0)
    with pytest.raises(ValueError, match="wdtype"):
        S._C.route_cuda_workspace_size(4, 2, 8, 3, 1, 1)
    # (experts, T, K, E, capacity, drop, weights, wdtype, N, counts, kept, offsets, row_slot,
    #  slot_row, workspace, workspace_bytes, stream)
    with pytest.raises(ValueError, match="weights: required"):
        S._C.route_cuda(0, 4, 2, 8, 3, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="N: expected >= 0"):
        S._C.route_cuda(0, 4, 2, 8, -1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0)
