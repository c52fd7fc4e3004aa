"""Specialization against chance: permutation null, corrected score, bootstrap SE, draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_testbed.metrics import chance, specialization_score

D, E, K, N_PER, S = 4, 8, 2, 40, 32


def _domains(n_per: int = N_PER) -> np.ndarray:
    return np.repeat(np.arange(D), n_per)


def _blind_counts(domain_N: np.ndarray, seed: int = 0) -> np.ndarray:
    """(1, N, E) counts of a router that ignores the domain: every sequence's S * K selections
    drawn from one expert distribution."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E))
    return rng.multinomial(S * K, p, size=len(domain_N))[None].astype(float)


def test_domain_counts_sums_sequences_of_each_domain():
    counts = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    out = chance.domain_counts(counts, np.array([1, 0, 1]), 2)
    np.testing.assert_array_equal(out[:, 0], counts[:, 1])
    np.testing.assert_array_equal(out[:, 1], counts[:, 0] + counts[:, 2])
    with pytest.raises(ValueError, match="domain_N"):
        chance.domain_counts(counts, np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="counts_LNE"):
        chance.domain_counts(counts, np.array([0, 1]), 2)


def test_domain_blind_counts_score_chance():
    """A router that ignores the domain has a positive raw score (noise) and a corrected score
    within noise of 0, for every metric."""
    dom = _domains()
    res = chance.against_chance(_blind_counts(dom), dom, D, permutations=200, seed=1)
    assert res["specialization_score"]["value"] > 0.0  # the positive floor of noisy counts
    for k, r in res.items():
        assert abs(r["value"] - r["null_mean"]) < 4 * r["null_std"] + 1e-9, (k, r)
        assert r["null_p95"] >= r["null_mean"]


def test_reference_like_counts_correct_to_one():
    dom = _domains()
    counts = np.zeros((1, len(dom), E))
    for n, d in enumerate(dom):  # domain d uses only its group {2d, 2d + 1}
        counts[0, n, 2 * d : 2 * d + 2] = S
    res = chance.against_chance(counts, dom, D, permutations=50)
    assert res["specialization_score"]["value"] == pytest.approx(1.0)
    assert res["specialization_score"]["corrected"] == pytest.approx(1.0)
    assert res["purity"]["corrected"] == pytest.approx(1.0)
    assert res["specialization_score"]["null_mean"] < 0.2


def test_corrected_definition():
    assert chance.corrected(0.6, 0.2) == pytest.approx(0.5)
    assert chance.corrected(0.2, 0.2) == 0.0
    assert np.isnan(chance.corrected(1.0, 1.0))


def test_permutations_must_be_positive():
    dom = _domains(2)
    with pytest.raises(ValueError, match="permutations"):
        chance.permutation_null(_blind_counts(dom), dom, D, permutations=0)


def test_bootstrap_se_shrinks_with_more_sequences():
    small, large = _domains(10), _domains(160)
    se_small = chance.bootstrap_se(_blind_counts(small), small, D)["specialization_score"]
    se_large = chance.bootstrap_se(_blind_counts(large), large, D)["specialization_score"]
    assert se_large < se_small / 2


def test_topk_counts_matches_a_direct_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=g)
    w = chance.random_router_weights(1, E, 16, draws=3, seed=5)[:, 0]
    seq = torch.arange(3).repeat_interleave(4)
    got = chance.topk_counts(x, w, K, seq, 3)
    for r in range(3):
        top = (x @ w[r].T).topk(K, dim=-1).indices
        want = torch.zeros(3, E)
        for t in range(12):
            want[seq[t], top[t]] += 1
        torch.testing.assert_close(got[r], want)
    assert got.sum() == 3 * 12 * K


def test_random_router_weights_have_the_init_scale():
    w = chance.random_router_weights(2, 64, 256, draws=4, seed=0)
    assert w.shape == (4, 2, 64, 256)
    assert w.std().item() == pytest.approx(256**-0.5, rel=0.02)
    assert not torch.equal(w[0], w[1])


def test_over_draws_averages():
    dom = _domains(10)
    per = [chance.against_chance(_blind_counts(dom, s), dom, D, permutations=20) for s in range(3)]
    out = chance.over_draws(per)
    want = np.mean([p["nmi"]["value"] for p in per])
    assert out["nmi"]["value"] == pytest.approx(want)
    assert out["nmi"]["draws"] == 3
    assert specialization_score(chance.domain_counts(_blind_counts(dom), dom, D)) >= 0


def test_metrics_that_need_e_divisible_by_d_are_left_out():
    dom = np.repeat(np.arange(3), 10)
    counts = np.random.default_rng(0).multinomial(8, np.ones(4) / 4, size=30)[None]
    res = chance.against_chance(counts.astype(float), dom, 3, permutations=5)
    assert "specialization_score" not in res and "matched_agreement" not in res
    assert {"purity", "nmi", "domain_isolation"} <= set(res)
    assert set(chance.bootstrap_se(counts, dom, 3, resamples=3)) == set(res)
