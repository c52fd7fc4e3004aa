"""Model shapes, gradients, parameter counts of the presets, routing trace."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import MoEConfig
from moe_testbed.config import ModelConfig, default_moe
from moe_testbed.model import MoETransformer, route_experts
from moe_testbed.presets import PRESETS, get_preset, param_counts


@pytest.fixture(autouse=True)
def _one_thread():
    # Small CPU matmuls: one thread avoids oversubscription on shared two-core machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small(**kw) -> tuple[ModelConfig, MoEConfig]:
    m = ModelConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff_expert=16, d_ff_dense=48, seq_len=16
    )
    moe = default_moe(num_experts=4, top_k=2)
    for k, v in kw.items():
        setattr(m if hasattr(m, k) else moe, k, v)
    return m, moe


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"moe_every": 2},  # one dense and one MoE layer
        {"tie_embeddings": False},
        {"router": "hash"},  # needs token ids, which the model passes
        {"router": "reference", "num_groups": 2},  # needs labels
        {"router": "shared_router"},
        {"shared_experts": 1, "activation": "gelu"},
        {"expert_bias": True},  # per-expert biases b1, b3 (gated) and b2 are counted
        {"expert_bias": True, "activation": "relu", "shared_experts": 1},  # ungated: no b3
        {"activation": "geglu"},  # gated activations other than swiglu carry w3 too
    ],
)
def test_forward_backward_shapes(kw):
    torch.manual_seed(0)
    m, moe = _small(**kw)
    model = MoETransformer(m, moe)
    tokens = torch.randint(0, 97, (3, 16))
    labels = torch.randint(0, 2, (3, 16))
    logits = model(tokens, labels)
    assert logits.shape == (3, 16, 97) and logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()
    counts = model.num_params()
    assert counts["total"] == param_counts(m, moe)["total"]


def test_causal():
    torch.manual_seed(0)
    model = MoETransformer(*_small(router="hash")).eval()  # hash: routing ignores context
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_route_experts_one_entry_per_layer():
    model = MoETransformer(*_small())
    experts = route_experts(model, torch.randint(0, 97, (2, 16)))
    assert len(experts) == 2 and all(e.shape == (32, 2) for e in experts)


def test_sequence_longer_than_model_raises():
    model = MoETransformer(*_small())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_match_model(name):
    m, moe = get_preset(name), default_moe()
    m.vocab_size = 4096
    with torch.device("meta"):
        model = MoETransformer(m, moe)
    assert model.num_params()["total"] == param_counts(m, moe)["total"]


def test_large_is_about_35x_tiny():
    tiny = param_counts(get_preset("tiny"), default_moe())
    large = param_counts(get_preset("large"), default_moe())
    assert 2e6 < tiny["total"] < 5e6
    assert 33 <= large["total"] / tiny["total"] <= 37
    assert tiny["active"] < tiny["total"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")
