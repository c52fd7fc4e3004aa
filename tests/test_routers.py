"""Every router kind: forward and backward on CPU, and the property that defines it."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import MoE, aux_losses, share_router, stats, update_routers
from moe_kernels.routers import ROUTERS, hash_experts

D, F, E, K, G = 8, 16, 4, 2, 2


def make(router, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_groups", G if router == "reference" else None)
    return MoE(D, F, E, K, router=router, **kw)


def inputs(B=2, S=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g, requires_grad=True)
    labels = torch.randint(0, G, (B, S), generator=g)
    ids = torch.randint(0, 1000, (B, S), generator=g)
    return x, labels, ids


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_every_router_forward_backward(router, score):
    m = make(router, score=score)
    x, labels, ids = inputs()
    y = m(x, labels=labels, token_ids=ids)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().sum() + aux_losses(m)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.w1_EFD.grad is not None and m.w2_EDF.grad is not None
    w = m.router.weight_ED
    if router in ("learned", "reference", "expert_choice", "sequence", "shared_router"):
        assert w.grad is not None and w.grad.abs().sum() > 0  # the router learns
    elif router == "frozen":
        assert not w.requires_grad and w.grad is None
    elif router == "random":
        assert "router.weight_ED" not in m.state_dict()  # re-drawn, not persistent
    else:
        assert w is None  # hash: content-free


@pytest.mark.parametrize("normalize", [True, False])
def test_top_k_and_normalisation(normalize):
    m = make("learned", normalize=normalize)
    x, _, _ = inputs()
    dec = m.router(x)
    assert dec.experts_TK.shape == (10, K) and dec.logits_TE.dtype == torch.float32
    sums = dec.weights_TK.sum(-1)
    if normalize:
        torch.testing.assert_close(sums, torch.ones(10))
    else:
        assert (sums < 1).all()
        torch.testing.assert_close(dec.weights_TK, dec.scores_TE.gather(1, dec.experts_TK.long()))


def test_router_runs_in_fp32_under_autocast():
    m = make("learned")
    x, _, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = m.router(x.detach())
    assert dec.logits_TE.dtype == torch.float32 and dec.weights_TK.dtype == torch.float32


def test_jitter_only_in_training():
    m = make("learned", jitter=0.5)
    x, _, _ = inputs()
    x = x.detach()
    assert not torch.equal(m.router.logits(x[0]), m.router.logits(x[0]))
    m.eval()
    assert torch.equal(m.router.logits(x[0]), m.router.logits(x[0]))


def test_random_router_redrawn_each_step():
    m = make("random")
    w0 = m.router.weight_ED.clone()
    update_routers(m)
    w1 = m.router.weight_ED.clone()
    assert not torch.equal(w0, w1)
    # the draw depends only on the layer's seed and the step: reproducible across ranks
    torch.manual_seed(0)
    other = MoE(D, F, E, K, router="random")
    assert torch.equal(other.router.weight_ED, w0)
    update_routers(other)
    assert torch.equal(other.router.weight_ED, w1)


def test_random_router_state_dict_restores_weight_and_next_redraw(tmp_path):
    m = make("random")
    update_routers(m)
    update_routers(m)  # two draws in
    sd = m.state_dict()
    assert sd["router.draws"].item() == 2 and "router.seed" in sd
    torch.save(sd, tmp_path / "moe.pt")
    torch.manual_seed(123)  # another seed: another weight until the state dict is loaded
    other = MoE(D, F, E, K, router="random")
    assert not torch.equal(other.router.weight_ED, m.router.weight_ED)
    other.load_state_dict(torch.load(tmp_path / "moe.pt"))
    assert torch.equal(other.router.weight_ED, m.router.weight_ED)
    x, _, _ = inputs()
    torch.testing.assert_close(other(x), m(x))
    update_routers(m)
    update_routers(other)
    assert torch.equal(other.router.weight_ED, m.router.weight_ED)  # the next draw agrees too


def test_hash_router_content_free_and_balanced():
    m = make("hash")
    x, _, ids = inputs()
    d1 = m.router(x, token_ids_T=ids.reshape(-1))
    d2 = m.router(torch.randn_like(x), token_ids_T=ids.reshape(-1))
    assert torch.equal(d1.experts_TK, d2.experts_TK)  # depends on the ids only
    ex = hash_experts(torch.arange(4000), 8, 2)
    assert (ex[:, 0] != ex[:, 1]).all()  # distinct experts per token
    load = ex.reshape(-1).bincount(minlength=8).float() / ex.numel()
    assert (load - 1 / 8).abs().max() < 0.02
    torch.testing.assert_close(d1.weights_TK, torch.full((10, K), 0.5))


def test_reference_router_stays_in_domain_group():
    m = make("reference")
    assert m.reference_groups() == [[0, 1], [2, 3]]
    x, labels, _ = inputs()
    labels[0, 0] = -1  # padding: routed like domain 0, excluded from statistics
    stats.enable(m, num_labels=G)
    m(x, labels=labels)
    dec = m.router(x, labels_T=labels.reshape(-1))
    group = dec.experts_TK.long() // 2
    want = labels.reshape(-1).clamp_min(0).unsqueeze(1).expand(-1, K)
    assert torch.equal(group, want)
    s = stats.read(m)
    assert s["tokens_L"].tolist() == [9]
    assert s["requested_LDE"][0, 0, 2:].sum() == 0 and s["requested_LDE"][0, 1, :2].sum() == 0


def test_expert_choice_takes_capacity_per_expert():
    m = make("expert_choice")
    x, _, _ = inputs()
    stats.enable(m, num_labels=1)
    m(x)
    kept = stats.read(m)["kept_LDE"][0, 0]
    C = -(-10 * K // E)  # ceil(T k / E) with T = 10
    assert kept.tolist() == [C] * E  # balanced by construction


def test_sequence_router_one_decision_per_sequence():
    m = make("sequence")
    x, _, _ = inputs()
    dec = m.router(x)
    ex = dec.experts_TK.reshape(2, 5, K)
    assert (ex == ex[:, :1]).all()
    with pytest.raises(ValueError, match="x: router='sequence' needs"):
        m(torch.randn(10, D))


def test_shared_router_reuses_first_layer_decision():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(MoE(D, F, E, K, router="shared_router") for _ in range(3))
    owner = share_router(layers)
    assert owner is layers[0]
    x, _, _ = inputs()
    with pytest.raises(ValueError, match="shared_router"):
        layers[1](x)  # the owner has not routed yet
    stats.enable(layers, num_labels=1)
    h = x
    for m in layers:
        h = h + m(h)
    h.sum().backward()
    s = stats.read(layers)["requested_LDE"]
    assert (s == s[0]).all()  # same decisions in every layer
    assert layers[1].aux_loss.item() == 0.0 and layers[0].aux_loss.item() > 0
    assert not layers[1].router.weight_ED.requires_grad
    assert layers[0].router.weight_ED.grad.abs().sum() > 0


def test_shared_router_references_the_owner_without_adopting_it():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(MoE(D, F, E, K, router="shared_router") for _ in range(3))
    owner = share_router(layers)
    assert all(m is not owner for f in layers[1:] for m in f.modules())  # not a submodule
    assert set(layers[1].state_dict()) == set(owner.state_dict())  # no owner keys in followers
    assert layers[1].router.follows is owner.router.publishes is layers[2].router.follows


def test_shared_experts_add_a_dense_path():
    m = make("learned", shared_experts=1)
    plain = make("learned")
    plain.load_state_dict(m.state_dict(), strict=False)
    x, _, _ = inputs()
    x = x.detach()
    torch.testing.assert_close(m(x) - plain(x), m.shared(x.reshape(-1, D)).reshape(x.shape))


# Only -1 means "skip" (padding); other negative labels or token ids are errors, not domain 0.
@pytest.mark.parametrize(
    "router,kw,match",
    [
        (
            "reference",
            {"labels": [[0, -3, 1]]},
            r"labels: expected domain labels in \[-1, 2\), found -3",
        ),
        ("hash", {"token_ids": [[0, -2, 1]]}, r"token_ids: expected ids >= 0, found -2"),
    ],
)
def test_negative_labels_and_token_ids_raise(router, kw, match):
    m = make(router)
    x = torch.randn(1, 3, D)
    with pytest.raises(ValueError, match=match):
        m(x, **{k: torch.tensor(v) for k, v in kw.items()})
