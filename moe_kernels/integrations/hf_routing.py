"""How each supported Hugging Face MoE family turns router logits into a routing decision.

Legend: T tokens, E routed experts, K top-k, G expert groups.

Every rule returns a ``moe_kernels.routers.RouterDecision`` computed with ``topk_gating``
(selection) and plain torch (scores), and reproduces the family's own router exactly (up to
exact ties between scores, which ``topk_gating`` gives to the lower expert index):

==================  =======================================================================
rule                families and semantics
==================  =======================================================================
``softmax_topk``    Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over E in fp32, top-k,
                    weights renormalised to sum 1 when ``norm_topk_prob`` (Mixtral: always).
``deepseek_v2``     DeepSeek-V2: softmax scores; ``topk_method="greedy"`` is plain top-k,
                    ``"group_limited_greedy"`` first keeps the ``topk_group`` groups (of
                    E / ``n_group`` consecutive experts) with the largest maximum score; weights
                    are the selected scores (never renormalised) times ``routed_scaling_factor``.
``sigmoid_grouped`` DeepSeek-V3, GLM-4-MoE: sigmoid scores; selection on score +
                    ``e_score_correction_bias`` (the bias never enters the weights) within the
                    ``topk_group`` groups whose two largest biased scores sum highest; weights
                    the selected scores, renormalised when ``norm_topk_prob``, times
                    ``routed_scaling_factor``.
==================  =======================================================================

Group-limited selection masks the experts outside the kept groups and lets ``topk_gating``
pick the top-k of the (biased) selection scores: without a bias ``topk_gating`` selects on its
input values themselves, so a finite mask value below every score excludes them exactly.

Blocks are recognised by class name (:data:`BLOCK_RULES`); every family's router keeps its
configuration on the ``gate`` module (``top_k``, ``norm_topk_prob``, ``n_group`` ...), read at
each forward, so a changed correction bias is used at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_kernels.ops import topk_gating
from moe_kernels.routers import RouterDecision, top_k_decision

# Below every softmax or sigmoid score (plus any correction bias a trained router has), finite as
# topk_gating requires.
_EXCLUDED = -1.0e9

# Sparse MoE block class -> rule name. Families outside this table are refused, not guessed:
# a block with a different router (Phi-MoE's sparse mixer, GPT-OSS's biased router) would
# otherwise be converted with the wrong routing and give wrong numbers without any error.
BLOCK_RULES: dict[str, str] = {
    "MixtralSparseMoeBlock": "softmax_topk",
    "Qwen2MoeSparseMoeBlock": "softmax_topk",
    "Qwen3MoeSparseMoeBlock": "softmax_topk",
    "OlmoeSparseMoeBlock": "softmax_topk",
    "DeepseekV2Moe": "deepseek_v2",
    "DeepseekV3MoE": "sigmoid_grouped",
    "Glm4MoeMoE": "sigmoid_grouped",
}

# ``config.model_type`` of the causal LMs whose sparse blocks are in BLOCK_RULES.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
)


def _group_mask(key_TE: torch.Tensor, num_groups: int, keep: int, group_score: str) -> torch.Tensor:
    """(T, E) bool, True for experts in the ``keep`` best of ``num_groups`` consecutive groups;
    a group's score is its maximum (``"max"``) or the sum of its two largest keys (``"top2"``)."""
    T, E = key_TE.shape
    grouped = key_TE.view(T, num_groups, E // num_groups)
    if group_score == "max":
        score_TG = grouped.max(dim=-1).values
    else:
        score_TG = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(score_TG, k=keep, dim=-1, sorted=False).indices
    mask_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, best, True)
    return mask_TG.repeat_interleave(E // num_groups, dim=1)


def _select(key_TE: torch.Tensor, k: int, backend: str | None) -> torch.Tensor:
    """experts_TK int32: the top-k of ``key_TE`` (ties to the lower index), via topk_gating."""
    _, experts_TK = topk_gating(key_TE.contiguous(), k, normalize=False, backend=backend)
    return experts_TK


def softmax_topk(gate: nn.Module, logits_TE: torch.Tensor, k: int, normalize: bool, backend):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE (see the module docstring)."""
    return top_k_decision(logits_TE, k, normalize=normalize, backend=backend)


def deepseek_v2(gate: nn.Module, logits_TE: torch.Tensor, k: int, normalize: bool, backend):
    """DeepSeek-V2 (see the module docstring)."""
    scale = float(gate.routed_scaling_factor)
    method = gate.topk_method
    if method == "greedy":
        dec = top_k_decision(logits_TE, k, normalize=False, backend=backend)
        return dec._replace(weights_TK=dec.weights_TK * scale)
    if method != "group_limited_greedy":
        raise ValueError(
            f"model: DeepSeek-V2 topk_method {method!r} is not supported; expected 'greedy' or "
            "'group_limited_greedy'"
        )
    scores_TE = torch.softmax(logits_TE, dim=-1)
    mask = _group_mask(scores_TE, int(gate.num_group), int(gate.topk_group), "max")
    experts_TK = _select(torch.where(mask, scores_TE, _EXCLUDED), k, backend)
    weights_TK = scores_TE.gather(1, experts_TK.long()) * scale
    return RouterDecision(weights_TK, experts_TK, scores_TE, logits_TE)


def sigmoid_grouped(gate: nn.Module, logits_TE: torch.Tensor, k: int, normalize: bool, backend):
    """DeepSeek-V3 / GLM-4-MoE (see the module docstring)."""
    scores_TE = torch.sigmoid(logits_TE)
    key_TE = scores_TE + gate.e_score_correction_bias.float()
    mask = _group_mask(key_TE, int(gate.num_group), int(gate.topk_group), "top2")
    experts_TK = _select(torch.where(mask, key_TE, _EXCLUDED), k, backend)
    weights_TK = scores_TE.gather(1, experts_TK.long())
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * float(gate.routed_scaling_factor)
    return RouterDecision(weights_TK, experts_TK, scores_TE, logits_TE)


Rule = Callable[[nn.Module, torch.Tensor, int, bool, "str | None"], RouterDecision]

RULES: dict[str, Rule] = {
    "softmax_topk": softmax_topk,
    "deepseek_v2": deepseek_v2,
    "sigmoid_grouped": sigmoid_grouped,
}

# The score function behind each rule's ``scores_TE`` (router entropy and confidence).
RULE_SCORE: dict[str, str] = {
    "softmax_topk": "softmax",
    "deepseek_v2": "softmax",
    "sigmoid_grouped": "sigmoid",
}


def block_rule(block: nn.Module) -> str | None:
    """The rule name of a supported sparse MoE block, None for any other module."""
    name = BLOCK_RULES.get(type(block).__name__)
    if name is None or not hasattr(block, "gate") or not hasattr(block, "experts"):
        return None
    return name
