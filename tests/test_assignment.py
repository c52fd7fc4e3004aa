"""Balanced assignment: exact shares on the scope's tokens, distinct experts, scopes."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_kernels.assignment import assign_select, expert_shares
from moe_kernels.balancing import balanced_decision, selection_counts
from moe_kernels.routers import top_k_decision


def _skewed(G, S, E, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, S, E, generator=g) + scale * torch.randn(E, generator=g)


@pytest.mark.parametrize("S,E,k", [(64, 8, 1), (64, 8, 2), (64, 16, 4), (37, 8, 2), (10, 16, 4)])
def test_every_expert_gets_exactly_its_share(S, E, k):
    z = _skewed(3, S, E)
    ex = assign_select(z, k)
    assert ex.shape == (3, S, k)
    for g in range(3):
        assert all(len(set(row)) == k for row in ex[g].tolist())  # k distinct experts
        counts = selection_counts(ex[g].reshape(1, -1), E)[0].long()
        shares = expert_shares(z[g], k)
        assert counts.tolist() == shares.tolist()
        q, r = divmod(S * k, E)
        assert sorted(shares.tolist()) == [q] * (E - r) + [q + 1] * r


def test_uneven_shares_go_to_the_experts_with_most_logit():
    z = torch.zeros(5, 4)
    z[:, 2] += 1.0
    z[:, 0] += 0.5  # 5 tokens x 1 slot over 4 experts: one expert takes 2
    assert expert_shares(z, 1).tolist() == [1, 1, 2, 1]
    assert expert_shares(torch.zeros(5, 4), 1).tolist() == [2, 1, 1, 1]  # tie: lower id


def test_already_balanced_top_k_is_kept():
    # when plain top-k meets the shares, the assignment is the top-k itself
    E, k = 4, 2
    rows = list(itertools.combinations(range(E), k))  # every pair once: balanced
    z = torch.zeros(len(rows), E)
    for t, pair in enumerate(rows):
        z[t, list(pair)] = torch.tensor([2.0, 1.0])
    ex = assign_select(z.unsqueeze(0), k)[0]
    assert [tuple(sorted(r)) for r in ex.tolist()] == rows
    assert ex[:, 0].tolist() == [p[0] for p in rows]  # highest logit first


def test_greedy_repair_path_meets_shares():
    # two tokens that both love experts 0 and 1; k = 2 of E = 3 forces a repair
    z = torch.tensor([[[5.0, 4.0, 0.0], [5.0, 4.0, 0.0], [0.0, 0.0, 0.1]]])
    ex = assign_select(z, 2)[0]
    counts = selection_counts(ex.reshape(1, -1), 3)[0].long().tolist()
    assert counts == [2, 2, 2]
    assert all(len(set(r)) == 2 for r in ex.tolist())


def _domain_logits(B, S, E):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, S, E, generator=g) * 0.5
    for b in range(B):
        lo = 0 if b % 2 == 0 else E // 2
        z[b, :, lo : lo + E // 2] += 4.0
    return z


def test_scope_sequence_exact_per_sequence_micro_batch_exact_per_batch():
    B, S, E, k = 4, 32, 8, 2
    z = _domain_logits(B, S, E).reshape(B * S, E)
    dec = top_k_decision(z, k, backend="cpu")
    kw = dict(iters=1, normalize=True)
    per_seq = balanced_decision(dec, "assignment", k, "sequence", seq_len=S, **kw)
    batch = balanced_decision(dec, "assignment", k, "micro_batch", seq_len=S, **kw)
    c_seq = selection_counts(per_seq.experts_TK.reshape(B, S * k), E)
    c_batch = selection_counts(batch.experts_TK.reshape(B, S * k), E)
    assert (c_seq == S * k / E).all()  # each sequence exactly balanced
    assert (c_batch.sum(0) == B * S * k / E).all()  # the batch exactly balanced ...
    assert not (c_batch == S * k / E).all()  # ... but not each sequence
    # ... and each sequence stays (nearly: the solver is greedy) on its own half
    assert c_batch[0, E // 2 :].sum() <= 0.05 * S * k
    assert c_batch[1, : E // 2].sum() <= 0.05 * S * k
