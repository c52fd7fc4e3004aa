"""``moe-testbed specialize``: fine-tune the experts most specialized to one domain.

For a target domain d (definitions in ``docs/METRICS.md``, "Expert specialization score"):

1. **Score** every (layer, expert) by its share of d's routing specialization,
   ``s(l, e) = q(e) log(E q(e)) / log E`` with ``q`` the routing distribution of d's training
   tokens in layer l (summed over e it gives d's term of ``routing_specialization``).
2. **Select** (``dbes``) the top experts of every layer up to the parameter budget (default 15%
   of the trainable parameters): rank by rank (every layer's best expert, then every layer's
   second best, ...; within a rank the higher scores first), adding an expert while the budget
   allows. ``random`` takes the same number of experts per layer at random; ``all`` trains every
   parameter (full fine-tuning).
3. **Freeze** everything else. Routers stay frozen under ``dbes`` and ``random``: the selection
   was made from the current routing, and a router that moved would send d's tokens away from
   the selected experts and change the other domains' routing. Expert weights are stacked per
   layer (E, ...), so an expert is trained by masking the gradients of the other experts' slices
   to zero; with AdamW at weight decay 0 an all-zero gradient leaves a slice exactly unchanged.
4. **Fine-tune** on d's training split (next-token cross-entropy only, constant learning rate,
   gradient clipping at 1) and **report** the validation loss of every domain before and after
   (the target's gain, the other domains' change = forgetting), the trained parameter count and
   the wall time, for each selection.

Works on testbed run directories (the run's corpus, tokenizer, sequence length and validation
tokens by default) and on HF MoE models (``moe-testbed analyze``'s families; ``--text``).

Legend: L MoE layers, E experts, D domains, B sequences, S positions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import stats
from moe_kernels.integrations.hf import set_routing_inputs
from moe_testbed.domain_text import (
    DomainText,
    domain_windows,
    hf_encoder,
    load_text,
    window_batches,
)
from moe_testbed.model import MoETransformer
from moe_testbed.rundir import atomic_write_json

SELECTIONS = ("dbes", "random", "all")


def routing_layers(model: nn.Module) -> list[nn.Module]:
    """MoE layers (``moe_kernels.MoE``) or converted HF blocks, in module order."""
    return [m for m in model.modules() if getattr(type(m), "_records_routing", False)]


def expert_tensors(layer: nn.Module) -> list[nn.Parameter]:
    """The routed experts' parameters of one layer, each stacked over experts (dim 0 = E)."""
    return [p for p in layer.experts.parameters() if p.shape[0] == layer.num_experts]


def router_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The router's parameters (testbed ``router``, HF ``gate``)."""
    router = getattr(layer, "router", None) or getattr(layer, "gate", None)
    return list(router.parameters()) if router is not None else []


def trainable_count(model: nn.Module) -> int:
    """Parameters that train in full fine-tuning (``requires_grad``, shared tensors once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def specialization_scores(counts_LE: np.ndarray) -> np.ndarray:
    """``s(l, e) = q(e) log(E q(e)) / log E`` for the target domain's counts (L, E) (float64;
    ``0 log 0 = 0``). Raises ValueError for a layer without selections."""
    c = np.asarray(counts_LE, dtype=np.float64)
    if c.ndim != 2 or (c.sum(1) <= 0).any():
        raise ValueError(
            f"counts_LE: expected (L, E) counts with selections in every layer, got {c}"
        )
    E = c.shape[1]
    q = c / c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(q > 0, q * np.log(E * q), 0.0)
    return s / math.log(E) if E > 1 else s


def select_experts(
    scores_LE: np.ndarray, expert_params_L: Sequence[int], budget_params: float
) -> list[list[int]]:
    """The ``dbes`` selection: rank by rank over layers, higher scores first within a rank, an
    expert added while ``budget_params`` allows. Returns the expert ids of every layer.
    Raises ValueError when not even one expert fits."""
    s = np.asarray(scores_LE)
    L, E = s.shape
    order = np.argsort(-s, axis=1, kind="stable")
    chosen: list[list[int]] = [[] for _ in range(L)]
    used = 0
    for rank in range(E):
        for layer in sorted(range(L), key=lambda i: -s[i, order[i, rank]]):
            if used + expert_params_L[layer] <= budget_params:
                chosen[layer].append(int(order[layer, rank]))
                used += expert_params_L[layer]
    if used == 0:
        raise ValueError(
            f"budget: {budget_params:.0f} parameters do not hold one expert "
            f"({min(expert_params_L)} parameters); raise --budget"
        )
    return chosen


def random_selection(sizes: Sequence[int], num_experts: int, seed: int) -> list[list[int]]:
    """``sizes[l]`` distinct random experts of every layer (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(num_experts, generator=g)[:n].tolist()) for n in sizes]


