"""Top-k gating: router logits -> (gate weights, expert ids).

Legend: T tokens, E experts, K top-k. ``logits_TE`` fp32/bf16/fp16/fp64; ``weights_TK`` fp32
(fp64 for fp64 logits); ``experts_TK`` int32. Scores are computed in fp32 (fp64), the optional
``bias_E`` changes the selection only (never the weights), ties go to the lower expert index, and
the weights are differentiable in the logits.

Non-finite logits: the reference and CPU backends raise a ValueError. The CUDA backend cannot
without a host synchronisation, so it flags the token instead: its weights are NaN, its expert
ids -1 (which the CUDA ``route`` skips: dropped slots) and its logit gradients NaN.

Non-finite ``bias_E``: the reference and CPU backends raise a ValueError naming ``bias_E``; the
CUDA and Triton backends flag every token as above (weights NaN, ids -1), decided on the device.
"""

from __future__ import annotations

import torch

from moe_kernels.ops import _select as S
from moe_kernels.triton import families

SCORES = ("softmax", "sigmoid")
# How the reference and CPU backends' error for NaN or inf logits starts (csrc/cpu/topk_gating.cpp).
NON_FINITE_LOGITS = "logits_TE: expected finite values"


def router_scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """The score function s = score(logits) (``"softmax"`` over experts or ``"sigmoid"``),
    computed in the dtype of ``logits_TE`` (callers pass fp32/fp64 logits)."""
    return torch.softmax(logits_TE, -1) if score == "softmax" else torch.sigmoid(logits_TE)


def topk_gating_reference(logits_TE, k, score="softmax", bias_E=None, normalize=True):
    """Plain-torch gating. Selection on the logits themselves when there is no bias (the scores
    are monotonic in them), so exact ties resolve identically in every backend."""
    acc = S.weight_dtype_for(logits_TE.dtype)
    z = logits_TE.to(acc)
    if bias_E is not None:
        S.check_finite("bias_E", bias_E)
    if z.numel() and not bool(torch.isfinite(z).all()):
        bad = int((~torch.isfinite(z)).any(-1).nonzero()[0, 0])
        raise ValueError(f"{NON_FINITE_LOGITS}, found NaN or inf in token {bad}")
    s = router_scores(z, score)
    sel = z if bias_E is None else s + bias_E.to(acc)
    experts = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(-1, experts)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return w, experts.to(torch.int32)


def topk_gating_backward_reference(grad_w_TK, logits_TE, experts_TK, score, normalize):
    """d(loss)/d(logits) from d(loss)/d(weights), in plain torch (the reference backend's
    backward, taken by every backend without a backward kernel)."""
    acc = S.weight_dtype_for(logits_TE.dtype)
    z = logits_TE.to(acc)
    s = router_scores(z, score)
    idx = experts_TK.long()
    g = s.gather(-1, idx)
    dg = grad_w_TK.to(acc)
    if normalize:
        denom = g.sum(-1, keepdim=True)
        dg = (dg - (dg * (g / denom)).sum(-1, keepdim=True)) / denom
    ds = torch.zeros_like(s).scatter_add_(-1, idx, dg)
    if score == "softmax":
        dz = s * (ds - (ds * s).sum(-1, keepdim=True))
    else:
        dz = ds * s * (1 - s)
    return dz.to(logits_TE.dtype)


class ReferenceTopkGating(S.Backend):
    name = "reference"

    def not_supported_reasons(self, logits, bias, k):
        return []

    def forward(self, logits, k, score, bias, normalize):
        return topk_gating_reference(logits, k, score, bias, normalize)

    def backward(self, grad_w, logits, experts, score, normalize):
        return topk_gating_backward_reference(grad_w, logits, experts, score, normalize)


