"""Load balancing: Switch auxiliary loss at three scopes, router z-loss, aux-loss-free bias.

Legend: T tokens, E experts, K top-k, B sequences, S tokens per sequence. ``scores_TE`` are the
router scores s_t (softmax, or sigmoid normalised to sum 1 per token so that the balanced value
of the Switch loss is 1 for both), ``experts_TK`` the selected set S_t (-1 = not selected, used by
expert-choice routing for slots an expert did not take).

Definitions follow ``docs/ROUTING.md``:

- ``L_aux = E * sum_i f_i P_i`` with ``f_i = C_i / (k T)`` (no gradient) and ``P_i`` the mean score.
  Token-choice routers select exactly k experts per token, so ``sum_i C_i = k T`` and
  ``f = C / sum(C)``; that form is used so expert-choice routing (variable experts per token) keeps
  balanced value 1 as well.
- ``L_z = mean_t logsumexp(z_t)^2``.
- Aux-loss-free bias: ``b_i <- b_i + u * sign(mean_j c_j - c_i)``; the ``"mean_centred"`` rule
  then subtracts the mean of b so the bias cannot drift as a whole.
- Sinkhorn balancing (``moe_kernels.sinkhorn``) and balanced assignment
  (``moe_kernels.assignment``) change the selection itself, in training, over the scope's tokens
  (:func:`balanced_decision`); they are defined at ``sequence`` and ``micro_batch`` scope only.

Balancing state lives in :class:`BalanceState` (owned by each ``MoE`` layer) and is updated
outside ``forward`` by ``moe_kernels.update_routers``; no module-global lists.
"""

from __future__ import annotations

import torch

from moe_kernels.assignment import assign_select
from moe_kernels.sinkhorn import sinkhorn_select

BALANCES = ("aux", "aux_free", "sinkhorn", "assignment", "none")
# Methods that select experts from a balanced problem over the scope's tokens, the scopes where
# that is defined (a forward pass sees one micro-batch, never the whole optimizer step) and the
# routers whose selection is a top-k of learned logits they can replace.
SELECTING = ("sinkhorn", "assignment")
SELECTING_SCOPES = ("sequence", "micro_batch")
SELECTING_ROUTERS = ("learned", "frozen", "random", "shared_router")
SCOPES = ("sequence", "micro_batch", "global_batch")
BIAS_RULES = ("sign", "mean_centred")