def apply_selection(model: nn.Module, experts_by_layer: Sequence[Sequence[int]] | None) -> int:
    """Make only the selected experts trainable (None: every parameter); returns the trained
    parameter count. Gradient hooks zero the other experts' slices of the stacked tensors."""
    if experts_by_layer is None:
        return trainable_count(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = 0
    for layer, chosen in zip(routing_layers(model), experts_by_layer):
        if not chosen:
            continue
        for p in expert_tensors(layer):
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
            mask[list(chosen)] = 1
            p.requires_grad_(True)
            p.register_hook(lambda g, m=mask: g * m)
            trained += p[0].numel() * len(chosen)
    return trained


# ----------------------------------------------------------------------------- models


@dataclass
class Subject:
    """What specialize needs of a model: ``load()`` a fresh copy on the device, ``forward``,
    the tokenizer (``encode``, ``sep``) and the defaults of text, domains, S, seed, eval tokens."""

    load: Callable[[], nn.Module]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    encode: Callable[[list[str]], list[list[int]]]
    sep: int
    text: str
    domains: str | None
    seq_len: int
    seed: int
    eval_tokens: int


def _subject(path: str, device: torch.device) -> Subject:
    """A testbed run directory (``config.json`` with a ``model`` section) or an HF model."""
    from moe_testbed.rundir import RunDir

    config = RunDir(path).read_config() if Path(path).is_dir() else {}
    if "model" in config and "moe" in config:
        from moe_testbed.export import load_run_model, run_tokenizer

        _, cfg, _ = load_run_model(path)
        tok = run_tokenizer(cfg)
        if tok is None:
            raise ValueError("model: a run on synthetic data has no text to fine-tune on")
        encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        return Subject(
            load=lambda: load_run_model(path)[0].to(device),
            forward=lambda m, x, lab: m(x, lab),
            encode=encode,
            sep=0,
            text=cfg.data.data_dir or "sample",
            domains=cfg.data.domains,
            seq_len=cfg.model.seq_len,
            seed=cfg.data.data_seed,
            eval_tokens=cfg.data.eval_tokens,
        )
    import transformers

    from moe_testbed.analyze import hf_model_config, load_hf_model

    config = hf_model_config(path)
    encode, sep = hf_encoder(transformers.AutoTokenizer.from_pretrained(path))
    return Subject(
        load=lambda: load_hf_model(path, device=device, capture=False)[0],
        forward=lambda m, x, lab: m(input_ids=x).logits,
        encode=encode,
        sep=sep,
        text="sample",
        domains=None,
        seq_len=min(512, int(getattr(config, "max_position_embeddings", 512))),
        seed=0,
        eval_tokens=4096,
    )


@torch.no_grad()
def domain_counts(
    subject: Subject, model: nn.Module, windows: torch.Tensor, label: int, batch: int
) -> np.ndarray:
    """Requested selections (L, E) of ``windows`` (one domain, label ``label``; inputs only)."""
    model.eval()
    dev = routing_layers(model)[0].device
    stats.enable(model, num_labels=label + 1)
    try:
        for s in range(0, windows.shape[0], batch):
            x = windows[s : s + batch, :-1].to(dev)
            labels = torch.full_like(x, label)
            if not isinstance(model, MoETransformer):  # HF blocks read set_routing_inputs
                set_routing_inputs(model, labels=labels)
            subject.forward(model, x, labels)
        return stats.read(model)["requested_LDE"][:, label, :]
    finally:
        stats.disable(model)
        if not isinstance(model, MoETransformer):
            set_routing_inputs(model, labels=None)


@torch.no_grad()
def validation_losses(
    subject: Subject, model: nn.Module, windows: dict[str, torch.Tensor], batch: int
) -> dict[str, float]:
    """Mean next-token cross-entropy of every domain's validation windows."""
    model.eval()
    dev = routing_layers(model)[0].device
    sums = {d: [0.0, 0] for d in windows}
    names = list(windows)
    for tokens_BS1, labels_BS1 in window_batches(windows, batch):
        x, y = tokens_BS1[:, :-1].to(dev), tokens_BS1[:, 1:].to(dev)
        logits = subject.forward(model, x, labels_BS1[:, :-1].to(dev)).float()
        s = sums[names[int(labels_BS1[0, 0])]]
        s[0] += float(F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="sum"))
        s[1] += y.numel()
    return {d: total / n for d, (total, n) in sums.items()}


