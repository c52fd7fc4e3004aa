"""Specialization and utilization over training, from the evaluations inside each run
(docs/RESULTS.md, question 1: training length).

    python docs/results/trajectory.py RUN_DIR... [--label NAME=LABEL ...]

Runs are grouped by directory name without ``-seedN``. Per group one Markdown row: the
specialization score (raw, not chance-corrected: the permutation null and the floor are only
computed at the end) at step 0 (``evaluation.json``) and at every ``--eval-every`` evaluation
(``metrics.jsonl``), the validation utilization at each evaluation, and at the end the
permutation null and the representation floor (raw), mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tables import by_group, print_table

from moe_testbed.evaluation import read_evaluation
from moe_testbed.rundir import read_metrics


def run_row(run_dir: Path) -> dict[str, float]:
    ev = read_evaluation(run_dir) or {}
    m = ev.get("metrics", {}).get("specialization_score", {})
    row = {"spec@0": m.get("step0"), "null": m.get("null_mean"), "floor": m.get("floor")}
    for r in read_metrics(run_dir):
        if "val/all/specialization_score" in r:
            row[f"spec@{r['step']}"] = r["val/all/specialization_score"]
            row[f"util@{r['step']}"] = r["val/all/utilization"]
    return {k: float(v) for k, v in row.items() if v is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--label", action="append", default=[], metavar="NAME=LABEL")
    args = p.parse_args()
    labels = dict(s.split("=", 1) for s in args.label)
    groups = by_group(args.run_dirs, labels, run_row)
    keys = sorted(
        {k for rows in groups.values() for r in rows for k in r if "@" in k},
        key=lambda k: (k.split("@")[0] != "spec", int(k.split("@")[1])),
    )
    columns = keys + ["null", "floor"]
    head = [k.replace("spec@", "spec step ").replace("util@", "util step ") for k in columns]
    print_table(head, columns, groups)


if __name__ == "__main__":
    main()
