"""benchmarks/gpu_check.sh --smoke: the one-call GPU verification's stages on CPU, as CI runs
them, and the time budgets written in the script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("env", "build", "selfcheck", "tests", "memcheck", "racecheck", "ops", "layer")


def budgets() -> dict[str, int]:
    text = SCRIPT.read_text()
    return {m[0].lower(): int(m[1]) for m in re.findall(r"^BUDGET_(\w+)=(\d+)$", text, re.M)}


def test_budgets_fit_nine_minutes():
    b = budgets()
    assert set(b) == set(STAGES)
    assert sum(b.values()) <= 9 * 60 - 20  # room for the summary and process starts


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_smoke_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + (out / "log.txt").read_text()[-3000:]
    assert proc.stdout.strip().endswith(summary.strip().splitlines()[-1])
    status = {}
    for m in re.finditer(r"^(\w+) +(\d+) +(\d+)  (.*)$", summary, re.M):
        status[m[1]] = (int(m[2]), m[4])
    assert set(status) == set(STAGES)
    for stage in ("build", "tests", "memcheck", "racecheck"):
        assert status[stage][1].startswith("skipped: no GPU")
    for stage in ("env", "selfcheck", "ops", "layer"):
        assert status[stage][1] == "ok"
    assert {k: v[0] for k, v in status.items()} == budgets()
    assert "verdict: PASSED" in summary
    m = re.search(r"selfcheck: (\d+) of (\d+) checks passed on cpu", summary)
    assert m and m[1] == m[2] and int(m[2]) > 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert {"summary.txt", "log.txt", "selfcheck.json", "ops_gpu.json", "layer_gpu.json"} <= set(
        files
    )
