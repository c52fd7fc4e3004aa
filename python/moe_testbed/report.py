"""Reports of one run and comparisons across runs, from run directories (``moe_testbed.rundir``).

``make_report(run_dir)`` writes into ``run_dir/report/``:

* ``loss.png``: training loss and validation loss (overall and per domain) over steps;
* ``heatmap_layer{l}.png``: per layer, the final evaluation's domain x expert routing shares
  (each row sums to 1) with experts ordered by the matched reference groups;
* ``routing_over_training.png``: utilization, MaxVio and specialization score over steps;
* ``bias_drift.png`` (when counts carry ``bias_LE``): spread of the aux-free bias per layer
  over steps and the final bias per expert;
* ``report.html`` (self-contained: images embedded as base64, metric tables, the config) and
  ``summary.md``; both include ``RUN_DIR/verdict.md`` when present (``moe-testbed analyze``'s
  paradigm verdict).

Metrics computed from the counts files use ``metrics.summarize`` with scope ``"eval"``: the
counts of one evaluation pass, not of a training batch.

``compare(run_dirs, out_dir)`` writes ``compare.md``, ``compare.html`` (final metrics, mean ±
sample std and n over the seeds of runs whose configs differ only in the seed and that reached
the same step; other runs in rows of their own, with a note where they look alike) and overlaid
curves ``compare_loss.png``, ``compare_utilization.png``, ``compare_specialization.png`` (mean
line and ±std band per row).

A run with nothing to report (no metric record and no counts: an empty directory, or a run
stopped before its first log step) is an error for both, not an empty report.

The figures come from :mod:`moe_testbed.plots`; metric names are read with
:mod:`moe_testbed.logging`. The command line (``moe-testbed report`` / ``compare``) is in
:mod:`moe_testbed.cli`.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_kernels.tables import format_value, markdown_table
from moe_testbed import chance_report, metrics, plots
from moe_testbed import logging as names
from moe_testbed.evaluation import read_evaluation
from moe_testbed.rundir import RunDir, atomic_write_bytes, last_values
from moe_testbed.runstart import previous_runs

__all__ = ["make_report", "compare", "counts_summary"]

EVAL_SCOPE = names.EVAL
_LOSS, _VAL_LOSS = names.name("loss"), names.name("loss", split="val")
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


def _layer_means(summary: dict[str, float]) -> dict[str, float]:
    """The mean-over-layers values of requested counts in a summary: column name -> value."""
    out = {}
    for key, value in summary.items():
        parsed = names.parse(key)
        if parsed.layer == names.ALL and not parsed.kept:
            out[parsed.column] = value
    return out


def _counts_series(rd: RunDir) -> dict[str, tuple[list, list]]:
    """Layer-mean metrics of every counts file: metric name -> (steps, values)."""
    series: dict[str, tuple[list, list]] = {}
    for step in rd.list_counts():
        for key, value in counts_summary(rd, step).items():
            parsed = names.parse(key)
            if parsed.layer == names.ALL and not parsed.kept:
                steps, values = series.setdefault(parsed.metric, ([], []))
                steps.append(step)
                values.append(value)
    return series


def _run_label(rd: RunDir, config: dict[str, Any]) -> str:
    return str(config.get("name") or rd.path.resolve().name)


def _nothing_to_report(rd: RunDir) -> str:
    earlier = [p.name for p in previous_runs(rd)]
    return (
        f"{rd.path}: nothing to report: no metric records and no evaluation counts (a run that "
        "has not logged its first step yet, or not a run directory)"
        + (f"; earlier runs set aside here: {', '.join(earlier)}" if earlier else "")
    )


def _reached_step(rd: RunDir, records: list[dict[str, Any]]) -> int:
    """The last step a run logged or evaluated (0 when it has neither)."""
    return max([int(r["step"]) for r in records] + rd.list_counts(), default=0)


# ----------------------------------------------------------------------------- tables


def _fmt(value: float) -> str:
    return format_value(float(value))


def _layer_table(summary: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Rows layer0.., all; columns the metrics in ``_TABLE_ORDER`` (+ others) present."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        parsed = names.parse(key)
        rows.setdefault(parsed.where, {})[parsed.column] = value
    columns = list(next(iter(rows.values())).keys()) if rows else []
    rank = {m: i for i, m in enumerate(_TABLE_ORDER)}
    columns.sort(key=lambda c: (names.parse(c).kept, rank.get(names.parse(c).metric, 99), c))
    body = [[where] + [_fmt(rows[where][c]) for c in columns] for where in rows]
    return ["layer"] + columns, body


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
    Raises: FileNotFoundError if ``run_dir`` does not exist; ValueError on corrupt metrics or
    counts, and for a run with nothing to report (no metric record, no counts).
    """
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise FileNotFoundError(f"run directory not found: {rd.path}")
    config, records, steps = rd.read_config(), rd.read_metrics(), rd.list_counts()
    if not records and not steps:
        raise ValueError(_nothing_to_report(rd))
    title = _run_label(rd, config)
    out = rd.report_dir
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = [plots.plot_loss(records, out / "loss.png", title)]
    final_summary: dict[str, float] = {}
    if steps:
        final = rd.load_counts(steps[-1])
        requested = final["requested_LDE"]
        domains = final.get("domains") or [f"domain {d}" for d in range(requested.shape[1])]
        for layer in range(requested.shape[0]):
            path = out / f"heatmap_layer{layer}.png"
            written.append(plots.plot_heatmap(requested[layer], domains, layer, steps[-1], path))
        final_summary = counts_summary(rd, steps[-1])
    written.append(
        plots.plot_routing(records, _counts_series(rd), out / "routing_over_training.png", title)
    )
    written.append(plots.plot_bias(rd, out / "bias_drift.png", title))
    images = [p for p in written if p is not None]

    logged = {k: v for k, v in last_values(records).items() if not names.is_layer_value(k)}
    logged_rows = [[k, _fmt(v)] for k, v in logged.items()]
    layer_header, layer_body = _layer_table(final_summary)
    config_text = json.dumps(config, indent=2, sort_keys=True)
    counts_note = f"final evaluation counts, step {steps[-1]}" if steps else "no counts files"

    sections = [
        f"<p>Run directory: <code>{html.escape(str(rd.path.resolve()))}</code>; "
        f"{len(records)} metric records; {html.escape(counts_note)}.</p>",
        "<h2>Final logged values</h2>" + _html_table(["metric", "value"], logged_rows),
    ]
    ev = read_evaluation(rd.path)
    if ev:
        sections.append(
            f"<h2>Against chance</h2><p>{html.escape(chance_report.caption(ev))}</p>"
            + _html_table(chance_report.HEADER, chance_report.rows(ev))
        )
    if final_summary:
        sections.append(
            f"<h2>Routing metrics per layer ({html.escape(counts_note)}, scope {EVAL_SCOPE})</h2>"
            + _html_table(layer_header, layer_body)
        )
    verdict_path = rd.path / "verdict.md"
    verdict = verdict_path.read_text(encoding="utf-8") if verdict_path.exists() else ""
    if verdict:
        sections.append(f"<h2>Paradigm verdict</h2><pre>{html.escape(verdict)}</pre>")
    sections.append("<h2>Plots</h2>" + "".join(_img_tag(p) for p in images))
    sections.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    html_path = out / "report.html"
    atomic_write_bytes(html_path, _html_page(f"MoE routing report: {title}", sections).encode())

    md = [f"# MoE routing report: {title}\n", f"Run directory: `{rd.path.resolve()}`  \n"]
    md.append(f"{len(records)} metric records; {counts_note}.\n\n## Final logged values\n\n")
    md.append(markdown_table(["metric", "value"], logged_rows) + "\n")
    if ev:
        md.append(f"\n## Against chance\n\n{chance_report.caption(ev)}\n\n")
        md.append(markdown_table(chance_report.HEADER, chance_report.rows(ev)) + "\n")
    if final_summary:
        md.append(f"\n## Routing metrics per layer ({counts_note}, scope {EVAL_SCOPE})\n\n")
        md.append(markdown_table(layer_header, layer_body) + "\n")
    if verdict:
        md.append("\n#" + verdict)  # its "# Paradigm verdict" becomes a section
    md.append("\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images))
    md_path = out / "summary.md"
    atomic_write_bytes(md_path, "".join(md).encode())
    return images + [html_path, md_path]


# ----------------------------------------------------------------------------- compare


# Fields that cannot change any result: runs differing only in these (and the seed) are seeds.
_OUTPUT_ONLY = {"name", "run_dir", "out_dir", "output_dir"}
_OUTPUT_ONLY_TRAIN = {"progress", "tensorboard"}


def _without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the seed (``seed`` at the top level or in ``train``), the run name,
    output paths and display settings. Other seeds (a data seed) stay: they must match."""
    out = {k: v for k, v in config.items() if k != "seed" and k not in _OUTPUT_ONLY}
    if isinstance(out.get("train"), dict):
        drop = _OUTPUT_ONLY_TRAIN | {"seed"}
        out["train"] = {k: v for k, v in out["train"].items() if k not in drop}
    return out


def _group_label(labels: list[str]) -> str:
    if len(set(labels)) == 1:
        return labels[0]
    stripped = {re.sub(r"[-_ .]?(seed|s)\d+$", "", label) for label in labels}
    return stripped.pop() if len(stripped) == 1 else " / ".join(sorted(set(labels)))


def _final_values(rd: RunDir, records: list[dict[str, Any]]) -> dict[str, float]:
    """Losses from the log plus layer-mean routing metrics of the final counts (requested
    selections; ``drop_rate`` stands for capacity)."""
    logged = last_values(records)
    values = {k: v for k, v in logged.items() if names.is_loss(k)}
    steps = rd.list_counts()
    if steps:
        values.update(_layer_means(counts_summary(rd, steps[-1])))
    else:
        for key, parsed in names.parse_keys(logged):
            if parsed.split is None and parsed.layer == names.ALL:
                values[parsed.column] = logged[key]
    return values


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return _fmt(values[0])
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    return f"{_fmt(mean)} ± {_fmt(std)} (n={len(values)})"


def _column_key(name: str) -> tuple:
    parsed = names.parse(name)
    if name == _VAL_LOSS:
        return (0, name)
    if parsed.split == "val":
        return (1, name)
    if name == _LOSS:
        return (2, name)
    rank = {m: i for i, m in enumerate(_TABLE_ORDER)}
    return (3, parsed.kept, rank.get(parsed.metric, 99), name)


def _curves(rd: RunDir, records: list[dict[str, Any]]) -> dict[str, tuple[list, list]]:
    curves: dict[str, tuple[list, list]] = {}
    for key in (_VAL_LOSS, _LOSS):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            curves[key] = tuple(map(list, zip(*points)))
    counted = _counts_series(rd)
    for metric in ("utilization", "specialization_score"):
        if metric in counted:
            curves[metric] = counted[metric]
        elif logged := names.series(records, metric):
            curves[metric] = logged[sorted(logged)[0]]
    return curves


def _seed_groups(runs: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], list[str]]:
    """Runs -> groups of seeds (configs equal once the seed is removed, and the same final
    step) and notes on runs that look alike but are listed apart."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    notes = []
    for run in runs:
        if run["config"]:
            key = json.dumps(_without_seed(run["config"]), sort_keys=True, default=str)
        else:
            key = f"no config: {run['path']}"
            notes.append(f"{run['label']} has no config.json, so it is not averaged with others.")
        by_config.setdefault(key, []).append(run)
    groups = []
    for same in by_config.values():
        by_step: dict[int, list[dict[str, Any]]] = {}
        for run in same:
            by_step.setdefault(run["step"], []).append(run)
        if len(by_step) > 1:
            parts = "; ".join(
                f"step {step}: {', '.join(r['label'] for r in rs)}"
                for step, rs in sorted(by_step.items())
            )
            notes.append(
                f"Same config except the seed, but stopped at different steps ({parts}): "
                "listed apart, not averaged."
            )
        groups.extend(by_step.values())
    return groups, notes


def compare(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Final-metric table (mean ± std and n over seeds) and overlaid curves of several runs.

    Runs form one row (as seeds) only when their configs are equal once the seed, names, output
    paths and display settings are removed and they reached the same step; runs that differ
    only in the seed but reached different steps are listed apart with a note. The row label is the
    runs' ``config["name"]`` (or directory name), minus a seed suffix. Returns the written
    paths: ``compare.md``, ``compare.html`` and the curve PNGs with data.
    Raises: ValueError for an empty ``run_dirs`` or a run with nothing to report;
    FileNotFoundError for a missing directory.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory, got none")
    runs = []
    for run_dir in run_dirs:
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {rd.path}")
        config, records = rd.read_config(), rd.read_metrics()
        step = _reached_step(rd, records)
        if step == 0:
            raise ValueError(_nothing_to_report(rd))
        run = {"label": _run_label(rd, config), "final": _final_values(rd, records)}
        run["evaluation"] = read_evaluation(rd.path)
        run.update(curves=_curves(rd, records), config=config, step=step, path=str(rd.path))
        runs.append(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups, notes = _seed_groups(runs)
    labelled: dict[str, list[dict[str, Any]]] = {}
    for group in groups:
        label = _group_label([r["label"] for r in group])
        while label in labelled:
            label += "'"
        labelled[label] = group

    columns = sorted(
        {c for runs in labelled.values() for r in runs for c in r["final"]}, key=_column_key
    )
    header = ["run", "seeds", "step"] + columns
    body = []
    for label, runs in labelled.items():
        row = [label, str(len(runs)), str(runs[0]["step"])]
        for c in columns:
            values = [r["final"][c] for r in runs if c in r["final"]]
            row.append(_mean_std(values) if values else "—")
        body.append(row)
    note = (
        "Mean ± sample std (n) over seeds: runs whose configs differ only in the seed and that "
        "reached the same step."
    )
    md_path = out / "compare.md"
    md_notes = "".join(f"\n- {n}" for n in notes)
    chance_header, chance_body = chance_report.compare_table(labelled)
    chance_md = (
        "\n## Against chance (evaluation.json)\n\n" + markdown_table(chance_header, chance_body)
        if chance_body
        else ""
    )
    atomic_write_bytes(
        md_path,
        (
            f"# Run comparison\n\n{note}\n\n"
            + markdown_table(header, body)
            + "\n"
            + md_notes
            + chance_md
        ).encode(),
    )
    paths = [md_path]
    curves = [
        (_VAL_LOSS, "compare_loss.png", "validation loss (nats/token)", "Validation loss"),
        ("utilization", "compare_utilization.png", "utilization", "Utilization (eval counts)"),
        (
            "specialization_score",
            "compare_specialization.png",
            "specialization score",
            "Specialization score (eval counts)",
        ),
    ]
    images = []
    chance_png = plots.plot_chance(
        {
            label: [chance_report.corrected(r.get("evaluation")) for r in runs]
            for label, runs in labelled.items()
        },
        out / "compare_chance.png",
    )
    if chance_png is not None:
        images.append(chance_png)
    for curve, name, ylabel, title in curves:
        if curve == _VAL_LOSS and not any(
            _VAL_LOSS in r["curves"] for g in labelled.values() for r in g
        ):
            curve, ylabel, title = "loss", "training loss (nats/token)", "Training loss"
        path = plots.plot_overlay(
            labelled, curve, out / name, ylabel, title + " (mean ± std over seeds)"
        )
        if path is not None:
            images.append(path)
    page = _html_page(
        "Run comparison",
        [f"<p>{html.escape(note)}</p>", _html_table(header, body)]
        + [f"<p>{html.escape(n)}</p>" for n in notes]
        + (
            ["<h2>Against chance</h2>" + _html_table(chance_header, chance_body)]
            if chance_body
            else []
        )
        + [_img_tag(p) for p in images],
    )
    html_path = out / "compare.html"
    atomic_write_bytes(html_path, page.encode("utf-8"))
    return paths + [html_path] + images
