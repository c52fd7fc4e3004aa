"""The "Against chance" tables of ``report`` and ``compare``, from ``RUN_DIR/evaluation.json``.

One row per specialization metric: the value, its permutation null (mean, 95th percentile), the
chance-corrected score, the step-0 value and the representation floor (``docs/METRICS.md``,
"Specialization against chance"). ``compare`` shows, per group of seeds, mean ± std (n) of the
corrected score, step-0 value and floor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moe_testbed.metrics.chance import CHANCE_METRICS

HEADER = [
    "metric",
    "value",
    "± se",
    "null mean",
    "null p95",
    "corrected",
    "step 0",
    "step 0 corr.",
    "floor",
    "floor corr.",
]
_FIELDS = [
    "value",
    "se",
    "null_mean",
    "null_p95",
    "corrected",
    "step0",
    "step0_corrected",
    "floor",
    "floor_corrected",
]
# What compare shows per group of seeds, as (column, metric, field).
COMPARE_COLUMNS = [
    ("spec", "specialization_score", "value"),
    ("spec null", "specialization_score", "null_mean"),
    ("spec corrected", "specialization_score", "corrected"),
    ("spec step0", "specialization_score", "step0"),
    ("spec floor", "specialization_score", "floor"),
    ("spec floor corr.", "specialization_score", "floor_corrected"),
    ("nmi corrected", "nmi", "corrected"),
    ("purity corrected", "purity", "corrected"),
]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """Table rows (``HEADER``) of one ``evaluation.json``."""
    metrics = evaluation.get("metrics", {})
    return [
        [name] + [_fmt(metrics[name].get(f)) for f in _FIELDS]
        for name in CHANCE_METRICS
        if name in metrics
    ]


def caption(evaluation: dict[str, Any]) -> str:
    """What the table was computed on."""
    return (
        f"step {evaluation.get('step')}, {evaluation.get('windows_per_domain')} validation "
        f"windows per domain ({evaluation.get('eval_tokens')} tokens), "
        f"{evaluation.get('permutations')} label permutations, "
        f"{evaluation.get('floor_draws')} random-router draws for the floor, data seed "
        f"{evaluation.get('data_seed')}; corrected = (s - null) / (1 - null)"
    )


def values(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """``{column: value}`` of ``COMPARE_COLUMNS`` for one run (empty without evaluation)."""
    if not evaluation:
        return {}
    out = {}
    for column, metric, field in COMPARE_COLUMNS:
        v = evaluation.get("metrics", {}).get(metric, {}).get(field)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[column] = float(v)
    return out


def mean_std(vals: list[float]) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} (n={len(vals)})"


def compare_table(groups: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) over labelled groups of runs, each run with an ``"evaluation"`` entry;
    empty rows when no run has one."""
    header = ["run"] + [c for c, _, _ in COMPARE_COLUMNS]
    body = []
    for label, runs in groups.items():
        per_run = [values(r.get("evaluation")) for r in runs]
        if not any(per_run):
            continue
        body.append(
            [label] + [mean_std([v[c] for v in per_run if c in v]) for c, _, _ in COMPARE_COLUMNS]
        )
    return header, body


def corrected(evaluation: dict[str, Any] | None, metric: str = "specialization_score") -> dict:
    """``{"corrected", "step0", "floor"}`` (each chance-corrected) of ``metric`` for one run;
    empty without evaluation."""
    m = (evaluation or {}).get("metrics", {}).get(metric, {})
    out = {}
    for key, field in (
        ("corrected", "corrected"),
        ("step0", "step0_corrected"),
        ("floor", "floor_corrected"),
    ):
        v = m.get(field)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)
    return out