def selection_counts(experts_RX: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-row selection counts, shape (R, E) float32, from ids (R, X); ids < 0 are skipped.

    Uses scatter-add into E + 1 columns (the last one collects skipped ids), so it has a static
    output shape and no host synchronisation (``torch.compile`` friendly).
    """
    ex = experts_RX.detach().long()
    ex = torch.where(ex < 0, num_experts, ex)
    out = torch.zeros(ex.shape[0], num_experts + 1, device=ex.device, dtype=torch.float32)
    out.scatter_add_(1, ex, torch.ones(ex.shape, device=ex.device, dtype=torch.float32))
    return out[:, :num_experts]


def balance_scores(scores_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Scores as a distribution per token: softmax unchanged, sigmoid divided by its sum."""
    s = scores_TE.float()
    if score == "sigmoid":
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    return s


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i P_i`` with f = counts / sum(counts) (detached), P = mean over tokens.

    Args:
        probs_TE: (T, E) per-token score distributions (rows sum to 1), differentiable.
        counts_E: (E,) selection counts over the scope's token set (any float/int dtype).
    Returns: a scalar fp32 tensor; 1 at perfect balance.
    """
    E = probs_TE.shape[-1]
    c = counts_E.detach().float()
    f = c / c.sum().clamp_min(1.0)
    P = probs_TE.float().sum(0) / max(probs_TE.shape[0], 1)  # T = 0 gives 0, not NaN
    return E * (f * P).sum()


def sequence_aux_loss(probs_BSE: torch.Tensor, experts_BSK: torch.Tensor) -> torch.Tensor:
    """Switch loss computed per sequence (f and P over its S tokens), averaged over sequences."""
    Bn, S, E = probs_BSE.shape
    if Bn == 0:
        return probs_BSE.new_zeros((), dtype=torch.float32)
    counts_BE = selection_counts(experts_BSK.reshape(Bn, S * experts_BSK.shape[-1]), E)
    f = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)
    P = probs_BSE.float().mean(1)
    return (E * (f * P).sum(-1)).mean()


def scoped_aux_loss(
    probs_TE: torch.Tensor,
    selected_TK: torch.Tensor,
    counts_E: torch.Tensor,
    scope: str,
    *,
    seq_len: int,
    state: BalanceState,
    training: bool,
) -> torch.Tensor:
    """The Switch loss over the scope's token set (a scalar fp32 tensor).

    ``sequence``: per sequence of ``seq_len`` tokens (T divisible by it), averaged over
    sequences; ``global_batch`` in training: f from the counts of every micro-batch of the step on
    all ranks so far (accumulated in ``state``); ``micro_batch`` (and ``global_batch`` in
    evaluation, where there is no step to accumulate over): this micro-batch's ``counts_E``.
    ``probs_TE`` (T, E) per-token distributions; ``selected_TK`` (T, K) selected ids (-1 = none).
    """
    if scope == "sequence":
        E, K = probs_TE.shape[-1], selected_TK.shape[-1]
        return sequence_aux_loss(
            probs_TE.reshape(-1, seq_len, E), selected_TK.reshape(-1, seq_len, K)
        )
    if scope == "global_batch" and training:
        return switch_aux_loss(probs_TE, state.accumulate_global(counts_E))
    return switch_aux_loss(probs_TE, counts_E)


def balanced_decision(
    dec, method: str, k: int, scope: str, *, seq_len: int, iters: int, normalize: bool
):
    """``dec`` (a ``RouterDecision``) with its experts chosen by ``method`` (``"sinkhorn"`` with
    ``iters`` rounds, or ``"assignment"``) over the scope's token groups: each sequence of
    ``seq_len`` tokens (``sequence``) or all T tokens (``micro_batch``). The gate weights are the
    router's own scores ``dec.scores_TE`` at the chosen experts (renormalised to sum 1 with
    ``normalize``), so gradients reach the router through the weights only."""
    logits_TE = dec.logits_TE
    T, E = logits_TE.shape
    groups = T // seq_len if scope == "sequence" and T else 1
    z_GSE = logits_TE.reshape(groups, T // groups if groups else 0, E)
    if method == "sinkhorn":
        experts = sinkhorn_select(z_GSE, k, iters)
    else:
        experts = assign_select(z_GSE, k)
    experts_TK = experts.reshape(T, k)
    w = dec.scores_TE.gather(1, experts_TK)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return dec._replace(weights_TK=w, experts_TK=experts_TK.to(torch.int32).contiguous())


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(z_t)^2`` in fp32 (0 for no tokens)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits_TE.float(), -1).square().mean()


def aux_free_update(
    bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float, rule: str
) -> torch.Tensor:
    """One aux-loss-free bias step: raise the bias of under-loaded experts, lower over-loaded ones.

    Returns the new bias (same dtype and device); experts exactly at the mean load keep theirs.
    """
    c = counts_E.float()
    new = bias_E + rate * torch.sign(c.mean() - c).to(bias_E.dtype)
    if rule == "mean_centred":
        new = new - new.mean()
    return new


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _in_backward() -> bool:
    """True while autograd is running a backward pass (activation-checkpoint recomputation):
    accumulators must not count the same micro-batch twice."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class BalanceState:
    """Per-layer, rank-local balancing accumulators (not ``nn.Module`` buffers, so DDP's buffer
    broadcast never overwrites them with rank 0's values; the layer moves them with ``.to``).

    global_counts_E: selection counts of the current optimizer step, all ranks (global scope).
    window_counts_E: selection counts of the aux-free feedback window on this rank.
    """

    def __init__(self, num_experts: int, device=None) -> None:
        self.global_counts_E = torch.zeros(num_experts, device=device)
        self.window_counts_E = torch.zeros(num_experts, device=device)
        self.last_counts_E = torch.zeros(num_experts, device=device)

    def apply(self, fn) -> None:
        for name in ("global_counts_E", "window_counts_E", "last_counts_E"):
            setattr(self, name, fn(getattr(self, name)))

    def accumulate_global(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Add this micro-batch's counts (all-reduced over ranks) and return the running total.

        During activation-checkpoint recomputation nothing is added (the total already holds this
        micro-batch), so the recomputed loss matches the forward one.
        """
        if _in_backward():
            return self.global_counts_E.clone()
        c = counts_E.detach().float()
        if _dist_ready():
            c = c.clone()
            torch.distributed.all_reduce(c)
        self.global_counts_E.add_(c)
        return self.global_counts_E.clone()

    def accumulate_window(self, counts_E: torch.Tensor) -> None:
        if _in_backward():
            return
        c = counts_E.detach().float()
        self.window_counts_E.add_(c)
        self.last_counts_E.copy_(c)

    def window(self, scope: str) -> torch.Tensor:
        """Counts of the feedback window: the last micro-batch on this rank, or every micro-batch
        since the last update summed over ranks (``global_batch``)."""
        if scope != "global_batch":
            return self.last_counts_E.clone()
        c = self.window_counts_E.clone()
        if _dist_ready():
            torch.distributed.all_reduce(c)
        return c

    def reset(self) -> None:
        self.global_counts_E.zero_()
        self.window_counts_E.zero_()
        self.last_counts_E.zero_()
