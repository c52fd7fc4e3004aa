"""The compact tables and figures of docs/RESULTS.md from sweep run directories.

    python docs/results/tables.py OUT.png RUN_DIR... [--label NAME=LABEL ...] [--extra KEY=LABEL]

Runs are grouped by their directory name without the ``-seedN`` suffix (the sweep's naming);
per group it prints one Markdown row of mean ± sample std over seeds: validation loss,
utilization and drop rate of the final evaluation (``metrics.jsonl``), and from
``evaluation.json`` the chance-corrected specialization score, NMI and purity, the step-0
value and the representation floor (both corrected). It writes the chance plot of
``moe_testbed.plots.plot_chance`` to OUT.png.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np

from moe_testbed import chance_report, plots
from moe_testbed.evaluation import read_evaluation
from moe_testbed.rundir import read_metrics

COLUMNS = [
    ("val loss", "loss"),
    ("utilization", "utilization"),
    ("drop rate", "drop"),
    ("spec corrected", "corrected"),
    ("NMI corrected", "nmi"),
    ("purity corrected", "purity"),
    ("spec step 0", "step0"),
    ("spec floor", "floor"),
]


def run_values(run_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """The COLUMNS values of one run, plus the ``extra`` metrics of its last evaluation record
    (``metrics.jsonl``, e.g. ``probe/all/ngram_expertise_n1``) under their own names."""
    ev = read_evaluation(run_dir) or {}
    val = [r for r in read_metrics(run_dir) if "val/loss" in r]
    last = val[-1] if val else {}
    out = {
        **{k: last.get(k) for k in extra},
        "loss": ev.get("val_loss", last.get("val/loss")),
        "utilization": last.get("val/all/utilization"),
        "drop": last.get("val/all/drop_rate"),
        **chance_report.corrected(ev),
    }
    for metric in ("nmi", "purity"):
        v = ev.get("metrics", {}).get(metric, {}).get("corrected")
        out[metric] = v
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def print_by_domain(run_dirs: list[Path], labels: dict[str, str]) -> None:
    """One Markdown row per group: validation loss per domain and their mean, ± std over seeds."""

    def losses(d: Path) -> dict[str, float]:
        ev = read_evaluation(d) or {}
        return dict(ev.get("val_loss_by_domain", {}), mean=ev.get("val_loss", math.nan))

    groups = by_group(run_dirs, labels, losses)
    domains = [k for k in next(iter(groups.values()))[0] if k != "mean"] + ["mean"]
    print_table(domains, domains, groups)


def by_group(run_dirs, labels: dict[str, str], read) -> dict[str, list]:
    """``read(run_dir)`` of every run, grouped by its directory name without ``-seedN`` (the
    sweep's naming), shown as ``labels[name]`` where given; groups in first-seen order."""
    groups: dict[str, list] = {}
    for d in run_dirs:
        name = re.sub(r"-seed\d+$", "", Path(d).name)
        groups.setdefault(labels.get(name, name), []).append(read(d))
    return groups


def print_table(heads: list[str], keys: list[str], groups: dict[str, list[dict]]) -> None:
    """A Markdown table: one row per group, its run count and ``mean_std`` of every key."""
    print("| run | n | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for label, rows in groups.items():
        cells = [mean_std([r[k] for r in rows if k in r]) for k in keys]
        print(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")


def mean_std(vals: list[float], fmt: str = ".3f") -> str:
    """``mean ± sample std`` (the value alone for one, "—" for none)."""
    if not vals:
        return "—"
    sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
    return f"{np.mean(vals):{fmt}}{sd}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("png", type=Path, help="where to write the chance plot")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=LABEL",
        help="show group NAME (directory name without -seedN) as LABEL",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="KEY=LABEL",
        help="one more column: metric KEY of the last evaluation record, headed LABEL",
    )
    p.add_argument(
        "--by-domain",
        action="store_true",
        help="print the validation loss per domain (evaluation.json) instead, and no figure",
    )
    args = p.parse_args()
    if args.by_domain:
        print_by_domain(args.run_dirs, dict(s.split("=", 1) for s in args.label))
        return
    extra = [tuple(s.split("=", 1)) for s in args.extra]
    columns = COLUMNS + [(label, key) for key, label in extra]
    labels = dict(s.split("=", 1) for s in args.label)
    keys = tuple(k for k, _ in extra)
    groups = by_group(args.run_dirs, labels, lambda d: run_values(d, keys))
    print_table([c for c, _ in columns], [k for _, k in columns], groups)
    plots.plot_chance(groups, args.png)


if __name__ == "__main__":
    main()
