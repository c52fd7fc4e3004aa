"""Sinkhorn balancing: marginals after the iterations, selection, scopes, layer behaviour."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import MoE, MoEConfig
from moe_kernels.balancing import balanced_decision, selection_counts
from moe_kernels.routers import top_k_decision
from moe_kernels.sinkhorn import balanced_matrix, marginal_error, sinkhorn_select


def _skewed(G, S, E, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, S, E, generator=g) + scale * torch.randn(E, generator=g)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4)])
def test_marginals_within_tolerance(E, k):
    z = _skewed(3, 64, E)
    P = balanced_matrix(z, k, 50)
    S = z.shape[1]
    torch.testing.assert_close(P.sum(1), torch.full((3, E), S * k / E), rtol=1e-4, atol=0)
    torch.testing.assert_close(P.sum(2), torch.full((3, S), float(k)), rtol=1e-3, atol=0)
    assert marginal_error(P, k) < 1e-3


def test_marginal_error_shrinks_with_iterations():
    z = _skewed(1, 256, 8)
    errs = [marginal_error(balanced_matrix(z, 2, n), 2) for n in (1, 3, 10, 30)]
    assert errs[0] > 0.1  # skewed logits start far from balance
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3


def test_selection_is_balanced_where_top_k_is_not():
    E, k, S = 8, 2, 512
    z = _skewed(1, S, E, scale=3.0)
    plain = selection_counts(torch.topk(z[0], k).indices.reshape(1, -1), E)[0]
    ex = sinkhorn_select(z, k, 10)
    assert ex.shape == (1, S, k)
    assert all(len(set(row)) == k for row in ex[0].tolist())  # distinct experts per token
    sk = selection_counts(ex.reshape(1, -1), E)[0]
    target = S * k / E
    assert (plain.max() / target) > 2.0
    assert (sk.max() / target) < 1.3 and (sk.min() / target) > 0.7


def _decision(logits_TE, k=2):
    return top_k_decision(logits_TE, k, score="softmax", normalize=True, backend="cpu")


def _domain_logits(B, S, E, seed=0):
    """Sequence b prefers the experts of its half: sequences are skewed, the batch is not."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, S, E, generator=g) * 0.5
    half = E // 2
    for b in range(B):
        lo = 0 if b % 2 == 0 else half
        z[b, :, lo : lo + half] += 4.0
    return z


def test_scope_sequence_balances_each_sequence_micro_batch_only_the_batch():
    B, S, E, k = 4, 64, 8, 2
    z = _domain_logits(B, S, E).reshape(B * S, E)
    kw = dict(iters=30, normalize=True)
    per_seq = balanced_decision(_decision(z), "sinkhorn", k, "sequence", seq_len=S, **kw)
    batch = balanced_decision(_decision(z), "sinkhorn", k, "micro_batch", seq_len=S, **kw)
    c_seq = selection_counts(per_seq.experts_TK.reshape(B, S * k), E)
    c_batch = selection_counts(batch.experts_TK.reshape(B, S * k), E)
    target = S * k / E
    # sequence scope: every sequence uses every expert about equally
    assert c_seq.max() / target < 1.5 and c_seq.min() / target > 0.5
    # micro-batch scope: the batch is balanced, but each sequence keeps its own half
    assert (c_batch.sum(0).max() / (B * target)) < 1.3
    assert c_batch[0, E // 2 :].sum() < 0.1 * S * k
    assert c_batch[1, : E // 2].sum() < 0.1 * S * k


def test_weights_are_the_router_scores_at_the_selection():
    z = _skewed(1, 32, 8)[0].requires_grad_(True)
    dec = balanced_decision(
        _decision(z), "sinkhorn", 2, "micro_batch", seq_len=32, iters=10, normalize=True
    )
    s = torch.softmax(z.detach(), -1).gather(1, dec.experts_TK.long())
    torch.testing.assert_close(dec.weights_TK.detach(), s / s.sum(-1, keepdim=True))
    dec.weights_TK[:, 0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("scope", ["sequence", "micro_batch"])
@pytest.mark.parametrize("method", ["sinkhorn", "assignment"])
def test_layer_trains_and_evaluates_with_plain_top_k(method, scope):
    torch.manual_seed(0)
    m = MoE(16, 32, 8, 2, balance=method, scope=scope, backend="cpu")
    with torch.no_grad():
        m.router.weight_ED.add_(torch.randn(8, 16))  # a skewed router
        m.router.weight_ED[0] += 3 * torch.ones(16) / 4
    x = torch.randn(4, 32, 16) + 0.5
    dec_plain = m.router(x)
    m.train()
    y = m(x)
    (y.square().mean() + m.aux_loss).backward()
    assert m.router.weight_ED.grad.abs().sum() > 0  # through the gate weights
    m.eval()
    seen = []
    h = m.router.register_forward_hook(lambda _m, _i, d: seen.append(d.experts_TK))
    try:
        m(x)
    finally:
        h.remove()
    torch.testing.assert_close(seen[0], dec_plain.experts_TK)  # evaluation: plain top-k


@pytest.mark.parametrize("method", ["sinkhorn", "assignment"])
def test_config_rejects_undefined_scope_and_router(method):
    with pytest.raises(ValueError, match=r"scope: .*global_batch"):
        MoEConfig(balance=method, scope="global_batch")
    with pytest.raises(ValueError, match=r"router: .*'hash'"):
        MoEConfig(balance=method, scope="micro_batch", router="hash")
    with pytest.raises(ValueError, match=r"sinkhorn_iters: expected an int >= 1, got 0"):
        MoEConfig(balance=method, scope="micro_batch", sinkhorn_iters=0)


@pytest.mark.parametrize("method", ["sinkhorn", "assignment"])
def test_shared_router_followers_use_the_balanced_selection(method):
    from moe_kernels import share_router

    torch.manual_seed(0)
    kw = dict(router="shared_router", balance=method, scope="micro_batch", backend="cpu")
    owner, follower = MoE(16, 32, 8, 2, **kw), MoE(16, 32, 8, 2, **kw)
    share_router([owner, follower])
    with torch.no_grad():
        owner.router.weight_ED[0] += 2.0  # skewed: plain top-k would differ from balanced
    x = torch.randn(64, 16) + 1.0
    seen = []
    h = follower.router.register_forward_hook(lambda _m, _i, d: seen.append(d.experts_TK))
    try:
        owner(x)
        follower(x)
    finally:
        h.remove()
    plain = owner.router.decide(x, labels_T=None, token_ids_T=None, bias_E=None, backend="cpu")
    balanced = owner.router.publishes.decision.experts_TK
    assert not torch.equal(balanced, plain.experts_TK)
    torch.testing.assert_close(seen[0], balanced)
