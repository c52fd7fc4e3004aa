"""The MoE layer: dense equivalence, capacity and residual pass-through, compile, autocast,
checkpointing and configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe_kernels import MoE, MoEConfig, aux_losses, stats

D, FF = 8, 16


def dense_ffn(x, w1_FD, w3_FD, w2_DF, activation):
    h = F.linear(x, w1_FD)
    if activation == "swiglu":
        return F.linear(F.silu(h) * F.linear(x, w3_FD), w2_DF)
    return F.linear(F.gelu(h), w2_DF)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_single_expert_equals_dense_ffn(activation):
    # E = 1, k = 1: the gate weight is 1 and every token goes to the one expert
    m = MoE(D, FF, 1, 1, activation=activation)
    x = torch.randn(3, 4, D, requires_grad=True)
    y = m(x)
    w3 = m.w3_EFD[0] if m.w3_EFD is not None else None
    ref = dense_ffn(x, m.w1_EFD[0], w3, m.w2_EDF[0], activation)
    torch.testing.assert_close(y, ref)
    g, gref = torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(g, gref)


def test_shapes_and_from_config():
    cfg = MoEConfig(num_experts=4, top_k=2, router="learned", balance="aux")
    torch.manual_seed(0)
    a = MoE.from_config(D, FF, cfg)
    torch.manual_seed(0)
    b = MoE(D, FF, 4, 2)
    for x in (torch.randn(5, D), torch.randn(2, 3, D), torch.randn(2, 2, 2, D)):
        torch.testing.assert_close(a(x), b(x))
        assert a(x).shape == x.shape
    assert aux_losses(torch.nn.Sequential(a, b)).item() == pytest.approx(
        a.aux_loss.item() + b.aux_loss.item()
    )


def test_reference_backend_matches_default():
    torch.manual_seed(0)
    a = MoE(D, FF, 4, 2, capacity_factor=1.0)
    b = MoE(D, FF, 4, 2, capacity_factor=1.0, backend="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randn(12, D)
    torch.testing.assert_close(a(x), b(x))


def _capacity_layer(drop, normalize=False):
    """E=2, k=1 with every token preferring expert 0 (router weight row 0 large)."""
    torch.manual_seed(0)
    m = MoE(D, FF, 2, 1, capacity_factor=1.0, drop=drop, normalize=normalize, balance="none")
    with torch.no_grad():
        m.router.weight_ED.zero_()
        m.router.weight_ED[0, 0] = 1.0  # logit_0 = x[0], logit_1 = 0
    return m


@pytest.mark.parametrize("drop", ["position", "score"])
def test_capacity_accounting_and_residual(drop):
    m = _capacity_layer(drop)
    x = torch.randn(4, D)
    x[:, 0] = torch.tensor([1.0, 3.0, 2.0, 4.0])  # all -> expert 0, scores increase with x[:, 0]
    stats.enable(m, num_labels=1)
    y = m(x)
    s = stats.read(m)
    # C = ceil(1.0 * 4 * 1 / 2) = 2: expert 0 requested 4, kept 2
    assert s["requested_LDE"][0, 0].tolist() == [4, 0]
    assert s["kept_LDE"][0, 0].tolist() == [2, 0]
    dropped = [2, 3] if drop == "position" else [0, 2]  # later tokens / lowest scores
    kept = [t for t in range(4) if t not in dropped]
    assert (y[dropped] == 0).all() and (y[kept] != 0).any(-1).all()
    out = x + y  # the model's residual: dropped tokens pass through unchanged
    assert torch.equal(out[dropped], x[dropped])


def test_capacity_large_enough_is_dropless():
    torch.manual_seed(0)
    a = MoE(D, FF, 4, 2)
    b = MoE(D, FF, 4, 2, capacity_factor=4.0)  # C = T k: nothing can drop
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, D)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_torch_compile_fullgraph(capacity_factor):
    torch.manual_seed(0)
    m = MoE(D, FF, 4, 2, capacity_factor=capacity_factor)
    stats.enable(m, num_labels=2)
    x = torch.randn(2, 6, D)
    labels = torch.randint(0, 2, (2, 6))
    y0 = m(x, labels=labels)
    a0 = m.aux_loss.detach().clone()
    g0 = torch.autograd.grad(y0.sum() + m.aux_loss, m.router.weight_ED)[0]
    cm = torch.compile(m, fullgraph=True)
    y1 = cm(x, labels=labels)
    g1 = torch.autograd.grad(y1.sum() + m.aux_loss, m.router.weight_ED)[0]
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(m.aux_loss.detach(), a0)
    torch.testing.assert_close(g1, g0)
    assert stats.read(m)["tokens_L"].tolist() == [24]  # both passes recorded


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    m = MoE(D, FF, 4, 2, shared_experts=1)
    x = torch.randn(16, D)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).abs().max().item()
    print("bf16 max err", err, "scale", ref.abs().max().item())
    assert err < 0.05 * ref.abs().max().item()
    y.float().sum().backward()
    assert m.w1_EFD.grad.dtype == torch.float32 and torch.isfinite(m.w1_EFD.grad).all()


def test_gradient_checkpointing_matches_and_counts_once():
    torch.manual_seed(0)
    m = MoE(D, FF, 4, 2, scope="global_batch", capacity_factor=1.5)
    x = torch.randn(2, 5, D, requires_grad=True)
    y = m(x)
    loss = y.square().sum() + m.aux_loss
    grads = torch.autograd.grad(loss, [x, m.w1_EFD, m.router.weight_ED])
    m.update_router()
    stats.enable(m, num_labels=1)
    y2 = checkpoint(lambda t: m(t), x, use_reentrant=False)
    loss2 = y2.square().sum() + m.aux_loss
    grads2 = torch.autograd.grad(loss2, [x, m.w1_EFD, m.router.weight_ED])
    torch.testing.assert_close(y2, y)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)
    assert stats.read(m)["tokens_L"].tolist() == [10]  # the recomputation did not count again
    assert m.balance_state.global_counts_E.sum().item() == 10 * 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=2, top_k=3), "top_k"),  # k > E
        (dict(router="magic"), "router"),
        (dict(balance="sometimes"), "balance"),
        (dict(scope="epoch"), "scope"),
        (dict(drop="random"), "drop"),
        (dict(activation="tanh"), "activation"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(router="reference"), "num_groups"),  # no number of domains
        (dict(router="reference", num_groups=3), "num_groups"),  # 4 % 3 != 0
        (dict(router="reference", num_groups=4, top_k=2), "top_k"),  # k > E / G
        (dict(router="hash", balance="aux_free"), "balance"),
        (dict(bias_rule="linear"), "bias_rule"),
        (dict(jitter=1.5), "jitter"),
        (dict(not_a_field=1), "config"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    args = dict(num_experts=4, top_k=2)
    args.update(kwargs)
    E, k = args.pop("num_experts"), args.pop("top_k")
    with pytest.raises(ValueError, match=match):
        MoE(D, FF, E, k, **args)


def test_bad_forward_inputs_raise():
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="labels: router='reference' needs"):
        MoE(D, FF, 4, 2, router="reference", num_groups=2)(x)
    with pytest.raises(ValueError, match="labels: expected domain labels"):
        MoE(D, FF, 4, 2, router="reference", num_groups=2)(x, labels=torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="token_ids: router='hash' needs"):
        MoE(D, FF, 4, 2, router="hash")(x)
    with pytest.raises(ValueError, match="labels: expected shape"):
        MoE(D, FF, 4, 2)(x, labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected shape"):
        MoE(D, FF, 4, 2)(torch.randn(3, D + 1))


def test_capacity_formula():
    # C_e = ceil(cf * T * k / E): T = 10, k = 2, E = 4, cf = 1.25 -> ceil(6.25) = 7
    m = MoE(D, FF, 4, 2, capacity_factor=1.25)
    dec = m.router(torch.randn(10, D))
    plan = m._plan(dec, 10)
    assert plan.num_rows == min(10 * 2, 4 * math.ceil(1.25 * 10 * 2 / 4))


def test_expert_weights_live_in_grouped_experts_and_old_keys_load():
    torch.manual_seed(0)
    a = MoE(D, FF, 4, 2, expert_bias=True)
    assert a.w1_EFD is a.experts.w1_EFD and "experts.w1_EFD" in a.state_dict()
    # a checkpoint from before the experts moved into layer.experts: keys w1_EFD, b1_EF, ...
    old = {k.removeprefix("experts."): v for k, v in a.state_dict().items()}
    assert "w1_EFD" in old and "b2_ED" in old
    b = MoE(D, FF, 4, 2, expert_bias=True)
    b.load_state_dict(old)
    x = torch.randn(6, D)
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_x(bad):
    # The op's error named its internal argument (logits_TE); the layer names its own.
    x = torch.randn(3, D)
    x[1, 2] = bad
    with pytest.raises(
        ValueError, match=r"^x: expected finite values, found NaN or inf in token 1"
    ):
        MoE(D, FF, 4, 2)(x)


@pytest.mark.parametrize("name", ["x", "labels", "token_ids"])
def test_input_on_another_device_names_it(name):
    # "meta" stands for any other device: it used to fail with "unsupported scalarType".
    inputs = {"x": torch.randn(3, D), "labels": torch.zeros(3, dtype=torch.long)}
    inputs["token_ids"] = torch.arange(3)
    inputs[name] = inputs[name].to("meta")
    m = MoE(D, FF, 4, 2, router="hash")
    x = inputs.pop("x")
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on cpu .*, got meta"):
        m(x, **inputs)
