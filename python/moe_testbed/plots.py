"""The figures of the reports (``moe_testbed.report``) and of the TensorBoard sink.

Plots use matplotlib ``Figure`` objects directly (Agg canvas): no pyplot, no global backend.
Each ``plot_*`` function writes a PNG and returns its path, or None when there is nothing to
draw. Legend: L MoE layers, D domains, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moe_testbed import logging as names
from moe_testbed import metrics
from moe_testbed.rundir import RunDir

ROUTING_CURVES = (
    ("utilization", "Utilization (1 = uniform load)"),
    ("max_violation", "MaxVio (0 = uniform load)"),
    ("specialization_score", "Specialization score (1 = reference router)"),
)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered by the Agg canvas: uint8 array (height, width, 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Training loss and validation loss (overall and per domain) over steps."""
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    overall = names.name("loss", split="val")
    domains = names.val_domains(records)
    val_keys = [overall] + [names.name("loss", split="val", domain=d) for d in domains]
    if not train and not any(k in r for r in records for k in val_keys):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color="0.6", lw=1, alpha=0.8, label="train loss")
    for key in val_keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            style = {"lw": 2.5, "color": "k"} if key == overall else {"lw": 1.5, "marker": "o"}
            domain = names.parse(key).domain
            label = "validation (all)" if key == overall else f"validation: {domain}"
            ax.plot(*zip(*points), ms=3, label=label, **style)
    ax.set(title=f"{title}: loss", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def expert_order(counts_DE: np.ndarray) -> tuple[list[int], list[int]]:
    """Expert order for a heatmap and the group boundaries (positions) between domains."""
    num_domains, num_experts = counts_DE.shape
    if num_experts % num_domains == 0:
        groups = metrics.matched_groups(counts_DE)
        order = [e for g in groups for e in g]
        bounds = list(np.cumsum([len(g) for g in groups])[:-1])
        return order, bounds
    share = counts_DE / np.maximum(counts_DE.sum(axis=0, keepdims=True), 1)
    order = sorted(
        range(num_experts), key=lambda e: (int(share[:, e].argmax()), -share[:, e].max())
    )
    return order, []


def heatmap_figure(counts_DE: np.ndarray, domains: list[str], layer: int, step: int) -> Figure:
    """One layer's domain x expert routing shares (each row sums to 1), experts ordered by the
    matched reference groups. ``counts_DE`` (D, E) selections, not all zero."""
    rows = counts_DE.sum(axis=1, keepdims=True)
    q = counts_DE / np.maximum(rows, 1)
    order, bounds = expert_order(counts_DE)
    num_domains, num_experts = counts_DE.shape
    fig = Figure(
        figsize=(max(6.0, 0.28 * num_experts + 3), max(3.0, 0.45 * num_domains + 2)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(q[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=max(q.max(), 1e-9))
    fig.colorbar(image, ax=ax, label="share of the domain's top-k selections")
    stride = max(1, num_experts // 32)
    ax.set_xticks(
        range(0, num_experts, stride), [str(order[i]) for i in range(0, num_experts, stride)]
    )
    ax.set_yticks(range(num_domains), domains)
    for b in bounds:
        ax.axvline(b - 0.5, color="w", lw=1.5)
    parts = []
    if num_domains >= 2 and num_experts % num_domains == 0:
        parts.append(f"specialization score {metrics.specialization_score(counts_DE):.3f}")
    parts.append(f"utilization {metrics.utilization(counts_DE):.3f}")
    ax.set(
        title=f"Layer {layer}, step {step}: routing by domain\n" + ", ".join(parts),
        xlabel="expert id (ordered by matched reference group)",
        ylabel="domain",
    )
    return fig


def plot_heatmap(
    counts_DE: np.ndarray, domains: list[str], layer: int, step: int, path: Path
) -> Path:
    """:func:`heatmap_figure` as a PNG."""
    return _save(heatmap_figure(counts_DE, domains, layer, step), path)


def plot_routing(records, counts_series, path: Path, title: str) -> Path | None:
    """Utilization, MaxVio and specialization score over steps: every logged layer mean and
    the evaluation counts' values (``counts_series``: metric -> (steps, values))."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    drew = False
    for i, (metric, label) in enumerate(ROUTING_CURVES):
        ax = fig.add_subplot(1, 3, i + 1)
        for key, (steps, values) in sorted(names.series(records, metric).items()):
            ax.plot(steps, values, lw=1.2, label=f"logged {key}")
            drew = True
        if metric in counts_series:
            ax.plot(*counts_series[metric], "k-o", ms=3, lw=2, label="evaluation counts")
            drew = True
        ax.set(title=label, xlabel="optimizer step", ylabel=metric.replace("_", " "))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: routing over training (mean over layers)")
    return _save(fig, path) if drew else None


def plot_bias(rd: RunDir, path: Path, title: str) -> Path | None:
    """Spread of the aux-free bias per layer over steps and the final bias per expert."""
    steps, spreads, final = [], [], None
    for step in rd.list_counts():
        bias = rd.load_counts(step).get("bias_LE")
        if bias is not None:
            steps.append(step)
            spreads.append(bias.std(axis=1))
            final = bias
    if final is None:
        return None
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    spreads_SL = np.asarray(spreads)
    for layer in range(spreads_SL.shape[1]):
        ax.plot(steps, spreads_SL[:, layer], marker="o", ms=3, label=f"layer {layer}")
    ax.set(
        title="Bias spread over training", xlabel="optimizer step", ylabel="std over experts of b"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    limit = max(float(np.abs(final).max()), 1e-9)
    image = ax.imshow(final, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax, label="bias b (selection only)")
    ax.set_yticks(range(final.shape[0]))
    ax.set_xticks(range(0, final.shape[1], max(1, final.shape[1] // 32)))
    ax.set(title=f"Final bias (step {steps[-1]})", xlabel="expert id", ylabel="layer")
    fig.suptitle(f"{title}: aux-loss-free bias drift")
    return _save(fig, path)


def plot_overlay(groups, curve: str, path: Path, ylabel: str, title: str) -> Path | None:
    """Mean ± sample std over seeds of one curve per group of runs (``groups``: label -> runs,
    each with ``curves[curve] = (steps, values)``); only the steps every run has."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    drew = False
    for label, runs in groups.items():
        series = [r["curves"][curve] for r in runs if curve in r["curves"]]
        if not series:
            continue
        common = sorted(set.intersection(*(set(s[0]) for s in series)))
        if not common:
            continue
        matrix = np.array([[dict(zip(*s))[t] for t in common] for s in series])
        mean = matrix.mean(axis=0)
        (line,) = ax.plot(common, mean, lw=2, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            std = matrix.std(axis=0, ddof=1)
            ax.fill_between(common, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drew = True
    if not drew:
        return None
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_chance(groups: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Chance-corrected specialization per group of seeds: a bar at the mean with the sample
    std as error bar, the step-0 value (o) and the representation floor (|), both corrected.
    ``groups``: label -> one dict per seed with ``corrected``, ``step0`` and ``floor`` (any of
    them may be missing). None when no group has a corrected score."""
    rows = [(k, v) for k, v in groups.items() if any("corrected" in r for r in v)]
    if not rows:
        return None

    def stat(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs if key in r and np.isfinite(r[key])]
        if not vals:
            return float("nan"), 0.0
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0

    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))[::-1]
    mean_sd = [stat(r, "corrected") for _, r in rows]
    ax.barh(
        y,
        [m for m, _ in mean_sd],
        xerr=[s for _, s in mean_sd],
        color="#7aa6c2",
        capsize=3,
        label="trained (mean ± std over seeds)",
    )
    ax.plot([stat(r, "step0")[0] for _, r in rows], y, "o", color="black", label="step 0")
    ax.plot(
        [stat(r, "floor")[0] for _, r in rows],
        y,
        "|",
        color="#c0392b",
        markersize=14,
        markeredgewidth=2,
        label="representation floor",
    )
    ax.set_yticks(y, [f"{k} (n={len(v)})" for k, v in rows], fontsize=8)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("chance-corrected specialization score (0 = chance, 1 = reference)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    return _save(fig, path)
