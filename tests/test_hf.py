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


def _deepseek_models():
    t = transformers
    mla = dict(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4)
    moe = dict(
        intermediate_size=24,
        moe_intermediate_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )
    # Grouped top-k: 4 groups of 2 experts, 2 groups kept; scaling factor != 1 so a weight rule
    # that forgot it would show.
    grouped = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    yield (
        "deepseek_v2",
        t.DeepseekV2ForCausalLM(
            t.DeepseekV2Config(
                topk_method="group_limited_greedy", v_head_dim=8, **mla, **moe, **grouped, **SMALL
            )
        ),
    )
    yield (
        "deepseek_v2_greedy",
        t.DeepseekV2ForCausalLM(
            t.DeepseekV2Config(topk_method="greedy", v_head_dim=8, **mla, **moe, **SMALL)
        ),
    )
    yield (
        "deepseek_v3",
        t.DeepseekV3ForCausalLM(
            t.DeepseekV3Config(v_head_dim=8, norm_topk_prob=True, **mla, **moe, **grouped, **SMALL)
        ),
    )
    yield (
        "glm4_moe",
        t.Glm4MoeForCausalLM(
            t.Glm4MoeConfig(head_dim=8, norm_topk_prob=False, **moe, **grouped, **SMALL)
        ),
    )


SPARSE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
DEEPSEEK = ["deepseek_v2", "deepseek_v2_greedy", "deepseek_v3", "glm4_moe"]


def _model(name):
    torch.manual_seed(0)
    model = dict([*_sparse_models(), *_deepseek_models()])[name].eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):  # some families start their routers at zero: ties
                p.normal_(0.0, 1.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # the bias must change the selection
                b.copy_(torch.randn_like(b) * 0.3)
    return model


@pytest.mark.parametrize("name", SPARSE + DEEPSEEK)
def test_captured_routing_equals_unpatched_routing(name):
    """Router logits -> top-k ids and gate weights of the converted blocks equal those the
    unpatched HF routers return for the same forward."""
    model = _model(name)
    ids = torch.randint(0, V, (2, 7))
    seen = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    handles = [g.register_forward_hook(lambda _m, _i, out: seen.append(out)) for g in gates]
    with torch.no_grad():
        ref = model(ids).logits
    for h in handles:
        h.remove()
    names = convert_sparse_moe(model, capture=True)
    assert len(names) == len(gates)
    with torch.no_grad():
        out = model(ids).logits
    caps = [c[0] for c in captured_routing(model)]
    assert len(caps) == len(seen)
    for (logits_TE, weights_TK, experts_TK), cap in zip(seen, caps):
        torch.testing.assert_close(cap.logits_TE, logits_TE.float())
        # HF returns unsorted top-k for some families: compare per token in expert-id order.
        order_hf, order_ours = experts_TK.argsort(-1), cap.experts_TK.long().argsort(-1)
        assert torch.equal(
            experts_TK.gather(-1, order_hf), cap.experts_TK.long().gather(-1, order_ours)
        )
        torch.testing.assert_close(
            cap.weights_TK.gather(-1, order_ours), weights_TK.float().gather(-1, order_hf)
        )
    print(name, "max |logits - original|", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SPARSE + DEEPSEEK)
def test_sparse_blocks_same_outputs_and_routing(name):
    model = _model(name)
    ids = torch.randint(0, V, (2, 7))
    first = "model.layers.1.mlp" if name in DEEPSEEK else "model.layers.0.mlp"
    with torch.no_grad():
        ref = model(ids).logits
        h = torch.randn(2, 7, 16)
        block = model.get_submodule(first)
        ref_block = block(h)
    names = convert_sparse_moe(model, capture=True)
    L = len(names)
    assert names == ([first] if name in DEEPSEEK else [first, "model.layers.1.mlp"])
    assert isinstance(model.get_submodule(first), SparseMoEBlock)
    labels = torch.randint(0, 3, (2, 7))
    stats.enable(model, num_labels=3)
    set_routing_inputs(model, labels=labels)
    with torch.no_grad():
        out = model(ids).logits
    s = stats.read(model)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(first)(h), ref_block)
    err = (out - ref).abs().max().item()
    print(name, "max |logits - original|", err)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    caps = captured_routing(model)
    assert len(caps) == L and len(caps[0]) == 2  # block 0 ran twice
    assert all(len(c) == 1 for c in caps[1:])
    assert caps[0][0].experts_TK.shape == (14, 2)
    E = model.get_submodule(first).num_experts
    assert s["requested_LDE"].shape == (L, 3, E) and s["tokens_L"].tolist() == [14] * L
    assert (
        s["requested_LDE"].sum(-1) == torch.bincount(labels.reshape(-1), minlength=3).numpy() * 2
    ).all()


def test_unsupported_block_names_the_supported_ones():
    class PhimoeSparseMoeBlock(torch.nn.Module):  # a sparse block with another router
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.ModuleList()

    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        convert_sparse_moe(torch.nn.Sequential(PhimoeSparseMoeBlock()))
    with pytest.raises(ValueError, match="DeepseekV3MoE"):
        SparseMoEBlock(PhimoeSparseMoeBlock())


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