class CpuTopkGating(S.Backend):
    """C++ forward (csrc/cpu/topk_gating.cpp); no backward kernel (the reference's is taken)."""

    name = "cpu"

    def not_supported_reasons(self, logits, bias, k):
        return S.cpu_reasons(logits)

    def forward(self, logits, k, score, bias, normalize):
        T, E = logits.shape
        w = torch.empty(T, k, dtype=S.weight_dtype_for(logits.dtype))
        experts = torch.empty(T, k, dtype=torch.int32)
        S._C.topk_gating_cpu(
            S.ptr(logits),
            S.DTYPE_CODES[logits.dtype],
            T,
            E,
            k,
            SCORES.index(score),
            S.ptr(bias),
            normalize,
            S.ptr(w),
            S.ptr(experts),
        )
        return w, experts


# Limits of the CUDA kernels (csrc/cuda/topk_gating.h; _C.topk_gating_cuda_max_experts and
# _C.topk_gating_cuda_max_top_k).
CUDA_MAX_EXPERTS = 256
CUDA_MAX_TOP_K = 16


class CudaTopkGating(S.Backend):
    """One warp per token (csrc/cuda/topk_gating.cu); E <= 256, k <= 16; has its own backward."""

    name = "cuda"

    def not_supported_reasons(self, logits, bias, k):
        reasons = S.cuda_reasons(logits, bias, dtypes=S.FLOAT_DTYPES)
        E = logits.shape[-1]
        if E > CUDA_MAX_EXPERTS:
            reasons.append(f"E = {E} experts > {CUDA_MAX_EXPERTS} (one warp holds a token's row)")
        if k > CUDA_MAX_TOP_K:
            reasons.append(f"k = {k} > {CUDA_MAX_TOP_K}")
        return reasons

    def forward(self, logits, k, score, bias, normalize):
        T, E = logits.shape
        w = torch.empty(T, k, dtype=S.weight_dtype_for(logits.dtype), device=logits.device)
        experts = torch.empty(T, k, dtype=torch.int32, device=logits.device)
        S._C.topk_gating_cuda(
            S.ptr(logits),
            S.DTYPE_CODES[logits.dtype],
            T,
            E,
            k,
            SCORES.index(score),
            S.ptr(bias),
            normalize,
            S.ptr(w),
            S.ptr(experts),
            S.cuda_stream(logits),
        )
        return w, experts

    def backward(self, grad_w, logits, experts, score, normalize):
        T, E = logits.shape
        K = experts.shape[1]
        grad_w = grad_w.to(S.weight_dtype_for(logits.dtype)).contiguous()
        experts = experts.contiguous()
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        S._C.topk_gating_backward_cuda(
            S.ptr(grad_w),
            S.ptr(logits),
            S.DTYPE_CODES[logits.dtype],
            S.ptr(experts),
            T,
            E,
            K,
            SCORES.index(score),
            normalize,
            S.ptr(dlogits),
            S.cuda_stream(logits),
        )
        return dlogits


BACKENDS: list[S.Backend] = [
    CudaTopkGating(),
    families.make("topk_gating"),
    CpuTopkGating(),
    ReferenceTopkGating(),
]