def finetune(
    subject: Subject,
    model: nn.Module,
    train_windows: torch.Tensor,
    label: int,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """``steps`` AdamW steps (weight decay 0, clip 1) on batches of ``train_windows`` (shuffled,
    cycled); returns the wall time in seconds (device synchronised)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev = routing_layers(model)[0].device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_windows.shape[0], generator=g)
    model.train()
    tic = time.perf_counter()
    for step in range(steps):
        idx = order[(torch.arange(batch_size) + step * batch_size) % order.numel()]
        batch = train_windows[idx].to(dev)
        x, y = batch[:, :-1], batch[:, 1:]
        labels = torch.full_like(x, label)
        logits = subject.forward(model, x, labels).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    model.eval()
    return time.perf_counter() - tic


def specialize(
    model: str,
    domain: str,
    *,
    budget: float = 0.15,
    select: Sequence[str] = SELECTIONS,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    text: str | None = None,
    domains: str | None = None,
    seq_len: int | None = None,
    eval_tokens: int | None = None,
    device: str = "auto",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score, select, fine-tune and evaluate (module docstring) for every ``select`` entry.

    Returns ``{"domain", "budget", "total_params", "selected": {layer: experts}, "scores_LE",
    "base": {domain: loss}, "runs": [{"select", "experts", "trained_params",
    "trained_fraction", "wall_s", "val_loss", "target_change", "others_change"}]}`` and writes
    ``specialize.json`` / ``specialize.md`` into ``out`` when given.
    Raises FileNotFoundError / ValueError for bad models, text, domain, budget or selection.
    """
    bad = [s for s in select if s not in SELECTIONS]
    if bad or not select:
        raise ValueError(f"select: expected some of {SELECTIONS}, got {list(select)}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget: expected a share of the parameters in (0, 1], got {budget}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    from moe_testbed.analyze import resolve_device

    dev = resolve_device(device)
    if not Path(str(model)).exists() and str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model: no such directory {str(model)!r}")
    subj = _subject(str(model), dev)
    S = seq_len or subj.seq_len
    source = text or subj.text
    val_text = load_text(source, domains or subj.domains, split="validation", seed=subj.seed)
    if domain not in val_text.domains:
        raise ValueError(f"domain: {domain!r} is not among the domains {val_text.domains}")
    train_text = load_text(source, domains or subj.domains, split="train", seed=subj.seed)
    n_eval = max(1, (eval_tokens or subj.eval_tokens) // S)
    val = domain_windows(val_text, subj.encode, subj.sep, S, n_eval, spread=True)
    train_only = DomainText([domain], {domain: train_text.docs[domain]}, source, "train")
    train = domain_windows(train_only, subj.encode, subj.sep, S, steps * batch_size)[domain]
    label = val_text.domains.index(domain)

    base_model = subj.load()
    layers = routing_layers(base_model)
    E = layers[0].num_experts
    total = trainable_count(base_model)
    per_expert = [sum(p[0].numel() for p in expert_tensors(m)) for m in layers]
    scores = specialization_scores(domain_counts(subj, base_model, train[:64], label, batch_size))
    chosen = select_experts(scores, per_expert, budget * total)
    base = validation_losses(subj, base_model, val, batch_size)
    del base_model
    sizes = [len(c) for c in chosen]
    plans = {"dbes": chosen, "random": random_selection(sizes, E, seed), "all": None}
    runs = []
    for name in select:
        m = subj.load()
        trained = apply_selection(m, plans[name])
        wall = finetune(subj, m, train, label, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        after = validation_losses(subj, m, val, batch_size)
        others = [after[d] - base[d] for d in after if d != domain]
        runs.append(
            {
                "select": name,
                "experts": plans[name],
                "trained_params": trained,
                "trained_fraction": trained / total,
                "wall_s": wall,
                "val_loss": after,
                "target_change": after[domain] - base[domain],
                "others_change": float(np.mean(others)) if others else 0.0,
            }
        )
        if progress:
            print(f"specialize {name}: {format_run(runs[-1], domain)}", flush=True)
        del m
    result = {
        "model": str(model),
        "domain": domain,
        "budget": budget,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": S,
        "total_params": total,
        "scores_LE": scores.tolist(),
        "selected": chosen,
        "base": base,
        "runs": runs,
    }
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "specialize.json", result)
        (path / "specialize.md").write_text(format_results(result) + "\n", encoding="utf-8")
    return result


def format_run(run: dict[str, Any], domain: str) -> str:
    return (
        f"trained {run['trained_params']:,} ({run['trained_fraction']:.1%}), "
        f"{run['wall_s']:.1f} s, {domain} {run['target_change']:+.4f}, "
        f"others {run['others_change']:+.4f}"
    )


def format_results(result: dict[str, Any]) -> str:
    """A Markdown table: one row per selection (trained parameters, wall time, the target's
    validation loss and its change, the other domains' mean change)."""
    from moe_kernels.tables import markdown_table

    d = result["domain"]
    header = ["select", "trained params", "share", "wall s", f"{d} val loss", "change", "others"]
    rows = [["base", "0", "0%", "-", f"{result['base'][d]:.4f}", "-", "-"]]
    for r in result["runs"]:
        rows.append(
            [
                r["select"],
                f"{r['trained_params']:,}",
                f"{r['trained_fraction']:.1%}",
                f"{r['wall_s']:.1f}",
                f"{r['val_loss'][d]:.4f}",
                f"{r['target_change']:+.4f}",
                f"{r['others_change']:+.4f}",
            ]
        )
    title = (
        f"specialize {d}: budget {result['budget']:.0%} of {result['total_params']:,} params, "
        f"{result['steps']} steps; experts per layer {[len(c) for c in result['selected']]}"
    )
    return title + "\n\n" + markdown_table(header, rows)
