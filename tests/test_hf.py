"""HF integration on tiny random-weight models built from transformers config classes (offline)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_kernels import aux_losses, stats, update_routers  # noqa: E402
from moe_kernels.integrations.hf import (  # noqa: E402
    SparseMoEBlock,
    UpcycledMLP,
    captured_routing,
    convert_sparse_moe,
    set_routing_inputs,
    upcycle,
)

V = 50
SMALL = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=V,
    max_position_embeddings=32,
)


def _sparse_models():
    t = transformers
    yield (
        "mixtral",
        t.MixtralForCausalLM(
            t.MixtralConfig(
                intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **SMALL
            )
        ),
    )
    yield (
        "qwen2_moe",
        t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(
                intermediate_size=24,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                **SMALL,
            )
        ),
    )
    yield (
        "qwen3_moe",
        t.Qwen3MoeForCausalLM(
            t.Qwen3MoeConfig(
                intermediate_size=24,
                moe_intermediate_size=8,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
                norm_topk_prob=True,
                **SMALL,
            )
        ),
    )
    yield (
        "olmoe",
        t.OlmoeForCausalLM(
            t.OlmoeConfig(intermediate_size=8, num_experts=4, num_experts_per_tok=2, **SMALL)
        ),
    )


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_sparse_blocks_same_outputs_and_routing(name):
    torch.manual_seed(0)
    model = dict(_sparse_models())[name].eval()
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        h = torch.randn(2, 7, 16)
        block = model.model.layers[0].mlp
        ref_block = block(h)
    names = convert_sparse_moe(model, capture=True)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(model.model.layers[0].mlp, SparseMoEBlock)
    labels = torch.randint(0, 3, (2, 7))
    stats.enable(model, num_labels=3)
    set_routing_inputs(model, labels=labels)
    with torch.no_grad():
        out = model(ids).logits
    s = stats.read(model)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[0].mlp(h), ref_block)
    err = (out - ref).abs().max().item()
    print(name, "max |logits - original|", err)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    caps = captured_routing(model)
    assert len(caps) == 2 and len(caps[0]) == 2 and len(caps[1]) == 1  # block 0 ran twice
    assert caps[0][0].experts_TK.shape == (14, 2)
    assert s["requested_LDE"].shape == (2, 3, 4) and s["tokens_L"].tolist() == [14, 14]
    assert (
        s["requested_LDE"].sum(-1) == torch.bincount(labels.reshape(-1), minlength=3).numpy() * 2
    ).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_upcycle_exact_at_init_and_trains(family):
    t = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        model = t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=V, n_positions=32)
        )
    else:
        model = t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=24, **SMALL))
    model.eval()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    names = upcycle(model, num_experts=4, top_k=2, capacity_factor=None)
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), UpcycledMLP) for n in names)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # identical experts, gates sum to 1
    model.train()
    loss = model(ids, labels=ids).loss + aux_losses(model)
    loss.backward()
    moe = model.get_submodule(names[0]).moe
    assert moe.w1_EFD.grad is not None and moe.router.weight_ED.grad is not None
    update_routers(model)


def test_upcycle_noise_makes_experts_differ():
    t = transformers
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=24, **SMALL))
    upcycle(model, num_experts=4, top_k=1, noise=0.1, generator=torch.Generator().manual_seed(0))
    w = model.model.layers[0].mlp.moe.w1_EFD
    assert not torch.equal(w[0], w[1])


def test_no_recognised_modules_raise():
    with pytest.raises(ValueError, match="model"):
        upcycle(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="model"):
        convert_sparse_moe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
