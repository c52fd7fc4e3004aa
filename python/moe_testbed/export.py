"""``moe-testbed export --hf RUN_DIR OUT_DIR``: a testbed model as a Hugging Face model directory.

``OUT_DIR`` gets ``config.json`` + ``model.safetensors`` (fp32) + the run's tokenizer
(``tokenizer.json``, a ``PreTrainedTokenizerFast`` whose end-of-text token is the testbed's
document separator) + ``testbed_export.json`` (source run, step, domains, data settings, family),
so that ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads it and
``moe-testbed analyze`` can analyse it.

Family: **Mixtral** when every block is MoE and the gate weights are renormalised (the testbed's
defaults: softmax top-k with renormalised weights, no shared experts, like Mixtral's router);
**Qwen2-MoE** otherwise (dense blocks via ``mlp_only_layers``, ``norm_topk_prob=False`` for
``normalize=False``, its shared expert of width 0, which adds exactly 0).

Exact, up to floating-point rounding (fp32 logits agree to ~1e-5): attention (the testbed rotates
channel pairs (2i, 2i+1) of every head, HF rotates (i, i + Dh/2) (``rotate_half``), so the q and
k projection rows of each head are permuted to ``[0, 2, 4, ..., 1, 3, 5, ...]``; dot products are
unchanged); RMSNorm (``rms_norm_eps`` = ``model.norm_eps``); tied embeddings
(``tie_word_embeddings``); the router (logits in fp32, softmax, top-k; ties go to the lower
index in both) and the experts (``gate_up_proj = cat(w1, w3)``, ``down_proj = w2``). The RoPE
frequencies are computed in fp64 by the testbed and in fp32 by HF: the only numeric difference.

Not exportable (ValueError listing what is supported): routers other than ``learned``,
``frozen`` and ``random`` (a random router is exported at its current draw) -- ``hash``,
``reference``, ``expert_choice``, ``sequence`` and ``shared_router`` decide with token ids,
domain labels, other tokens or another layer, which no HF family does; sigmoid scores and the
aux-loss-free bias (selection on score + bias: DeepSeek-V3's router, whose attention is MLA,
not the testbed's); shared experts (Qwen2-MoE gates its shared expert with a sigmoid, DeepSeek
attention is MLA); a capacity factor (HF blocks are dropless); non-gated activations and expert
biases.

Legend: D d_model, H heads, Dh head dim, E experts, F expert hidden size, V vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moe_testbed.config import ModelConfig, RunConfig
from moe_testbed.model import MoETransformer
from moe_testbed.rundir import RunDir, atomic_write_json

EXPORTABLE_ROUTERS = ("learned", "frozen", "random")
_HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu"}
SUPPORTED = (
    "routers learned/frozen/random, softmax scores, balance aux or none, no shared experts, "
    "capacity_factor none (dropless), activation swiglu or geglu, no expert biases"
)


def export_family(model_cfg: ModelConfig, moe_cfg: Any) -> str:
    """``"mixtral"`` or ``"qwen2_moe"`` for an exportable config (module docstring).

    Raises ValueError listing every setting that cannot be exported and what is supported.
    """
    m = moe_cfg
    problems = []
    if m.router not in EXPORTABLE_ROUTERS:
        problems.append(f"moe.router={m.router!r} (exportable: {', '.join(EXPORTABLE_ROUTERS)})")
    if m.score != "softmax":
        problems.append(f"moe.score={m.score!r} (HF families here use softmax)")
    if m.balance == "aux_free":
        problems.append("moe.balance='aux_free' (its bias changes the selection)")
    if m.shared_experts:
        problems.append(f"moe.shared_experts={m.shared_experts}")
    if m.capacity_factor is not None:
        problems.append(f"moe.capacity_factor={m.capacity_factor} (HF blocks are dropless)")
    if m.activation not in _HIDDEN_ACT:
        problems.append(f"moe.activation={m.activation!r} (gated: {', '.join(_HIDDEN_ACT)})")
    if m.expert_bias:
        problems.append("moe.expert_bias=True")
    if model_cfg.dense != "none":
        problems.append(f"model.dense={model_cfg.dense!r} (a dense baseline has no experts)")
    if problems:
        raise ValueError(
            "export: cannot be written as a Mixtral or Qwen2-MoE model: "
            + "; ".join(problems)
            + f". Supported: {SUPPORTED}"
        )
    every_moe = all(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers))
    return "mixtral" if every_moe and m.normalize else "qwen2_moe"


def hf_config(model_cfg: ModelConfig, moe_cfg: Any, *, eos_token_id: int = 0):
    """The transformers config of the export (``export_family`` decides the class)."""
    import transformers

    m, moe = model_cfg, moe_cfg
    family = export_family(m, moe)
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        max_position_embeddings=m.seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act=_HIDDEN_ACT[moe.activation],
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_coef,
        attention_dropout=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    if family == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=m.d_ff_expert,
            num_local_experts=moe.num_experts,
            head_dim=m.d_model // m.n_heads,
            router_jitter_noise=0.0,
            sliding_window=None,
            **common,
        )
    dense = [i for i in range(m.n_layers) if not m.is_moe_layer(i)]
    return transformers.Qwen2MoeConfig(
        intermediate_size=m.d_ff_dense,
        moe_intermediate_size=m.d_ff_expert,
        shared_expert_intermediate_size=0,
        num_experts=moe.num_experts,
        norm_topk_prob=moe.normalize,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        qkv_bias=False,
        use_sliding_window=False,
        **common,
    )


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Channel order of one head in HF's ``rotate_half`` convention: HF channel j is testbed
    channel ``perm[j]`` (even channels first, then odd)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def hf_state_dict(model: MoETransformer, family: str) -> dict[str, torch.Tensor]:
    """The testbed model's weights under the HF family's names (fp32 copies)."""
    m = model.model_config
    H, D = m.n_heads, m.d_model
    perm = rope_permutation(D // H)
    t = lambda x: x.detach().float().clone()  # noqa: E731
    sd = {
        "model.embed_tokens.weight": t(model.embed.weight),
        "model.norm.weight": t(model.norm.weight),
    }
    if model.head is not None:
        sd["lm_head.weight"] = t(model.head.weight)
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
        sd[p + "self_attn.q_proj.weight"] = t(q.view(H, D // H, D)[:, perm].reshape(D, D))
        sd[p + "self_attn.k_proj.weight"] = t(k.view(H, D // H, D)[:, perm].reshape(D, D))
        sd[p + "self_attn.v_proj.weight"] = t(v)
        sd[p + "self_attn.o_proj.weight"] = t(block.attn.proj.weight)
        sd[p + "input_layernorm.weight"] = t(block.norm1.weight)
        sd[p + "post_attention_layernorm.weight"] = t(block.norm2.weight)
        if not block.use_moe:
            gate, up = block.ffn.w13.weight.chunk(2, dim=0)
            sd[p + "mlp.gate_proj.weight"] = t(gate)
            sd[p + "mlp.up_proj.weight"] = t(up)
            sd[p + "mlp.down_proj.weight"] = t(block.ffn.w2.weight)
            continue
        w1, w3, w2 = block.ffn.experts.weights()
        sd[p + "mlp.gate.weight"] = t(block.ffn.router.weight_ED)
        sd[p + "mlp.experts.gate_up_proj"] = t(torch.cat([w1, w3], dim=1))
        sd[p + "mlp.experts.down_proj"] = t(w2)
        if family == "qwen2_moe":  # the shared expert of width 0 adds exactly 0
            sd[p + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(0, D)
            sd[p + "mlp.shared_expert.up_proj.weight"] = torch.zeros(0, D)
            sd[p + "mlp.shared_expert.down_proj.weight"] = torch.zeros(D, 0)
            sd[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, D)
    return sd


def hf_tokenizer(tokenizer, model_max_length: int):
    """A ``PreTrainedTokenizerFast`` around a testbed ``tokenizers.Tokenizer``: no special tokens
    are added when encoding; the document separator is the end-of-text (and padding) token."""
    import transformers

    from moe_testbed.data.tokenizer import EOT

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOT,
        bos_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
    )


def export_model(
    model: MoETransformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    eos_token_id: int = 0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` as an HF model directory (module docstring).

    Args: ``tokenizer`` a ``tokenizers.Tokenizer`` (None: no tokenizer files); ``meta`` extra
    entries for ``testbed_export.json``. Returns ``out_dir``.
    Raises ValueError for a model that cannot be exported (``export_family``).
    """
    import transformers

    cfg = hf_config(model.model_config, model.moe_config, eos_token_id=eos_token_id)
    family = cfg.model_type
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = hf_state_dict(model, family)
    if model.model_config.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    if tokenizer is not None:
        hf_tokenizer(tokenizer, model.model_config.seq_len).save_pretrained(out)
    info = {"family": family, "rope": "q/k rows permuted to rotate_half order", **(meta or {})}
    atomic_write_json(out / "testbed_export.json", info)
    return out


