import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops.route import route_reference

from .util import CPU_BACKENDS, random_experts


def check_invariants(plan, experts, E, capacity):
    """Routing invariants that hold for every backend and policy."""
    T, K = experts.shape
    counts, kept, offsets = plan.counts_E.long(), plan.kept_E.long(), plan.offsets_E1.long()
    assert torch.equal(counts, torch.bincount(experts.reshape(-1).long(), minlength=E))
    assert offsets[0] == 0 and torch.equal(
        offsets[1:], torch.cumsum(kept, 0)
    )  # offsets = cumsum(kept)
    if capacity is None:
        assert torch.equal(kept, counts)
    else:
        assert torch.equal(kept, counts.clamp(max=capacity))
    n_kept = int(offsets[-1])
    # counts sum to T*K minus drops; exactly the kept slots have rows
    assert int(counts.sum()) == T * K
    assert int((plan.slot_row_TK >= 0).sum()) == n_kept
    rows = plan.slot_row_TK.reshape(-1)
    kept_slots = (rows >= 0).nonzero().squeeze(-1)
    # slot -> row -> slot round trip, and rows of expert e hold only e's slots
    assert torch.equal(plan.row_slot_N[rows[kept_slots].long()].long(), kept_slots)
    assert torch.all(plan.row_slot_N[n_kept:] == -1)
    for e in range(E):
        slots = plan.row_slot_N[offsets[e] : offsets[e + 1]].long()
        assert torch.all(experts.reshape(-1)[slots] == e)
        assert torch.all(slots.diff() > 0)  # token order inside an expert
    tok = plan.row_token_N
    assert torch.equal(tok[:n_kept].long(), plan.row_slot_N[:n_kept].long() // K)


def assert_plans_equal(a, b):
    names = ["counts_E", "kept_E", "offsets_E1", "row_slot_N", "slot_row_TK"]
    for name, x, y in zip(names, a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "T,K,E,capacity,drop,skew",
    [
        (64, 2, 8, None, "position", 0.0),
        (1, 1, 4, None, "position", 0.0),  # T = 1, K = 1
        (31, 5, 5, None, "position", 0.0),  # K = E, prime E
        (50, 2, 13, None, "position", 0.0),  # prime E, empty experts likely
        (64, 2, 8, 10, "position", 2.0),  # capacity overflow under skew
        (64, 2, 8, 10, "score", 2.0),  # capacity overflow, score policy
        (64, 2, 8, 0, "position", 0.0),  # capacity 0 drops everything
        (16, 1, 8, 100, "score", 0.0),  # capacity above every count: nothing dropped
    ],
)
def test_matches_reference_and_invariants(backend, T, K, E, capacity, drop, skew):
    experts = random_experts(T, K, E, seed=T + E, skew=skew)
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(1))
    plan = mk.route(experts, E, capacity=capacity, weights_TK=weights, drop=drop, backend=backend)
    check_invariants(plan, experts, E, capacity)
    ref = route_reference(experts, E, capacity, weights, drop)
    assert_plans_equal(plan[:5], ref)


def test_every_token_to_one_expert():
    experts = torch.full((20, 1), 3, dtype=torch.int32)
    plan = mk.route(experts, 6, capacity=5)  # capacity overflow: first 5 tokens kept
    assert plan.kept_E.tolist() == [0, 0, 0, 5, 0, 0]
    assert plan.counts_E.tolist() == [0, 0, 0, 20, 0, 0]
    assert plan.slot_row_TK[:5, 0].tolist() == [0, 1, 2, 3, 4]
    assert (plan.slot_row_TK[5:] == -1).all()


def test_score_policy_drops_lowest_weights():
    experts = torch.zeros(4, 1, dtype=torch.int32)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9]])
    plan = mk.route(experts, 2, capacity=2, weights_TK=weights, drop="score")
    # tokens 1 and 3 have the highest weights; rows stay in token order
    assert plan.slot_row_TK[:, 0].tolist() == [-1, 0, -1, 1]
    ties = torch.full((4, 1), 0.5)
    plan = mk.route(experts, 2, capacity=2, weights_TK=ties, drop="score")
    assert plan.slot_row_TK[:, 0].tolist() == [0, 1, -1, -1]  # ties: later slots dropped first


