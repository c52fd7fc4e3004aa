"""A small decoder-only transformer whose FFNs are ``moe_kernels.MoE`` layers.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; rotary position
embeddings; causal attention through ``F.scaled_dot_product_attention``; an MoE FFN in every
``moe_every``-th layer (counting from the last), a dense SwiGLU FFN elsewhere; optional tied
input/output embeddings. With ``model.dense`` set (a dense baseline, Fan et al. 2024) the MoE
FFNs are dense SwiGLU FFNs of width k F or E F instead and the model has no MoE layers: routing
statistics and metrics are then absent.

Legend: B batch, S sequence positions, D d_model, H heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import MoE, MoEConfig, share_router
from moe_kernels.routers import Router
from moe_testbed.config import ModelConfig
from moe_testbed.presets import dense_width, param_counts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (S, Dh/2) for rotary embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) by position-dependent angles."""
    s = x_BHSD.shape[2]
    cos, sin = cos_SD[:s].to(x_BHSD.dtype), sin_SD[:s].to(x_BHSD.dtype)
    x1, x2 = x_BHSD[..., 0::2], x_BHSD[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.n_heads = m.n_heads
        self.qkv = nn.Linear(m.d_model, 3 * m.d_model, bias=False)
        self.proj = nn.Linear(m.d_model, m.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    """SwiGLU FFN for the layers without MoE."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * g)


class Block(nn.Module):
    """One block; ``ffn_width`` None gives an MoE FFN, else a dense SwiGLU FFN of that width."""

    def __init__(self, m: ModelConfig, moe: MoEConfig, ffn_width: int | None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m)
        self.norm2 = RMSNorm(m.d_model, m.norm_eps)
        self.use_moe = ffn_width is None
        if self.use_moe:
            self.ffn = MoE.from_config(m.d_model, m.d_ff_expert, moe)
        else:
            self.ffn = DenseFFN(m.d_model, ffn_width)

    def forward(self, x, cos, sin, labels_BS, token_ids_BS):
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        if self.use_moe:
            h = self.ffn(h, labels=labels_BS, token_ids=token_ids_BS)
        else:
            h = self.ffn(h)
        return x + h


class MoETransformer(nn.Module):
    """Decoder-only LM. ``forward(tokens_BS, labels_BS=None) -> logits_BSV`` (fp32)."""

    def __init__(self, m: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if m.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be set (> 0), got {m.vocab_size}")
        self.model_config, self.moe_config = m, moe
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        dense = dense_width(m, moe)  # a dense baseline replaces the MoE FFNs (m.dense)
        widths = [(dense if m.is_moe_layer(i) else m.d_ff_dense) for i in range(m.n_layers)]
        self.blocks = nn.ModuleList(Block(m, moe, w) for w in widths)
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)
        cos, sin = rope_tables(m.seq_len, m.d_model // m.n_heads, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_dense_weights()
        if moe.router == "shared_router" and self.moe_layers():
            share_router(self)

    def _init_dense_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers) so
        # the residual stream's variance does not grow with depth. The MoE layers own their init.
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=std / math.sqrt(2 * len(self.blocks)))
            if not block.use_moe:
                nn.init.normal_(block.ffn.w13.weight, std=std)
                nn.init.normal_(block.ffn.w2.weight, std=std / math.sqrt(2 * len(self.blocks)))

    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if b.use_moe]

    def forward(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None):
        s = tokens_BS.shape[1]
        if s > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {s} exceeds model.seq_len {self.rope_cos.shape[0]}")
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, labels_BS, tokens_BS)
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, w).float()

    def num_params(self) -> dict[str, int]:
        """Counted parameters (shared tensors once) and the analytic active/FLOPs figures."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        analytic = param_counts(self.model_config, self.moe_config)
        return {
            "total": total,
            "active": analytic["active"] + (total - analytic["total"]),
            "flops_per_token": analytic["flops_per_token"],
        }


@torch.no_grad()
def route_experts(
    model: MoETransformer, tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Expert choices of every MoE layer for ``tokens_BS``: a list over layers of experts_TK.

    Runs one forward pass with hooks on the routers (T = B * S, row-major). Routing statistics
    collected during the pass are the caller's to discard.
    """
    seen: list[torch.Tensor] = []
    hook = lambda _m, _inp, decision: seen.append(decision.experts_TK)  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]
    was_training = model.training
    try:
        model.eval()
        model(tokens_BS, labels_BS)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [e.long() for e in seen]
