"""Faults against real training processes: SIGKILL at random moments and inside checkpoint
writes, then resume; a second writer on a held run directory; --no-resume killed part-way.

Bounded: at most ``MAX_KILLS`` kills and ``BUDGET_S`` seconds of killing per test; the random
moments come from a fixed seed, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAX_KILLS = 3
BUDGET_S = 180.0
# A seconds-long model on synthetic domains: what the run directory does, not what it learns.
SMALL = [
    *("--data-dir", "synthetic", "--vocab-size", "256", "--d-model", "32", "--n-layers", "2"),
    *("--n-heads", "2", "--d-ff-expert", "32", "--seq-len", "16", "--micro-batch-size", "4"),
    *("--eval-tokens", "64", "--eval-batch-size", "4", "--no-progress", "--no-probes"),
    *("--log-every", "2"),
]
RUN = ["--steps", "16", "--eval-every", "8", "--ckpt-every", "4"]
# The same command with every rename onto a checkpoint file slowed down, so that a kill can
# land inside a checkpoint write (the new file complete under its temporary name, or last.pt
# already renamed to previous.pt).
SLOW_CHECKPOINT_WRITES = """
import os, sys, time
replace = os.replace
def slow_replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".pt"):
        time.sleep(0.2)
    return replace(src, dst, *args, **kwargs)
os.replace = slow_replace
from moe_testbed.cli import main
sys.exit(main(sys.argv[1:]))
"""
_CWD = tempfile.gettempdir()  # not the source tree (see test_train.py)


def _env() -> dict[str, str]:
    import moe_kernels
    import moe_testbed

    env = dict(os.environ)
    paths = {str(Path(m.__file__).resolve().parents[1]) for m in (moe_kernels, moe_testbed)}
    env["PYTHONPATH"] = os.pathsep.join([*sorted(paths), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(*args: str, slow: bool = False) -> list[str]:
    head = [sys.executable, "-c", SLOW_CHECKPOINT_WRITES] if slow else [sys.executable, "-m"]
    tail = ["train", *SMALL, *args]
    return [*head, *tail] if slow else [*head, "moe_testbed.cli", *tail]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), env=_env(), cwd=_CWD, capture_output=True, text=True)


def _start(*args: str, slow: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(*args, slow=slow),
        env=_env(),
        cwd=_CWD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``predicate`` until true; False if the process ended or time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _holds_lock(run: Path, proc: subprocess.Popen):
    def check() -> bool:
        try:
            return (run / ".lock").read_text().strip() == str(proc.pid)
        except OSError:
            return False

    return check


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tmp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp") if ".previous-" not in str(p)]


def _assert_same_run(ref: Path, run: Path) -> None:
    assert _records(run) == _records(ref)  # every loss and metric value, bit for bit
    steps = sorted(p.name for p in (ref / "counts").iterdir())
    assert sorted(p.name for p in (run / "counts").iterdir()) == steps
    for name in steps:
        with np.load(ref / "counts" / name) as x, np.load(run / "counts" / name) as y:
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key])


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; True when the process was still running."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kills_at_random_moments_and_inside_checkpoint_writes_then_resume(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = _start(*RUN, "--out", str(ref))
    assert _wait_for(_holds_lock(ref, proc), proc), proc.stderr.read()
    t0 = time.time()
    assert proc.wait() == 0, proc.stderr.read()
    # From the lock (the run has started) to its last checkpoint: kills land in training, not
    # in the final evaluation that follows it (a run killed there resumes at its last step).
    training = (ref / "checkpoints" / "last.pt").stat().st_mtime - t0
    rng = random.Random(20240611)
    kills, stale, deadline = 0, 0, time.time() + BUDGET_S
    while kills < MAX_KILLS and time.time() < deadline:
        slow = kills % 2 == 1  # every other kill lands inside a checkpoint write
        proc = _start(*RUN, "--out", str(run), slow=slow)
        if not _wait_for(_holds_lock(run, proc), proc):
            break  # it finished (or failed) before the kill
        if slow:
            _wait_for(lambda: bool(list(run.glob("checkpoints/.*.pt.*.tmp"))), proc)
        else:
            time.sleep(rng.uniform(0.0, 0.9 * training))
        if not _kill(proc):
            assert proc.returncode == 0, proc.stderr.read()
            break
        kills += 1
        stale += bool(_tmp_files(run))
    assert kills >= 2 and stale >= 1, (kills, stale)
    resumable = any((run / "checkpoints" / n).exists() for n in ("last.pt", "previous.pt"))
    done = _run(*RUN, "--out", str(run))
    assert done.returncode == 0, done.stderr
    _assert_same_run(ref, run)
    assert _tmp_files(run) == []  # stale temporary files were removed at start
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    # the last kill may land before the first checkpoint: then the final run starts over
    assert history[0]["event"] == "start"
    assert history[-1]["event"] == ("resume" if resumable else "start")


def test_a_second_writer_is_refused_at_once_with_the_holders_pid(tmp_path):
    """Issue 12, case 2: two runs into one --out."""
    run = tmp_path / "run"
    first = _start("--steps", "100000", "--seed", "0", "--out", str(run))
    try:
        assert _wait_for(_holds_lock(run, first), first), first.stderr.read()
        second = _run("--steps", "10", "--seed", "1", "--out", str(run))
        assert first.poll() is None  # refused while the first one runs: not after it
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"(pid {first.pid})" in second.stderr
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0
    finally:
        _kill(first)
    again = _run("--steps", "4", "--no-resume", "--out", str(run))
    assert again.returncode == 0, again.stderr  # a killed holder leaves no lock behind


def test_no_resume_killed_part_way_never_resurrects_the_old_run(tmp_path):
    """Issue 12, case 1: --no-resume --lr 0.001 killed after its first log line (here: inside
    its first checkpoint write), then a plain resume."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert _run(*RUN, "--out", str(run)).returncode == 0  # lr 0.003, finished
    proc = _start(*RUN, "--lr", "0.001", "--no-resume", "--out", str(run), slow=True)
    landed = _wait_for(lambda: bool(list(run.glob("checkpoints/.*.pt.*.tmp"))), proc)
    assert landed and _kill(proc)
    # the new run's lines up to its first checkpoint (step 4); the old run is set aside
    assert [r["step"] for r in _records(run)] == [2, 4]
    assert _run(*RUN, "--lr", "0.001", "--out", str(run)).returncode == 0
    assert _run(*RUN, "--lr", "0.001", "--out", str(fresh)).returncode == 0
    _assert_same_run(fresh, run)
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.001
    old, killed = sorted(run.glob(".previous-*"))
    assert json.loads((old / "config.json").read_text())["train"]["lr"] == 0.003
    assert len(_records(old)) == len(_records(fresh)) and len(_records(killed)) == 2