def test_score_policy_nan_weights_are_dropped_first():
    # NaN weights sort last in the reference, so they are dropped before any number; the CPU
    # kernel's selection must agree (its comparator has to stay a strict weak order with NaN).
    g = torch.Generator().manual_seed(3)
    T, K, E, cap = 64, 2, 4, 9
    experts = random_experts(T, K, E, seed=3)
    w = torch.rand(T, K, generator=g)
    w[torch.rand(T, K, generator=g) < 0.3] = float("nan")
    w[5, 0] = w[6, 1] = 0.5  # exact ties among the numbers
    ref = route_reference(experts, E, cap, w, "score")
    got = mk.route(experts, E, capacity=cap, weights_TK=w, drop="score", backend="cpu")
    for a, b in zip(got[:5], ref):
        assert torch.equal(a, b)
    kept_nan = (got.slot_row_TK >= 0) & w.isnan()
    dropped_num = (got.slot_row_TK < 0) & ~w.isnan()
    # No expert keeps a NaN slot while dropping a numeric one.
    for e in range(E):
        mine = experts == e
        assert not ((kept_nan & mine).any() and (dropped_num & mine).any())


def test_empty_tokens():
    plan = mk.route(torch.empty(0, 2, dtype=torch.int32), 4)
    assert plan.num_rows == 0 and plan.offsets_E1.tolist() == [0] * 5


def test_capacity_rows_allocation():
    experts = random_experts(40, 2, 8)
    assert mk.route(experts, 8).num_rows == 80
    assert mk.route(experts, 8, capacity=3).num_rows == 24  # min(T*K, E*C)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_ids(backend):
    experts = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(
        ValueError, match=r"experts_TK: expected expert ids in \[0, 4\), found 9 at token 1, slot 1"
    ):
        mk.route(experts, 4, backend=backend)
    with pytest.raises(ValueError, match="found -1"):
        mk.route(torch.tensor([[-1]], dtype=torch.int32), 4, backend=backend)


def test_bad_arguments():
    e = random_experts(8, 2, 4)
    with pytest.raises(ValueError, match="capacity: expected None or an int >= 0, got -1"):
        mk.route(e, 4, capacity=-1)
    with pytest.raises(ValueError, match="num_experts"):
        mk.route(e, 0)
    with pytest.raises(ValueError, match="drop: expected one of"):
        mk.route(e, 4, capacity=2, drop="random")
    with pytest.raises(ValueError, match="weights_TK: required"):
        mk.route(e, 4, capacity=2, drop="score")
    with pytest.raises(TypeError, match="experts_TK: expected dtype"):
        mk.route(e.float(), 4)
    with pytest.raises(ValueError, match="weights_TK: expected shape"):
        mk.route(e, 4, capacity=2, weights_TK=torch.rand(8, 3), drop="score")
    with pytest.raises(ValueError, match="experts_TK: expected 2 dimensions"):
        mk.route(e.reshape(-1), 4)


def test_opcheck():
    e = random_experts(24, 2, 6)
    w = torch.rand(24, 2)
    for backend in CPU_BACKENDS:
        for cap, drop in [(-1, "position"), (5, "position"), (5, "score")]:
            torch.library.opcheck(
                torch.ops.moe_kernels.route.default, (e, 6, cap, w, drop, backend)
            )


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(0, 48),
    E=st.integers(1, 17),
    data=st.data(),
    skew=st.sampled_from([0.0, 1.2, 3.0]),
    capacity_factor=st.sampled_from([None, 0.0, 0.5, 1.0, 1.25, 2.0]),
    drop=st.sampled_from(["position", "score"]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_equals_reference(T, E, data, skew, capacity_factor, drop, seed):
    K = data.draw(st.integers(1, E))
    experts = random_experts(T, K, E, seed=seed, skew=skew)
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(seed + 1))
    cap = None if capacity_factor is None else math.ceil(capacity_factor * T * K / E)
    plan = mk.route(experts, E, capacity=cap, weights_TK=weights, drop=drop, backend="cpu")
    check_invariants(plan, experts, E, cap)
    assert_plans_equal(plan[:5], route_reference(experts, E, cap, weights, drop))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [2**32 + 1, 2**31, -(2**32) + 2])  # wrap to 1, -2**31, 2
def test_int64_ids_outside_int32_raise(backend, bad):
    # Cast to int32 these would wrap (2**32 + 1 -> 1: a valid id) and be routed silently.
    experts = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(
        ValueError,
        match=rf"experts_TK: expected expert ids in \[0, 4\), got experts_TK\[1, 1\] = {bad}",
    ):
        mk.route(experts, 4, backend=backend)


def test_int64_ids_in_range_route_like_int32():
    e = random_experts(16, 2, 4)
    a, b = mk.route(e, 4), mk.route(e.long(), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
