"""Reports of one run and comparisons across runs, from run directories (``moe_testbed.rundir``).

``make_report(run_dir)`` writes into ``run_dir/report/``:

* ``loss.png``: training loss and validation loss (overall and per domain) over steps;
* ``heatmap_layer{l}.png``: per layer, the final evaluation's domain x expert routing shares
  (each row sums to 1) with experts ordered by the matched reference groups;
* ``routing_over_training.png``: utilization, MaxVio and specialization score over steps;
* ``bias_drift.png`` (when counts carry ``bias_LE``): spread of the aux-free bias per layer
  over steps and the final bias per expert;
* ``report.html`` (self-contained: images embedded as base64, metric tables, the config) and
  ``summary.md``.

Metrics computed from the counts files use ``metrics.summarize`` with scope ``"eval"``: the
counts of one evaluation pass, not of a training batch.

``compare(run_dirs, out_dir)`` writes ``compare.md``, ``compare.html`` (final metrics, mean ±
sample std over the seeds of runs whose configs differ only in seed) and overlaid curves
``compare_loss.png``, ``compare_utilization.png``, ``compare_specialization.png``.

Plots use matplotlib ``Figure`` objects directly (Agg canvas): no pyplot, no global backend.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moe_testbed import metrics
from moe_testbed.rundir import RunDir, last_values

__all__ = ["make_report", "compare", "add_report_subcommands", "counts_summary"]

EVAL_SCOPE = "eval"
_ROUTING_CURVES = (
    ("utilization", "Utilization (1 = uniform load)"),
    ("max_violation", "MaxVio (0 = uniform load)"),
    ("specialization_score", "Specialization score (1 = reference router)"),
)
_TABLE_ORDER = (
    "utilization",
    "load_entropy",
    "max_violation",
    "load_cv",
    "dead_experts",
    "drop_rate",
    "purity",
    "nmi",
    "conditional_entropy",
    "reference_agreement",
    "specialization_score",
    "routing_specialization",
    "normalized_effective_rank",
    "domain_isolation",
)


# ----------------------------------------------------------------------------- data access


def counts_summary(rd: RunDir, step: int) -> dict[str, float]:
    """``metrics.summarize`` of one counts file (scope ``"eval"``; kept metrics if any drops)."""
    c = rd.load_counts(step)
    requested, kept = c["requested_LDE"], c["kept_LDE"]
    return metrics.summarize(
        requested,
        kept_LDE=kept if np.any(kept != requested) else None,
        groups=c.get("groups") or None,
        scope=EVAL_SCOPE,
    )


def _metric_name(key: str) -> str:
    """``"val/layer2/max_violation@eval"`` -> ``"max_violation"``."""
    return key.rsplit("/", 1)[-1].split("@", 1)[0]


def _jsonl_series(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[list, list]]:
    """Logged layer-mean series of ``metric``: key -> (steps, values)."""
    pattern = re.compile(rf"(^|/)all/{re.escape(metric)}(@[^/]+)?$")
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for key, value in r.items():
            if pattern.search(key) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(r["step"])
                values.append(float(value))
    return series


def _counts_series(rd: RunDir) -> dict[str, tuple[list, list]]:
    """Layer-mean metrics of every counts file: metric name -> (steps, values)."""
    series: dict[str, tuple[list, list]] = {}
    for step in rd.list_counts():
        for key, value in counts_summary(rd, step).items():
            if key.startswith("all/") and not _metric_name(key).startswith("kept_"):
                steps, values = series.setdefault(_metric_name(key), ([], []))
                steps.append(step)
                values.append(value)
    return series


def _val_domains(records: list[dict[str, Any]]) -> list[str]:
    names = {m.group(1) for r in records for k in r if (m := re.match(r"^val/(.+)/loss$", k))}
    return sorted(names)


def _run_label(rd: RunDir, config: dict[str, Any]) -> str:
    return str(config.get("name") or rd.path.resolve().name)


# ----------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val_keys = ["val/loss"] + [f"val/{d}/loss" for d in _val_domains(records)]
    if not train and not any(k in r for r in records for k in val_keys):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color="0.6", lw=1, alpha=0.8, label="train loss")
    for key in val_keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            style = {"lw": 2.5, "color": "k"} if key == "val/loss" else {"lw": 1.5, "marker": "o"}
            label = "validation (all)" if key == "val/loss" else f"validation: {key[4:-5]}"
            ax.plot(*zip(*points), ms=3, label=label, **style)
    ax.set(title=f"{title}: loss", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _expert_order(counts_DE: np.ndarray) -> tuple[list[int], list[int]]:
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


def _plot_heatmap(counts_DE: np.ndarray, domains: list[str], layer: int, step: int, path: Path):
    rows = counts_DE.sum(axis=1, keepdims=True)
    q = counts_DE / np.maximum(rows, 1)
    order, bounds = _expert_order(counts_DE)
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
    return _save(fig, path)


def _plot_routing(records, counts_series, path: Path, title: str) -> Path | None:
    fig = Figure(figsize=(13, 4), layout="constrained")
    drew = False
    for i, (metric, label) in enumerate(_ROUTING_CURVES):
        ax = fig.add_subplot(1, 3, i + 1)
        for key, (steps, values) in sorted(_jsonl_series(records, metric).items()):
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


def _plot_bias(rd: RunDir, path: Path, title: str) -> Path | None:
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


# ----------------------------------------------------------------------------- tables


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def _layer_table(summary: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Rows layer0.., all; columns the metrics in ``_TABLE_ORDER`` (+ others) present."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        scope, name = key.split("/", 1)
        rows.setdefault(scope, {})[name] = value
    names = list(next(iter(rows.values())).keys()) if rows else []
    rank = {m: i for i, m in enumerate(_TABLE_ORDER)}
    names.sort(key=lambda n: (n.startswith("kept_"), rank.get(_metric_name(n), 99), n))
    body = [[scope] + [_fmt(rows[scope][n]) for n in names] for scope in rows]
    return ["layer"] + names, body


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
    "th{background:#eee}td:first-child{text-align:left}img{max-width:100%;margin:.5em 0}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def _html_page(title: str, sections: list[str]) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(sections)
        + "</body></html>\n"
    )


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


# ----------------------------------------------------------------------------- report


def make_report(run_dir: str | os.PathLike) -> list[Path]:
    """Write plots, ``report.html`` and ``summary.md`` into ``run_dir/report/``.

    Returns the written paths (plots for which there is no data are skipped).
    Raises: FileNotFoundError if ``run_dir`` does not exist; ValueError on corrupt metrics.
    """
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise FileNotFoundError(f"run directory not found: {rd.path}")
    config, records, steps = rd.read_config(), rd.read_metrics(), rd.list_counts()
    title = _run_label(rd, config)
    out = rd.report_dir
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path | None] = [_plot_loss(records, out / "loss.png", title)]
    final_summary: dict[str, float] = {}
    if steps:
        final = rd.load_counts(steps[-1])
        requested = final["requested_LDE"]
        domains = final.get("domains") or [f"domain {d}" for d in range(requested.shape[1])]
        for layer in range(requested.shape[0]):
            path = out / f"heatmap_layer{layer}.png"
            plots.append(_plot_heatmap(requested[layer], domains, layer, steps[-1], path))
        final_summary = counts_summary(rd, steps[-1])
    plots.append(
        _plot_routing(records, _counts_series(rd), out / "routing_over_training.png", title)
    )
    plots.append(_plot_bias(rd, out / "bias_drift.png", title))
    images = [p for p in plots if p is not None]

    logged = {k: v for k, v in last_values(records).items() if not k.startswith("layer")}
    logged = {k: v for k, v in logged.items() if "/layer" not in k}
    logged_rows = [[k, _fmt(v)] for k, v in logged.items()]
    layer_header, layer_body = _layer_table(final_summary)
    config_text = json.dumps(config, indent=2, sort_keys=True)
    counts_note = f"final evaluation counts, step {steps[-1]}" if steps else "no counts files"

    sections = [
        f"<p>Run directory: <code>{html.escape(str(rd.path.resolve()))}</code>; "
        f"{len(records)} metric records; {html.escape(counts_note)}.</p>",
        "<h2>Final logged values</h2>" + _html_table(["metric", "value"], logged_rows),
    ]
    if final_summary:
        sections.append(
            f"<h2>Routing metrics per layer ({html.escape(counts_note)}, scope {EVAL_SCOPE})</h2>"
            + _html_table(layer_header, layer_body)
        )
    sections.append("<h2>Plots</h2>" + "".join(_img_tag(p) for p in images))
    sections.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    html_path = out / "report.html"
    html_path.write_text(_html_page(f"MoE routing report: {title}", sections), encoding="utf-8")

    md = [f"# MoE routing report: {title}\n", f"Run directory: `{rd.path.resolve()}`  \n"]
    md.append(f"{len(records)} metric records; {counts_note}.\n\n## Final logged values\n\n")
    md.append(_markdown_table(["metric", "value"], logged_rows))
    if final_summary:
        md.append(f"\n## Routing metrics per layer ({counts_note}, scope {EVAL_SCOPE})\n\n")
        md.append(_markdown_table(layer_header, layer_body))
    md.append("\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images))
    md_path = out / "summary.md"
    md_path.write_text("".join(md), encoding="utf-8")
    return images + [html_path, md_path]


# ----------------------------------------------------------------------------- compare


def _without_seed(obj: Any) -> Any:
    """The config with every ``seed``/``*_seed`` key and the run name/output paths removed."""
    drop = {"name", "run_dir", "out_dir", "output_dir"}
    if isinstance(obj, dict):
        return {
            k: _without_seed(v)
            for k, v in obj.items()
            if k != "seed" and not k.endswith("_seed") and k not in drop
        }
    if isinstance(obj, list):
        return [_without_seed(v) for v in obj]
    return obj


def _group_label(labels: list[str]) -> str:
    if len(set(labels)) == 1:
        return labels[0]
    stripped = {re.sub(r"[-_ .]?(seed|s)\d+$", "", label) for label in labels}
    return stripped.pop() if len(stripped) == 1 else " / ".join(sorted(set(labels)))


def _final_values(rd: RunDir, records: list[dict[str, Any]]) -> dict[str, float]:
    """Losses from the log plus layer-mean routing metrics of the final counts (requested
    selections; ``drop_rate`` stands for capacity)."""
    logged = last_values(records)
    values = {k: v for k, v in logged.items() if k == "loss" or re.match(r"^val/(.+/)?loss$", k)}
    steps = rd.list_counts()
    if steps:
        summary = counts_summary(rd, steps[-1])
        values.update(
            {
                k[len("all/") :]: v
                for k, v in summary.items()
                if k.startswith("all/") and not _metric_name(k).startswith("kept_")
            }
        )
    else:
        values.update({k[len("all/") :]: v for k, v in logged.items() if k.startswith("all/")})
    return values


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(float(np.mean(values)))} ± {_fmt(float(np.std(values, ddof=1)))}"


def _column_key(name: str) -> tuple:
    if name == "val/loss":
        return (0, name)
    if name.startswith("val/"):
        return (1, name)
    if name == "loss":
        return (2, name)
    rank = {m: i for i, m in enumerate(_TABLE_ORDER)}
    return (3, name.startswith("kept_"), rank.get(_metric_name(name), 99), name)


def _plot_overlay(groups, curve: str, path: Path, ylabel: str, title: str) -> Path | None:
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


def _curves(rd: RunDir, records: list[dict[str, Any]]) -> dict[str, tuple[list, list]]:
    curves: dict[str, tuple[list, list]] = {}
    for key in ("val/loss", "loss"):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            curves[key] = tuple(map(list, zip(*points)))
    counted = _counts_series(rd)
    for metric in ("utilization", "specialization_score"):
        if metric in counted:
            curves[metric] = counted[metric]
        elif logged := _jsonl_series(records, metric):
            curves[metric] = logged[sorted(logged)[0]]
    return curves


def compare(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Final-metric table (mean ± std over seeds) and overlaid curves of several runs.

    Runs whose configs are equal once seeds, names and output paths are removed form one row;
    the row label is the runs' ``config["name"]`` (or directory name), minus a seed suffix.
    Returns the written paths: ``compare.md``, ``compare.html`` and the curve PNGs with data.
    Raises: ValueError for an empty ``run_dirs``; FileNotFoundError for a missing directory.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory, got none")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for run_dir in run_dirs:
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {rd.path}")
        config, records = rd.read_config(), rd.read_metrics()
        key = json.dumps(_without_seed(config), sort_keys=True, default=str)
        run = {"label": _run_label(rd, config), "final": _final_values(rd, records)}
        run["curves"] = _curves(rd, records)
        groups.setdefault(key, []).append(run)
    labelled: dict[str, list[dict[str, Any]]] = {}
    for runs in groups.values():
        label = _group_label([r["label"] for r in runs])
        while label in labelled:
            label += "'"
        labelled[label] = runs

    columns = sorted(
        {c for runs in labelled.values() for r in runs for c in r["final"]}, key=_column_key
    )
    header = ["run", "seeds"] + columns
    body = []
    for label, runs in labelled.items():
        row = [label, str(len(runs))]
        for c in columns:
            values = [r["final"][c] for r in runs if c in r["final"]]
            row.append(_mean_std(values) if values else "—")
        body.append(row)
    note = "Mean ± sample std over seeds (runs whose configs differ only in seed)."
    md_path = out / "compare.md"
    md_path.write_text(f"# Run comparison\n\n{note}\n\n" + _markdown_table(header, body))
    paths = [md_path]
    plots = [
        ("val/loss", "compare_loss.png", "validation loss (nats/token)", "Validation loss"),
        ("utilization", "compare_utilization.png", "utilization", "Utilization (eval counts)"),
        (
            "specialization_score",
            "compare_specialization.png",
            "specialization score",
            "Specialization score (eval counts)",
        ),
    ]
    images = []
    for curve, name, ylabel, title in plots:
        if curve == "val/loss" and not any(
            "val/loss" in r["curves"] for g in labelled.values() for r in g
        ):
            curve, ylabel, title = "loss", "training loss (nats/token)", "Training loss"
        path = _plot_overlay(
            labelled, curve, out / name, ylabel, title + " (mean ± std over seeds)"
        )
        if path is not None:
            images.append(path)
    page = _html_page(
        "Run comparison",
        [f"<p>{html.escape(note)}</p>", _html_table(header, body)] + [_img_tag(p) for p in images],
    )
    html_path = out / "compare.html"
    html_path.write_text(page, encoding="utf-8")
    return paths + [html_path] + images


# ----------------------------------------------------------------------------- command line


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        paths = make_report(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-testbed report: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    parents = [os.path.dirname(os.path.abspath(d)) for d in args.run_dirs]
    out = args.out or Path(os.path.commonpath(parents)) / "compare"
    try:
        paths = compare(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-testbed compare: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def add_report_subcommands(subparsers: Any) -> None:
    """Register ``report RUN_DIR`` and ``compare RUN_DIR... [--out DIR]``.

    Each parser sets ``func`` (``args.func(args) -> int`` exit code).
    """
    p = subparsers.add_parser("report", help="plots, report.html and summary.md of one run")
    p.add_argument("run_dir", help="run directory (config.json, metrics.jsonl, counts/)")
    p.set_defaults(func=_cmd_report)
    c = subparsers.add_parser("compare", help="final-metric table and curves across runs")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    c.add_argument(
        "--out", default=None, help="output directory (default: <common parent>/compare)"
    )
    c.set_defaults(func=_cmd_compare)
