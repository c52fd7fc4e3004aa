import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops.routing_histogram import routing_histogram_reference

from .util import CPU_BACKENDS, random_experts


def run(backend, experts, labels, G, E, weights=None):
    c = torch.zeros(G, E, dtype=torch.int64)
    w = torch.zeros(G, E) if weights is not None else None
    mk.routing_histogram(experts, labels, c, weights, w, backend=backend)
    return c, w


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "T,K,G,E", [(100, 2, 3, 8), (1, 1, 1, 1), (9000, 8, 19, 64), (50, 5, 4, 5)]
)
def test_matches_reference(backend, T, K, G, E):
    g = torch.Generator().manual_seed(T)
    experts = random_experts(T, K, E, seed=T, skew=1.2)
    labels = torch.randint(-1, G, (T,), generator=g)  # -1 = padding, skipped
    weights = torch.rand(T, K, generator=g)
    c, w = run(backend, experts, labels, G, E, weights)
    c_ref = torch.zeros(G, E, dtype=torch.int64)
    w_ref = torch.zeros(G, E)
    routing_histogram_reference(experts, labels, c_ref, weights, w_ref)
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-3, rtol=1e-5)
    assert int(c.sum()) == int((labels >= 0).sum()) * K


def test_hand_counts_and_accumulation():
    experts = torch.tensor([[0, 1], [1, 2], [2, -1]], dtype=torch.int32)  # -1: a dropped slot
    labels = torch.tensor([0, 1, 1])
    c = torch.zeros(2, 3, dtype=torch.int64)
    mk.routing_histogram(experts, labels, c)
    mk.routing_histogram(experts, labels, c)  # accumulates in place across calls
    assert c.tolist() == [[2, 2, 0], [0, 2, 4]]


def test_deterministic_weight_sums():
    experts = random_experts(20000, 4, 16)
    labels = torch.randint(0, 5, (20000,), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(20000, 4)
    runs = [run("cpu", experts, labels, 5, 16, weights)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range(backend):
    experts = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(
        ValueError, match=r"labels_T: expected labels in \[-1, 2\).*labels_T\[1\] = 5"
    ):
        run(backend, experts, torch.tensor([0, 5]), 2, 2)
    with pytest.raises(
        ValueError, match=r"experts_TK: expected expert ids in \[-1, 1\).*experts_TK\[1, 0\] = 1"
    ):
        run(backend, experts, torch.tensor([0, 0]), 2, 1)


# Only -1 means "skip": any other negative label or id is an error, not a silent skip.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "experts,labels,match",
    [
        ([0, 1, 2], [0, -3, 1], r"labels_T: expected labels in \[-1, 2\).*labels_T\[1\] = -3"),
        (
            [0, -3, 1],
            [0, 0, 1],
            r"experts_TK: expected expert ids in \[-1, 4\).*experts_TK\[1, 0\] = -3",
        ),
        # a bad id of a skipped (padding) token is an error all the same
        (
            [0, -2, 1],
            [0, -1, 1],
            r"experts_TK: expected expert ids in \[-1, 4\).*experts_TK\[1, 0\] = -2",
        ),
    ],
)
def test_negative_below_minus_one(backend, experts, labels, match):
    out = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        mk.routing_histogram(
            torch.tensor(experts, dtype=torch.int32).unsqueeze(1),
            torch.tensor(labels),
            out,
            backend=backend,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_minus_one_skips(backend):
    # label -1 skips the token, id -1 skips the slot; everything else is counted
    experts = torch.tensor([[0, -1], [1, 2], [3, 3]], dtype=torch.int32)
    labels = torch.tensor([1, -1, 0])
    c, w = run(backend, experts, labels, 2, 4, torch.tensor([[0.5, 9.0], [9.0, 9.0], [0.25, 1.0]]))
    assert c.tolist() == [[0, 0, 0, 2], [1, 0, 0, 0]]
    assert w.tolist() == [[0.0, 0.0, 0.0, 1.25], [0.5, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int64_ids_past_int32(backend):
    # 2**32 + 1 would wrap to 1 on the cast to int32 the kernels read
    experts = torch.tensor([[0], [2**32 + 1]])
    with pytest.raises(ValueError, match=r"experts_TK: expected expert ids.*= 4294967297"):
        run(backend, experts, torch.tensor([0, 1]), 2, 4)


def test_bad_arguments():
    e = random_experts(4, 2, 4)
    with pytest.raises(TypeError, match="out_GE: expected dtype"):
        mk.routing_histogram(e, torch.zeros(4, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels_T: expected shape"):
        mk.routing_histogram(
            e, torch.zeros(3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="weights_TK, out_w_GE: expected both or neither"):
        mk.routing_histogram(
            e,
            torch.zeros(4, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            torch.rand(4, 2),
        )
    with pytest.raises(ValueError, match="out_GE: expected a contiguous"):
        mk.routing_histogram(
            e, torch.zeros(4, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long).t()
        )


def test_empty_tokens():
    c = torch.zeros(2, 3, dtype=torch.int64)
    mk.routing_histogram(torch.empty(0, 2, dtype=torch.int32), torch.empty(0, dtype=torch.long), c)
    assert c.sum() == 0


def test_opcheck():
    e = random_experts(32, 2, 4)
    labels = torch.randint(0, 3, (32,))
    for backend in CPU_BACKENDS:
        torch.library.opcheck(
            torch.ops.moe_kernels.routing_histogram.default,
            (
                e,
                labels,
                torch.zeros(3, 4, dtype=torch.int64),
                torch.rand(32, 2),
                torch.zeros(3, 4),
                backend,
            ),
        )


@pytest.mark.gpu
def test_cuda_matches_reference():
    experts = random_experts(5000, 8, 64, skew=1.2).cuda()
    labels = torch.randint(-1, 19, (5000,)).cuda()
    weights = torch.rand(5000, 8).cuda()
    for G, E in [(19, 64), (80, 64)]:  # the second exceeds the shared-memory bins: global atomics
        c = torch.zeros(G, E, dtype=torch.int64, device="cuda")
        w = torch.zeros(G, E, device="cuda")
        mk.routing_histogram(experts, labels, c, weights, w, backend="cuda")
        c_ref = torch.zeros_like(c)
        w_ref = torch.zeros_like(w)
        routing_histogram_reference(experts, labels, c_ref, weights, w_ref)
        assert torch.equal(c, c_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-3, rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(0, 60),
    E=st.integers(1, 12),
    G=st.integers(1, 5),
    data=st.data(),
    skew=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_equals_reference(T, E, G, data, skew, seed):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    experts = random_experts(T, K, E, seed=seed, skew=skew)
    labels = torch.randint(-1, G, (T,), generator=g)
    weights = torch.rand(T, K, generator=g)
    c, w = run("cpu", experts, labels, G, E, weights)
    c_ref, w_ref = run("reference", experts, labels, G, E, weights)
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(w, w_ref)