@torch.library.custom_op("moe_kernels::topk_gating", mutates_args=())
def _topk_gating_op(
    logits: torch.Tensor,
    k: int,
    score: str,
    bias: torch.Tensor | None,
    normalize: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return S.by_name(BACKENDS, backend).forward(logits, k, score, bias, normalize)


@_topk_gating_op.register_fake
def _(logits, k, score, bias, normalize, backend):
    T = logits.shape[0]
    w = logits.new_empty(T, k, dtype=S.weight_dtype_for(logits.dtype))
    return w, logits.new_empty(T, k, dtype=torch.int32)


@torch.library.custom_op("moe_kernels::topk_gating_backward", mutates_args=())
def _topk_gating_backward_op(
    grad_w: torch.Tensor,
    logits: torch.Tensor,
    experts: torch.Tensor,
    score: str,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    return S.by_name(BACKENDS, backend).backward(grad_w, logits, experts, score, normalize)


@_topk_gating_backward_op.register_fake
def _(grad_w, logits, experts, score, normalize, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, _, score, _, normalize, backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.score, ctx.normalize, ctx.backend = score, normalize, backend


def _backward(ctx, grad_w, _grad_experts):
    """dlogits on the backend that the one backward rule picks (moe_kernels.ops._select
    .backward_backend): the forward's when it has a ``backward`` (CUDA, reference), else the first
    in automatic order that has one. A kernel runs through the topk_gating_backward custom op so
    torch.compile can trace it; the reference's plain-torch backward runs inline, so it stays
    differentiable (double backward) and visible to the compiler."""
    logits, experts = ctx.saved_tensors
    chosen = S.backward_backend(
        "topk_gating_backward",
        BACKENDS,
        ctx.backend,
        "backward",
        logits=logits,
        bias=None,
        k=experts.shape[1],
    )
    if chosen.name == "reference":
        d = chosen.backward(grad_w, logits, experts, ctx.score, ctx.normalize)
    else:
        d = _topk_gating_backward_op(grad_w, logits, experts, ctx.score, ctx.normalize, chosen.name)
    return d, *([None] * 5)


_topk_gating_op.register_autograd(_backward, setup_context=_setup)


def topk_gating(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias_E: torch.Tensor | None = None,
    normalize: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the top-``k`` experts of every token and their gate weights.

    Args:
        logits_TE: router logits, shape (T, E), float dtype, contiguous, finite.
        k: experts per token, 1 <= k <= E.
        score: ``"softmax"`` or ``"sigmoid"`` scores s = score(logits), computed in fp32.
        bias_E: optional selection bias (shape (E,)): selection uses s + bias, weights use s.
        normalize: renormalise the k selected scores to sum to 1.
        backend: force a backend (``"cpu"``, ``"reference"``, ...); default picks the first fit.

    Returns:
        ``(weights_TK, experts_TK)``: fp32 (fp64 for fp64 logits) weights and int32 expert ids,
        ordered by decreasing selection score, ties to the lower index.

    Raises:
        TypeError / ValueError naming the argument: wrong type, dtype, rank, device, shape,
        k out of range, unknown score, NaN or inf logits or ``bias_E``, non-contiguous logits.
        The CUDA backend does not raise on NaN or inf logits (that would need a host
        synchronisation): it returns NaN weights and expert ids -1 for those tokens (see the
        module docstring); for a NaN or inf in ``bias_E`` (ValueError on CPU) it flags every
        token so.
    """
    S.check_tensor("logits_TE", logits_TE, ndim=2, dtypes=S.FLOAT_DTYPES)
    S.check_contiguous("logits_TE", logits_TE)
    T, E = logits_TE.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"k: expected 1 <= k <= E = {E}, got {k}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    if bias_E is not None:
        S.check_tensor("bias_E", bias_E, ndim=1, dtypes=S.FLOAT_DTYPES, device=logits_TE.device)
        S.check_shape("bias_E", bias_E, (E,))
        bias_E = bias_E.detach().to(torch.float32).contiguous()
    chosen = S.select("topk_gating", BACKENDS, backend, logits=logits_TE, bias=bias_E, k=k)
    weights_TK, experts_TK = _topk_gating_op(
        logits_TE, k, score, bias_E, bool(normalize), chosen.name
    )
    if bias_E is not None and chosen.name not in ("cpu", "reference"):
        weights_TK, experts_TK = _flag_all_if_not_finite(bias_E, weights_TK, experts_TK)
    return weights_TK, experts_TK


def _flag_all_if_not_finite(bias_E, weights_TK, experts_TK):
    """Every token flagged (weights NaN, ids -1) when ``bias_E`` holds a NaN or inf: the CUDA
    and Triton backends' stand-in for the ValueError of the others, computed on the device (no
    host synchronisation; three small kernels, only with a bias)."""
    ok = torch.isfinite(bias_E).all()
    nan = torch.full((), float("nan"), dtype=weights_TK.dtype, device=weights_TK.device)
    return torch.where(ok, weights_TK, nan), torch.where(ok, experts_TK, -1)
