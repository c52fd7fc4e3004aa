"""The evaluation pass and specialization against chance (``docs/METRICS.md``).

The validation set is ``RunData.val_sequences()``: ``ceil(data.eval_tokens / S)`` windows per
domain spread over the domain's validation documents, the same whatever the micro-batch size.
Evaluation batches hold ``data.eval_batch_size`` sequences with the domains interleaved (row i
of the set's domain-ordered windows goes round-robin over domains), so a capacity factor drops
tokens of a mixed batch as it does in training, not of a batch of one domain.

:func:`forward_pass` returns each sequence's loss and top-k counts per layer (the counts the
permutation null needs), and optionally the counts of random linear routers applied to the same
layer inputs (the representation floor). :func:`chance_record` turns a pass into the values,
nulls and corrected scores; :func:`evaluate_run` (``moe-testbed evaluate RUN_DIR``) and the
trainer's last evaluation write ``RUN_DIR/evaluation.json`` (format in ``docs/METRICS.md``).
Legend: N validation sequences, S positions, L MoE layers, D domains, E experts, R draws.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_testbed.config import RunConfig
from moe_testbed.metrics import chance
from moe_testbed.model import MoETransformer
from moe_testbed.rundir import RunDir, atomic_write_json
from moe_testbed.runtime import autocast_for, seed_everything

EVALUATION_FILE = "evaluation.json"
FORMAT = 1


@dataclass
class Pass:
    """One pass over the validation set: ``loss_N`` summed cross-entropy per sequence,
    ``counts_LNE`` the model's own top-k selections (requested, before capacity),
    ``floor_RLNE`` those of the random routers (None without), ``domain_N``, ``positions`` S."""

    loss_N: np.ndarray
    counts_LNE: np.ndarray
    floor_RLNE: np.ndarray | None
    domain_N: np.ndarray
    positions: int

    def domain_loss(self, num_domains: int) -> list[float]:
        """Mean next-token loss of every domain's tokens."""
        return [
            float(self.loss_N[self.domain_N == d].sum() / max(1, (self.domain_N == d).sum()))
            / self.positions
            for d in range(num_domains)
        ]


def interleaved(domain_N: torch.Tensor) -> torch.Tensor:
    """Sequence order taking the domains round-robin: the j-th sequence of every domain, then
    the (j+1)-th, ... (a domain with fewer sequences drops out at its end)."""
    domain_N = domain_N.long()
    rank_N = torch.zeros_like(domain_N)
    for d in domain_N.unique():
        idx = torch.nonzero(domain_N == d)[:, 0]
        rank_N[idx] = torch.arange(len(idx))
    num = int(domain_N.max()) + 1 if len(domain_N) else 1
    return torch.argsort(rank_N * num + domain_N, stable=True)


def initial_model(cfg: RunConfig) -> MoETransformer:
    """The run's model at step 0: the trainer's initialisation from ``train.seed`` (``cfg``
    resolved: vocabulary and reference groups set)."""
    seed_everything(cfg.train.seed)
    return MoETransformer(cfg.model, cfg.moe)