def run_config(saved: dict) -> RunConfig:
    """A run's config from its ``config.json``; a run written before ``data.data_seed``
    existed split its documents (and trained its tokenizer) with ``train.seed``: its data
    seed."""
    cfg = RunConfig.from_dict(saved)
    if "data_seed" not in saved.get("data", {}):
        cfg.data.data_seed = cfg.train.seed
    return cfg


def load_run_model(run_dir: str | os.PathLike) -> tuple[MoETransformer, RunConfig, int]:
    """(model on CPU in eval mode, config, step) of a run directory's last checkpoint.

    Raises FileNotFoundError without ``config.json`` or a checkpoint.
    """
    from moe_testbed import checkpoint

    rd = RunDir(run_dir)
    if not rd.config_path.exists():
        raise FileNotFoundError(f"run_dir: {str(rd.path)!r} has no config.json (not a run)")
    if not checkpoint.exists(rd):
        raise FileNotFoundError(f"run_dir: {str(rd.path)!r} has no checkpoint to export")
    cfg = run_config(rd.read_config())
    cpu = torch.device("cpu")
    loaded = checkpoint.load(rd, device=cpu)
    # Every expert, whatever the expert-parallel size the run was saved with.
    world = loaded.state.get("checkpoint", {}).get("world", 1)
    checkpoint.place_experts(loaded, device=cpu, world=world)
    state = loaded.state
    model = MoETransformer(cfg.model, cfg.moe)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, int(state["step"])


def run_tokenizer(cfg: RunConfig):
    """The run's tokenizer, rebuilt as the trainer built it (cached by content key), or None
    for synthetic data (token ids without text)."""
    d = cfg.data
    if d.data_dir == "synthetic":
        return None
    from moe_testbed import data

    corpus = data.load_corpus(d.data_dir or "sample", d.domains, seed=d.data_seed)
    return data.train_tokenizer(corpus, vocab_size=d.tokenizer_vocab)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the last checkpoint of ``run_dir`` (with its tokenizer) to ``out_dir``.

    Raises FileNotFoundError for a missing run or checkpoint, ValueError for a model that
    cannot be exported.
    """
    model, cfg, step = load_run_model(run_dir)
    export_family(cfg.model, cfg.moe)  # fail before rebuilding the tokenizer
    tok = run_tokenizer(cfg)
    meta = {
        "run_dir": str(Path(run_dir).resolve()),
        "step": step,
        "data_dir": cfg.data.data_dir or "sample",
        "domains": cfg.data.domains,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.data_seed,
        "seq_len": cfg.model.seq_len,
        "validation_tokens_per_domain": cfg.data.eval_tokens,
    }
    return export_model(model, out_dir, tokenizer=tok, meta=meta)
