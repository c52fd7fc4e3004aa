"""Tests of moe_testbed.probes with fake routers whose stiffness is known."""

import numpy as np
import pytest
import torch

from moe_testbed import metrics, probes

E = 4
POOLS = {0: torch.arange(1000, 1010), 1: np.arange(2000, 2010)}


def batch(b=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (b, s), generator=g)
    labels = torch.zeros(b, s, dtype=torch.long)
    labels[1:] = 1
    return tokens, labels


def route_by_token(tokens_BS, labels_BS, layers=2):
    """Routing from the token's own id only: top-2 = (id mod E, id + 1 mod E)."""
    t = tokens_BS.reshape(-1)
    experts = torch.stack([t % E, (t + 1) % E], dim=1)
    return [experts] * layers


def route_by_previous(tokens_BS, labels_BS):
    """Top-1 from the previous token's id (position 0 uses a constant)."""
    prev = torch.cat([torch.zeros_like(tokens_BS[:, :1]), tokens_BS[:, :-1]], dim=1)
    return [(prev.reshape(-1, 1) >= 1000).long()]


def test_perturb_context_replaces_frac_of_context_from_same_domain():
    tokens, labels = batch(s=21)
    g = torch.Generator().manual_seed(1)
    new, replaced = probes.perturb_context(tokens, labels, POOLS, 0.10, g)
    assert new.dtype == tokens.dtype and new.shape == tokens.shape
    # round(0.1 * 20) = 2 positions per sequence, never the last one
    assert replaced.sum(dim=1).tolist() == [2, 2, 2]
    assert not replaced[:, -1].any()
    assert torch.equal(new[~replaced], tokens[~replaced])
    # domain 0 tokens come from pool 0 (1000..1009), domain 1 from pool 1 (2000..2009)
    for row in range(3):
        lo = 1000 if row == 0 else 2000
        picked = new[row][replaced[row]]
        assert ((picked >= lo) & (picked < lo + 10)).all()


def test_perturb_context_is_reproducible_and_frac_zero_is_identity():
    tokens, labels = batch()
    a = probes.perturb_context(tokens, labels, POOLS, 0.25, torch.Generator().manual_seed(7))
    b = probes.perturb_context(tokens, labels, POOLS, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same, none = probes.perturb_context(tokens, labels, POOLS, 0.0)
    assert torch.equal(same, tokens) and not none.any()


def test_perturb_context_errors():
    tokens, labels = batch()
    with pytest.raises(ValueError, match="no tokens for domain 1"):
        probes.perturb_context(tokens, labels, {0: [1, 2]}, 0.5)
    with pytest.raises(ValueError, match="frac"):
        probes.perturb_context(tokens, labels, POOLS, 1.5)
    with pytest.raises(ValueError, match="labels_BS"):
        probes.perturb_context(tokens, labels[:, :3], POOLS)
    with pytest.raises(ValueError, match="tokens_BS"):
        probes.perturb_context(tokens.reshape(-1), labels, POOLS)


def test_probe_mask_is_last_quarter_minus_replaced():
    replaced = torch.zeros(1, 8, dtype=torch.bool)
    replaced[0, 6] = True
    assert probes.probe_mask(8, replaced).tolist() == [[False] * 6 + [False, True]]
    # S = 2: at least one probe position
    assert probes.probe_mask(2, torch.zeros(1, 2, dtype=torch.bool)).tolist() == [[False, True]]


def test_stiffness_one_when_routing_ignores_context():
    tokens, labels = batch()
    g = torch.Generator().manual_seed(3)
    s = probes.stiffness_under_perturbation(route_by_token, tokens, labels, POOLS, 0.5, g)
    np.testing.assert_allclose(s, [1.0, 1.0])


def test_stiffness_matches_share_of_probes_with_replaced_predecessor():
    tokens, labels = batch(b=8, s=40)
    s = probes.stiffness_under_perturbation(
        route_by_previous, tokens, labels, POOLS, 0.3, torch.Generator().manual_seed(5)
    )
    # same draw again: a probe's expert changes exactly when its predecessor was replaced
    _, replaced = probes.perturb_context(
        tokens, labels, POOLS, 0.3, torch.Generator().manual_seed(5)
    )
    mask = probes.probe_mask(40, replaced)
    prev_replaced = torch.cat([torch.zeros(8, 1, dtype=torch.bool), replaced[:, :-1]], dim=1)
    expected = 1.0 - prev_replaced[mask].float().mean().item()
    assert s.shape == (1,)
    assert s[0] == pytest.approx(expected)
    assert 0.0 < s[0] < 1.0


def test_stiffness_rejects_bad_route_fn_output():
    tokens, labels = batch()
    with pytest.raises(ValueError, match="T = B \\* S"):
        probes.stiffness_under_perturbation(
            lambda t, lab: [torch.zeros(5, 2, dtype=torch.long)], tokens, labels, POOLS
        )


def test_saturation():
    a = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [2, 3]])]
    b = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 2], [0, 1]])]
    # layer 0 identical; layer 1: {0,1}∩{1,2} = 1, {2,3}∩{0,1} = 0 -> (1/2 + 0) / 2
    np.testing.assert_allclose(probes.saturation(a, b), [1.0, 0.25])
    with pytest.raises(ValueError, match="layers"):
        probes.saturation(a, b[:1])


def test_ngram_ids():
    tokens = torch.tensor([[5, 6, 5, 6], [6, 5, 6, 7]])
    assert torch.equal(probes.ngram_ids(tokens, 1), tokens)
    bi = probes.ngram_ids(tokens, 2)
    # position 0 of every sequence has no complete bigram (no crossing between sequences)
    assert bi[:, 0].tolist() == [-1, -1]
    assert (bi[:, 1:] >= 0).all()
    # (5,6) at [0,1], [0,3] and [1,2]; (6,5) at [0,2] and [1,1]; (6,7) once
    assert bi[0, 1] == bi[0, 3] == bi[1, 2]
    assert bi[0, 2] == bi[1, 1]
    assert len({bi[0, 1].item(), bi[0, 2].item(), bi[1, 3].item()}) == 3
    tri = probes.ngram_ids(tokens, 3)
    assert tri[:, :2].eq(-1).all() and tri[0, 2] != tri[0, 3]
    assert probes.ngram_ids(tokens, 5).eq(-1).all()  # n > S: nothing complete
    with pytest.raises(ValueError, match="n must be"):
        probes.ngram_ids(tokens, 0)


def test_ngram_ids_with_ngram_expertise():
    tokens, labels = batch(b=4, s=64)
    tokens = tokens % 8
    top1 = route_by_token(tokens, labels, layers=1)[0][:, :1]
    # top-1 routing is a function of the unigram: all information about E is in G (n = 1)
    uni = probes.ngram_ids(tokens, 1).reshape(-1)
    assert metrics.ngram_expertise(uni, top1, min_count=1) == pytest.approx(1.0)
    # the bigram determines its last token too
    bi = probes.ngram_ids(tokens, 2).reshape(-1)
    assert metrics.ngram_expertise(bi, top1, min_count=1) == pytest.approx(1.0)
    # top-2: the two slots of a token stay uncertain given G, H(E | G) = ln 2
    top2 = route_by_token(tokens, labels, layers=1)[0]
    p = np.bincount(top2.reshape(-1).numpy()) / top2.numel()
    h_e = -(p * np.log(p)).sum()
    value = metrics.ngram_expertise(uni, top2, min_count=1)
    assert value == pytest.approx(1 - np.log(2) / h_e)
