"""Tests of moe_testbed.metrics against hand-computed values and range properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moe_testbed import metrics as m

# Two domains, four experts, each expert used by one domain only.
# n = 12; f = [6, 2, 3, 1] / 12 = [1/2, 1/6, 1/4, 1/12]; pi = [2/3, 1/3];
# q_0 = [3/4, 1/4, 0, 0]; q_1 = [0, 0, 3/4, 1/4].
C = np.array([[6, 2, 0, 0], [0, 0, 3, 1]])
# Two domains, two experts, mixed: n = 8, f = [1/2, 1/2], pi = [1/2, 1/2], q_d = [3/4, 1/4] and
# [1/4, 3/4].
M = np.array([[3, 1], [1, 3]])

H_Q = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of (3/4, 1/4) = 0.5623 nats


def H(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


# ----------------------------------------------------------------------------- hand values


def test_load_metrics_by_hand():
    np.testing.assert_allclose(m.load_fractions(C), [1 / 2, 1 / 6, 1 / 4, 1 / 12])
    # min(1/2, 1/4) + min(1/6, 1/4) + min(1/4, 1/4) + min(1/12, 1/4) = 1/4 + 1/6 + 1/4 + 1/12
    assert m.utilization(C) == pytest.approx(0.75)
    # -(1/2 ln 1/2 + 1/6 ln 1/6 + 1/4 ln 1/4 + 1/12 ln 1/12) / ln 4
    assert m.load_entropy(C) == pytest.approx(H(1 / 2, 1 / 6, 1 / 4, 1 / 12) / math.log(4))
    # E max f - 1 = 4 * 1/2 - 1
    assert m.max_violation(C) == pytest.approx(1.0)
    # deviations from 1/4: 1/4, -1/12, 0, -1/6 -> var = (9 + 1 + 0 + 4) / 144 / 4 = 14/576;
    # std / mean = (sqrt(14) / 24) / (1/4) = sqrt(14) / 6
    assert m.load_cv(C) == pytest.approx(math.sqrt(14) / 6)
    # E f = [2, 2/3, 1, 1/3]: none below 0.01; one (1/3) below 0.5
    assert m.dead_experts(C) == 0
    assert m.dead_experts(C, threshold=0.5) == 1
    # 1 - (4 + 2) / (4 + 4)
    assert m.drop_rate([4, 4], [4, 2]) == pytest.approx(0.25)
    assert m.load_cv(M) == 0.0 and m.utilization(M) == 1.0


def test_specialization_metrics_by_hand_block():
    # every expert serves one domain: purity (6 + 2 + 3 + 1) / 12 = 1
    assert m.purity(C) == pytest.approx(1.0)
    # H(D, E) = H(E) since E determines D, so I = H(D) and nmi = H(D) / sqrt(H(D) H(E))
    h_d, h_e = H(2 / 3, 1 / 3), H(1 / 2, 1 / 6, 1 / 4, 1 / 12)
    assert m.nmi(C) == pytest.approx(math.sqrt(h_d / h_e))
    # sum_d pi_d H(q_d) / ln 4 = (2/3 + 1/3) H_Q / ln 4
    assert m.conditional_entropy(C) == pytest.approx(H_Q / math.log(4))
    assert m.reference_agreement(C) == pytest.approx(1.0)
    assert m.reference_agreement(C, [[2, 3], [0, 1]]) == pytest.approx(0.0)
    # domain 0 in {0, 2}: 6 + 0; domain 1 in {1, 3}: 0 + 1 -> 7 / 12
    assert m.reference_agreement(C, [[0, 2], [1, 3]]) == pytest.approx(7 / 12)
    assert m.matched_groups(C) == [[0, 1], [2, 3]]
    assert m.specialization_score(C) == pytest.approx(1.0)
    # sum_d pi_d (1 - H_Q / ln 4)
    assert m.routing_specialization(C) == pytest.approx(1 - H_Q / math.log(4))
    # rows q_0, q_1 orthogonal with equal norms: two equal singular values -> exp(ln 2) / 2
    assert m.normalized_effective_rank(C) == pytest.approx(1.0)
    assert m.domain_isolation(C) == pytest.approx(1.0)


def test_specialization_metrics_by_hand_mixed():
    # purity (3 + 3) / 8
    assert m.purity(M) == pytest.approx(0.75)
    # H(D) = H(E) = ln 2; H(D, E) = H(3/8, 1/8, 1/8, 3/8); nmi = (2 ln 2 - H(D, E)) / ln 2
    h_de = H(3 / 8, 1 / 8, 1 / 8, 3 / 8)
    assert m.nmi(M) == pytest.approx((2 * math.log(2) - h_de) / math.log(2))
    assert m.conditional_entropy(M) == pytest.approx(H_Q / math.log(2))
    # matched groups {0}, {1}: (3 + 3) / 8 = 3/4; score (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert m.reference_agreement(M) == pytest.approx(0.75)
    assert m.specialization_score(M) == pytest.approx(0.5)
    assert m.routing_specialization(M) == pytest.approx(1 - H_Q / math.log(2))
    # Q = [[3/4, 1/4], [1/4, 3/4]]: singular values 1 and 1/2 -> p = (2/3, 1/3)
    assert m.normalized_effective_rank(M) == pytest.approx(math.exp(H(2 / 3, 1 / 3)) / 2)
    # overlap min(3/4, 1/4) + min(1/4, 3/4) = 1/2 -> isolation 1/2
    assert m.domain_isolation(M) == pytest.approx(0.5)


def test_trace_metrics_by_hand():
    a = [[0, 1], [2, 3], [1, 0]]
    b = [[1, 0], [2, 4], [3, 5]]
    # shared: 2, 1, 0 of k = 2 -> mean(1, 1/2, 0)
    assert m.routing_stiffness(a, b) == pytest.approx(0.5)
    assert m.routing_stiffness(a, a) == 1.0
    # pairs (g, e): (0,0) x2, (0,1), (1,1) x3 -> H(E) = H(1/3, 2/3); H(E|G) = 1/2 H(2/3, 1/3)
    # I = H(E) - H(E|G) = H(E) / 2 -> ratio 1/2
    grams, experts = [0, 0, 0, 1, 1, 1], [[0], [0], [1], [1], [1], [1]]
    assert m.ngram_expertise(grams, experts, min_count=1) == pytest.approx(0.5)
    # with min_count 4 both grams (3 tokens each) share one bucket: no information
    assert m.ngram_expertise(grams, experts, min_count=4) == pytest.approx(0.0)
    # gram ids -1 are left out: what remains is grams [1, 1, 1] -> H(E|G) = H(E) -> 0
    assert m.ngram_expertise([-1, -1, -1, 1, 1, 1], experts, min_count=1) == pytest.approx(0.0)
    # H(1/2, 1/2) / ln 2 = 1 and H(1, 0) = 0 -> mean 1/2; confidence mean(1/2, 1) = 3/4
    scores = [[0.5, 0.5], [1.0, 0.0]]
    assert m.router_entropy(scores) == pytest.approx(0.5)
    assert m.router_confidence(scores) == pytest.approx(0.75)
    # N0 = 3, N1 = 3, N2 = 2; N01 = 2, N02 = 1, N12 = 1
    co = m.coactivation([[0, 1], [0, 2], [1, 2], [0, 1]], 3)
    expected = [[1, 2 / 3, 1 / 3], [2 / 3, 1, 1 / 3], [1 / 2, 1 / 2, 1]]
    np.testing.assert_allclose(co, expected)
    # an expert never selected has a zero row
    np.testing.assert_allclose(m.coactivation([[0, 1]], 3)[2], 0.0)


# ----------------------------------------------------------------------------- ideals


def test_uniform_is_ideal_balance():
    u = np.full((3, 6), 5)
    assert m.utilization(u) == pytest.approx(1.0)
    assert m.load_entropy(u) == pytest.approx(1.0)
    assert m.max_violation(u) == pytest.approx(0.0)
    assert m.load_cv(u) == pytest.approx(0.0)
    assert m.dead_experts(u) == 0
    assert m.nmi(u) == pytest.approx(0.0)  # routing independent of the domain
    assert m.specialization_score(u) == pytest.approx(0.0)


def test_reference_router_block_diagonal_is_ideal():
    # D = 4, E = 8: domain d routes top-1 evenly inside G(d) = {2d, 2d + 1}
    groups = [[2 * d, 2 * d + 1] for d in range(4)]
    c = np.zeros((4, 8), dtype=np.int64)
    for d, g in enumerate(groups):
        c[d, g] = 10
    assert m.purity(c) == pytest.approx(1.0)
    assert m.specialization_score(c) == pytest.approx(1.0)
    assert m.reference_agreement(c) == pytest.approx(1.0)
    assert m.reference_agreement(c, groups) == pytest.approx(1.0)
    assert m.domain_isolation(c) == pytest.approx(1.0)
    assert m.nmi(c) == pytest.approx(math.log(4) / math.sqrt(math.log(4) * math.log(8)))
    # log(E/D) / log E for top-1 spread evenly in the group
    assert m.conditional_entropy(c) == pytest.approx(math.log(2) / math.log(8))
    assert m.utilization(c) == pytest.approx(1.0)
    # permuted expert ids are found by the matching
    perm = np.random.default_rng(0).permutation(8)
    assert m.specialization_score(c[:, perm]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- layers, inputs


SCALAR_FNS = [
    m.utilization,
    m.load_entropy,
    m.max_violation,
    m.load_cv,
    m.dead_experts,
    m.purity,
    m.nmi,
    m.conditional_entropy,
    m.reference_agreement,
    m.specialization_score,
    m.routing_specialization,
    m.normalized_effective_rank,
    m.domain_isolation,
]


@pytest.mark.parametrize("fn", SCALAR_FNS, ids=lambda f: f.__name__)
def test_layer_dimension_gives_one_value_per_layer(fn):
    stack = np.stack([C, np.ones_like(C), C[:, ::-1]])
    per_layer = fn(stack)
    assert isinstance(per_layer, np.ndarray) and per_layer.shape == (3,)
    np.testing.assert_allclose(per_layer, [fn(x) for x in stack])
    single = fn(C)
    assert isinstance(single, (float, int)) and not isinstance(single, np.generic)


def test_layer_dimension_per_expert_and_traces():
    stack = np.stack([C, np.ones_like(C)])
    assert m.load_fractions(stack).shape == (2, 4)
    a = np.array([[[0, 1]], [[2, 3]]])
    np.testing.assert_allclose(m.routing_stiffness(a, a[::-1]), [0.0, 0.0])
    np.testing.assert_allclose(m.routing_stiffness(a, a), [1.0, 1.0])
    assert m.coactivation(a, 4).shape == (2, 4, 4)
    np.testing.assert_allclose(m.drop_rate(stack, stack), [0.0, 0.0])
    np.testing.assert_allclose(m.router_entropy(np.full((2, 3, 4), 0.25)), [1.0, 1.0])
    assert m.ngram_expertise([0, 1], np.array([[[0], [1]], [[0], [0]]]), 1).shape == (2,)


def test_torch_inputs_and_dtypes():
    t = torch.tensor(C)
    assert m.utilization(t) == pytest.approx(0.75)
    assert m.nmi(t.to(torch.bfloat16)) == pytest.approx(m.nmi(C))
    assert m.routing_stiffness(torch.tensor([[0, 1]]), torch.tensor([[1, 2]])) == 0.5
    if torch.cuda.is_available():
        assert m.purity(t.cuda()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3)), "all zeros"),  # empty input
        (np.array([[1, -1], [2, 0]]), "non-negative"),  # negative count
        (np.array([1, 2, 3]), "2-D .* got a 1-D"),  # rank too low
        (np.ones((1, 2, 3, 4)), "3-D .* got a 4-D"),  # rank too high
        (np.array([[1.0, np.nan]]), "finite"),  # NaN
        (np.stack([np.ones((2, 2)), np.zeros((2, 2))]), "all zeros.*layer 1"),  # one empty layer
    ],
)
def test_bad_counts_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        m.utilization(bad)
    with pytest.raises(ValueError, match="counts_DE"):
        m.purity(bad)


def test_other_errors():
    with pytest.raises(ValueError, match="E % D"):
        m.reference_agreement(np.ones((3, 4)))  # groups=None needs E % D == 0
    with pytest.raises(ValueError, match="disjoint"):
        m.reference_agreement(C, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.reference_agreement(C, [[0, 1], [2, 9]])
    with pytest.raises(ValueError, match="one list per domain"):
        m.reference_agreement(C, [[0, 1]])
    with pytest.raises(ValueError, match="D >= 2"):
        m.specialization_score(np.ones((1, 4)))
    with pytest.raises(ValueError, match="E >= 2"):
        m.load_entropy(np.ones((2, 1)))
    with pytest.raises(ValueError, match=">= 2 domains"):
        m.domain_isolation(np.array([[1, 2], [0, 0]]))
    with pytest.raises(ValueError, match="kept_E must be <="):
        m.drop_rate([1, 1], [2, 0])
    with pytest.raises(ValueError, match="shape"):
        m.routing_stiffness([[0, 1]], [[0, 1, 2]])
    with pytest.raises(ValueError, match="integer"):
        m.routing_stiffness([[0.0, 1.0]], [[0.0, 1.0]])
    with pytest.raises(ValueError, match="num_experts"):
        m.coactivation([[0, 3]], 3)
    with pytest.raises(ValueError, match="T = 2"):
        m.ngram_expertise([0, 1], [[0]])


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_router_health_equals_the_logged_statistics(score):
    # The trainer logs router_entropy/confidence from moe_kernels.stats, which normalises each
    # token's scores to sum 1; the metrics must give the same numbers from the scores.
    import moe_kernels
    from moe_kernels.routers import Router

    torch.manual_seed(0)
    layer = moe_kernels.MoE(16, 8, num_experts=4, top_k=2, score=score)
    seen = []
    layer.router.register_forward_hook(lambda _m, _i, decision: seen.append(decision.scores_TE))
    moe_kernels.stats.enable(layer, num_labels=1)
    layer(torch.randn(40, 16) * 3, labels=torch.zeros(40, dtype=torch.long))
    logged = moe_kernels.stats.read(layer)
    assert isinstance(layer.router, Router) and len(seen) == 1
    tokens = logged["tokens_L"][0]
    assert m.router_confidence(seen[0]) == pytest.approx(logged["max_prob_sum_L"][0] / tokens)
    assert m.router_entropy(seen[0]) == pytest.approx(logged["entropy_sum_L"][0] / tokens)
    raw_max = float(seen[0].detach().max(-1).values.mean())
    if score == "sigmoid":  # raw sigmoid maxima are not the logged confidence
        assert m.router_confidence(seen[0]) < raw_max - 0.1
    else:
        assert m.router_confidence(seen[0]) == pytest.approx(raw_max)


# ----------------------------------------------------------------------------- summarize


def test_summarize_names_and_means():
    stack = np.stack([C, np.ones_like(C)])
    kept = np.stack([C, np.ones_like(C) - np.eye(2, 4, dtype=int)])
    out = m.summarize(stack, kept_LDE=kept, scope="global_batch", split="val")
    assert out["val/layer0/max_violation@global_batch"] == pytest.approx(1.0)
    assert out["val/layer1/max_violation@global_batch"] == pytest.approx(0.0)
    assert out["val/all/max_violation@global_batch"] == pytest.approx(0.5)
    assert out["val/layer0/specialization_score"] == pytest.approx(1.0)
    assert out["val/layer1/drop_rate"] == pytest.approx(2 / 8)
    assert "val/layer1/kept_max_violation@global_batch" in out
    assert "val/all/kept_specialization_score" in out
    assert all(isinstance(v, float) for v in out.values())
    plain = m.summarize(C)
    assert "layer0/utilization" in plain and "all/utilization" in plain


def test_summarize_groups_and_undefined_metrics():
    out = m.summarize(C, groups=[[2, 3], [0, 1]])
    assert out["layer0/reference_agreement"] == 0.0
    assert out["layer0/specialization_score"] == 1.0  # always with matched groups
    odd = m.summarize(np.ones((3, 4)))  # E % D != 0: no matched groups
    assert "all/specialization_score" not in odd and "all/reference_agreement" not in odd
    assert "all/purity" in odd


# ----------------------------------------------------------------------------- properties

counts_strategy = (
    st.integers(1, 5)
    .flatmap(
        lambda d: st.integers(2, 8).flatmap(
            lambda e: arrays(np.int64, (d, e), elements=st.integers(0, 50))
        )
    )
    .filter(lambda a: a.sum() > 0)
)


@settings(max_examples=150, deadline=None)
@given(counts_strategy)
def test_ranges(c):
    num_domains, num_experts = c.shape
    eps = 1e-9
    assert 1 / num_experts - eps <= m.utilization(c) <= 1 + eps
    assert -eps <= m.load_entropy(c) <= 1 + eps
    assert m.max_violation(c) >= -eps and m.load_cv(c) >= -eps
    assert 0 <= m.nmi(c) <= 1
    pi = c.sum(axis=1) / c.sum()
    assert pi.max() - eps <= m.purity(c) <= 1 + eps
    assert -eps <= m.conditional_entropy(c) <= 1 + eps
    assert -eps <= m.routing_specialization(c) <= 1 + eps
    assert 0 < m.normalized_effective_rank(c) <= 1 + eps
    if num_experts % num_domains == 0:
        assert -eps <= m.reference_agreement(c) <= 1 + eps
        if num_domains >= 2:
            assert -eps <= m.specialization_score(c) <= 1 + eps
    if (c.sum(axis=1) > 0).sum() >= 2:
        assert -eps <= m.domain_isolation(c) <= 1 + eps


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_trace_ranges(num_tokens, k, seed):
    rng = np.random.default_rng(seed)
    num_experts = 6
    a = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
    b = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
    s = m.routing_stiffness(a, b)
    assert 0 <= s <= 1 and s == pytest.approx(m.routing_stiffness(b, a))
    co = m.coactivation(a, num_experts)
    assert co.min() >= 0 and co.max() <= 1
    assert 0 <= m.ngram_expertise(rng.integers(0, 3, num_tokens), a, min_count=1) <= 1
    scores = rng.random((num_tokens, num_experts))
    assert 0 <= m.router_entropy(scores) <= 1 + 1e-12