@torch.no_grad()
def forward_pass(
    model: MoETransformer,
    cfg: RunConfig,
    device: torch.device,
    tokens_NS1: torch.Tensor,
    domain_N: torch.Tensor,
    *,
    floor_weights: torch.Tensor | None = None,
    progress: bool = False,
) -> Pass:
    """Run ``model`` (eval mode) over the validation set in interleaved batches of
    ``data.eval_batch_size``; ``floor_weights`` (R, L, E, D) random routers to apply to each MoE
    layer's input beside the model's own router."""
    layers = model.moe_layers()
    num_seqs, positions = tokens_NS1.shape[0], tokens_NS1.shape[1] - 1
    num_experts, k = cfg.moe.num_experts, cfg.moe.top_k
    counts = torch.zeros(len(layers), num_seqs, num_experts)
    floor = (
        None
        if floor_weights is None
        else torch.zeros(floor_weights.shape[0], len(layers), num_seqs, num_experts)
    )
    loss_N = torch.zeros(num_seqs, dtype=torch.float64)
    inputs: list[torch.Tensor] = []  # each MoE layer's input (T, D), in layer order
    selected: list[torch.Tensor] = []  # each layer's selected experts (T, K), -1 = none

    def hook(_m, args, kwargs, _decision):
        x = args[0] if args else kwargs["x"]
        inputs.append(x.reshape(-1, x.shape[-1]))

    def recording(router):
        own = router.selection

        def selection(dec, plan):  # the selected sets the stats count (expert choice: kept)
            out = own(dec, plan)
            selected.append(out[0].long())
            return out

        return selection

    batches = interleaved(domain_N).split(cfg.data.eval_batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    handles = [layer.router.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    for layer in layers:
        layer.router.selection = recording(layer.router)
    try:
        for idx in batches:
            toks = tokens_NS1[idx].to(device)
            labels = domain_N[idx].to(device)[:, None].expand_as(toks)
            inputs.clear()
            selected.clear()
            with autocast_for(cfg, device):
                logits = model(toks[:, :-1], labels[:, :-1])
            ce = F.cross_entropy(
                logits.flatten(0, 1).float(), toks[:, 1:].reshape(-1), reduction="none"
            )
            loss_N[idx] = ce.view(len(idx), -1).sum(1).double().cpu()
            seq_T = torch.arange(len(idx), device=device).repeat_interleave(positions)
            for layer, (x, experts_TK) in enumerate(zip(inputs, selected)):
                flat = (seq_T[:, None] * num_experts + experts_TK)[experts_TK >= 0]
                c = torch.bincount(flat, minlength=len(idx) * num_experts)
                counts[layer, idx] = c.view(len(idx), num_experts).float().cpu()
                if floor is not None:
                    f = chance.topk_counts(x, floor_weights[:, layer], k, seq_T, len(idx))
                    floor[:, layer, idx] = f.cpu()
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.router.selection  # back to the class's method
        model.train(was_training)
    return Pass(
        loss_N.numpy(),
        counts.numpy(),
        None if floor is None else floor.numpy(),
        domain_N.numpy(),
        positions,
    )


def chance_record(
    run: Pass, num_domains: int, *, router: str, permutations: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per metric: the model's value with its permutation null and corrected score, and the
    representation floor (mean over the random-router draws, each with its own null). For
    ``router="random"`` the model's value is the floor: the random router over many draws."""
    floor = None
    if run.floor_RLNE is not None:
        per_draw = max(20, permutations // len(run.floor_RLNE))
        floor = chance.over_draws(
            [
                chance.against_chance(
                    c, run.domain_N, num_domains, permutations=per_draw, seed=seed + 1 + r
                )
                for r, c in enumerate(run.floor_RLNE)
            ]
        )
    if router == "random" and floor is not None:
        own = {k: dict(v) for k, v in floor.items()}
    else:
        own = chance.against_chance(
            run.counts_LNE, run.domain_N, num_domains, permutations=permutations, seed=seed
        )
    se = chance.bootstrap_se(run.counts_LNE, run.domain_N, num_domains, seed=seed)
    out = {}
    for k, v in own.items():
        entry = {f: v[f] for f in ("value", "null_mean", "null_p95", "null_std", "corrected")}
        entry["se"] = se[k]
        if floor is not None:
            entry["floor"] = floor[k]["value"]
            entry["floor_corrected"] = floor[k]["corrected"]
            entry["floor_draw_std"] = floor[k]["value_draw_std"]
        out[k] = entry
    return out


def evaluate_model(
    model: MoETransformer,
    cfg: RunConfig,
    data: Any,
    device: torch.device,
    *,
    permutations: int = 200,
    floor_draws: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Validation loss per domain and :func:`chance_record` of ``model`` on ``data``."""
    tokens_NS1, domain_N = data.val_sequences()
    layers = model.moe_layers()
    weights = None
    if floor_draws > 0:
        weights = chance.random_router_weights(
            len(layers),
            cfg.moe.num_experts,
            cfg.model.d_model,
            floor_draws,
            seed=cfg.train.seed + 7919,
        )
    run = forward_pass(
        model, cfg, device, tokens_NS1, domain_N, floor_weights=weights, progress=progress
    )
    num_domains = len(data.domains)
    loss = run.domain_loss(num_domains)
    metrics = {}  # a dense baseline routes nothing: no routing metrics, not zeros
    if layers:
        metrics = chance_record(
            run, num_domains, router=cfg.moe.router, permutations=permutations, seed=cfg.train.seed
        )
    return {
        "val_loss": float(np.mean(loss)),
        "val_loss_by_domain": dict(zip(data.domains, loss)),
        "metrics": metrics,
    }


def evaluation_record(
    model: MoETransformer,
    cfg: RunConfig,
    data: Any,
    device: torch.device,
    step: int,
    *,
    permutations: int = 200,
    floor_draws: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """What ``evaluation.json`` holds: the trained model's evaluation and, under ``step0``, the
    same evaluation of the model rebuilt at step 0 from the seed."""
    kw = dict(permutations=permutations, floor_draws=floor_draws, progress=progress)
    trained = evaluate_model(model, cfg, data, device, **kw)
    untrained = evaluate_model(initial_model(cfg).to(device), cfg, data, device, **kw)
    for k, entry in trained["metrics"].items():
        entry["step0"] = untrained["metrics"][k]["value"]
        entry["step0_corrected"] = untrained["metrics"][k]["corrected"]
    tokens_NS1, _ = data.val_sequences()
    return {
        "format": FORMAT,
        "step": step,
        "router": cfg.moe.router,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.data_seed,
        "domains": list(data.domains),
        "eval_tokens": cfg.data.eval_tokens,
        "windows_per_domain": int(tokens_NS1.shape[0] // max(1, len(data.domains))),
        "eval_batch_size": cfg.data.eval_batch_size,
        "capacity_factor": cfg.moe.capacity_factor,
        "permutations": permutations,
        "floor_draws": floor_draws,
        **trained,
        "step0": untrained,
    }


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    eval_tokens: int | None = None,
    permutations: int = 200,
    floor_draws: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Evaluate the last checkpoint of ``run_dir`` and write ``RUN_DIR/evaluation.json``
    atomically; returns its path. A run written before ``data.data_seed`` existed is read with
    its training seed as data seed (``export.run_config``). Raises FileNotFoundError for a
    missing run or checkpoint, ValueError for bad arguments."""
    from moe_testbed.export import load_run_model
    from moe_testbed.sources import build_data

    for name, value, lo in (("permutations", permutations, 1), ("floor_draws", floor_draws, 0)):
        if value < lo:
            raise ValueError(f"{name}: expected >= {lo}, got {value}")
    if eval_tokens is not None and eval_tokens < 1:
        raise ValueError(f"eval_tokens: expected >= 1, got {eval_tokens}")
    model, cfg, step = load_run_model(run_dir)
    if eval_tokens is not None:
        cfg.data.eval_tokens = eval_tokens
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    data = build_data(cfg, 0, 1)
    record = evaluation_record(
        model.to(dev),
        cfg,
        data,
        dev,
        step,
        permutations=permutations,
        floor_draws=floor_draws,
        progress=progress,
    )
    return atomic_write_json(RunDir(run_dir).path / EVALUATION_FILE, record)


def read_evaluation(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/evaluation.json`` or None when absent."""
    import json

    path = Path(run_dir) / EVALUATION_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())
