"""Parameter counts and FLOPs of the model size presets (``config.PRESETS``).

One MoE family: E=8 routed experts, top-2, expert width = d_model.

All presets keep the routing shape fixed (E=8, k=2, fine-grainedness d_ff_expert / d_model = 1)
so that a routing result at ``tiny`` can be checked at ``large`` with nothing else changed. The
one variant, ``tiny_e16k4``, is ``tiny`` with E=16 experts of half the width and top-4 (the
Testbed paper's shape; ``config.PRESET_MOE`` sets E and k): the same expert parameters, total
and active, as ``tiny`` plus 8 router rows per layer.
Counts below are for the default 4096-token vocabulary, tied embeddings, SwiGLU experts, an
MoE FFN in every layer and no shared experts (``python -m moe_testbed.presets`` reprints them):

============  =======  ======  =====  ===========  ==========  ===========  =================
preset        d_model  layers  heads  d_ff_expert  total       active       train FLOPs/token
============  =======  ======  =====  ===========  ==========  ===========  =================
tiny          128      4       4      128          2.36 M      1.18 M       7.9 M
tiny_e16k4    128      4       4      64           2.37 M      1.19 M       7.9 M
small         256      6       4      256          12.07 M     5.00 M       32.3 M
base          384      8       6      384          34.63 M     13.40 M      89.8 M
large         512      11      8      512          82.89 M     30.99 M      203.2 M
============  =======  ======  =====  ===========  ==========  ===========  =================

``large`` has 35x ``tiny``'s total parameters and trains on one GPU. ``tiny`` trains on two CPU
cores in minutes. Train FLOPs/token = 6 x active matmul parameters (the output projection
included, the embedding lookup not) + 12 x layers x seq_len x d_model for attention scores.
"""

from __future__ import annotations

from moe_kernels import MoEConfig
from moe_kernels.activations import ACTIVATIONS
from moe_testbed.config import PRESET_MOE, PRESETS, ModelConfig, default_moe, get_preset

__all__ = ["PRESETS", "DEFAULT_VOCAB", "dense_width", "get_preset", "param_counts", "table"]

DEFAULT_VOCAB = 4096


def param_counts(m: ModelConfig, moe: MoEConfig, vocab_size: int | None = None) -> dict:
    """Analytic parameter counts and training FLOPs per token.

    Returns dict with ``total``, ``active`` (per token: embeddings, attention, norms, routers,
    top_k + shared experts), ``embedding``, ``flops_per_token`` (training, forward + backward).
    Raises KeyError for an activation that ``moe_kernels.activations.ACTIVATIONS`` lacks.
    """
    v = vocab_size or m.vocab_size or DEFAULT_VOCAB
    d = m.d_model
    gated = ACTIVATIONS[moe.activation][1]
    mats = 3 if gated else 2
    expert = mats * d * m.d_ff_expert
    # per-expert biases b1 (and b3 when gated) of width F, b2 of width D: added, not multiplied
    expert_bias = ((mats - 1) * m.d_ff_expert + d) if moe.expert_bias else 0
    dense_ffn = 3 * d * m.d_ff_dense  # dense layers use SwiGLU
    attn = 4 * d * d
    norms = 2 * d
    emb = v * d
    head = 0 if m.tie_embeddings else v * d
    total = active = emb + head + d  # final norm
    matmul_active = v * d  # the output projection (tied or not) is a matmul per token
    width = dense_width(m, moe)
    for layer in range(m.n_layers):
        total += attn + norms
        active += attn + norms
        matmul_active += attn
        if m.is_moe_layer(layer) and width is not None:  # a dense baseline's FFN
            total += 3 * d * width
            active += 3 * d * width
            matmul_active += 3 * d * width
        elif m.is_moe_layer(layer):
            # hash routers have no weight; a random router's weight is a buffer, not a parameter
            router = 0 if moe.router in ("hash", "random") else d * moe.num_experts
            n_total = moe.num_experts + moe.shared_experts
            n_active = moe.top_k + moe.shared_experts
            total += router + n_total * expert + moe.num_experts * expert_bias
            active += router + n_active * expert + moe.top_k * expert_bias
            matmul_active += router + n_active * expert
        else:
            total += dense_ffn
            active += dense_ffn
            matmul_active += dense_ffn
    flops = 6 * matmul_active + 12 * m.n_layers * m.seq_len * d
    return {"total": total, "active": active, "embedding": emb, "flops_per_token": flops}


def dense_width(m: ModelConfig, moe: MoEConfig) -> int | None:
    """Width of the dense SwiGLU FFN that replaces each MoE FFN under ``m.dense`` (Fan et al.
    2024): ``(k + shared) * F`` for ``equal_active``, ``(E + shared) * F`` for ``equal_total``;
    None for ``dense="none"`` (the MoE layers stay)."""
    if m.dense == "none":
        return None
    n = moe.top_k if m.dense == "equal_active" else moe.num_experts
    return (n + moe.shared_experts) * m.d_ff_expert


def table(vocab_size: int = DEFAULT_VOCAB) -> str:
    """The preset table as text (the one in this module's docstring)."""
    rows = [
        f"{'preset':10s} {'d':>4s} {'L':>3s} {'H':>3s} {'F':>4s} {'total':>9s} "
        f"{'active':>9s} {'FLOPs/tok':>10s}"
    ]
    for name, m in PRESETS.items():
        c = param_counts(m, default_moe(**PRESET_MOE.get(name, {})), vocab_size)
        rows.append(
            f"{name:10s} {m.d_model:4d} {m.n_layers:3d} {m.n_heads:3d} {m.d_ff_expert:4d} "
            f"{c['total'] / 1e6:8.2f}M {c['active'] / 1e6:8.2f}M {c['flops_per_token'] / 1e6:9.1f}M"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
