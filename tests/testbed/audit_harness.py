"""The pieces of ``audit_inputs.py``: running a command in process and judging its outcome,
and the scenarios on run directories and reports (each a function of a fresh directory that
returns ``(class, detail)``)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np

from moe_testbed import cli, report
from moe_testbed import train as train_module
from moe_testbed.config import RunConfig
from moe_testbed.rundir import RunDir
from moe_testbed.train import lr_at

Outcome = tuple[str, str]  # (class, detail)
SMALL = [
    *("--data-dir", "synthetic", "--vocab-size", "256", "--d-model", "32", "--n-layers", "2"),
    *("--n-heads", "2", "--d-ff-expert", "32", "--seq-len", "16", "--micro-batch-size", "4"),
    *("--eval-tokens", "64", "--eval-batch-size", "4", "--no-progress", "--no-probes"),
    *("--log-every", "1"),
]


# ----------------------------------------------------------------------------- running things


def run_cli(argv: list[str]) -> tuple[object, str, str]:
    """(exit status or "exception", stdout, stderr) of ``moe-testbed ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: object = cli.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(file=err)
            rc = "exception"
    return rc, out.getvalue(), err.getvalue()


def judge_error(rc: object, err: str, must: tuple[str, ...]) -> Outcome:
    """An error was due: one line naming every string of ``must``."""
    if rc == 0:
        return "WRONG", "exit status 0"
    if rc == "exception" or "Traceback" in err:
        return "UNCLEAR", "traceback: " + err.strip().splitlines()[-1][:100]
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    if len(lines) != 1:
        return "UNCLEAR", f"{len(lines)} lines on stderr"
    missing = [m for m in must if m not in lines[0]]
    if missing:
        return "UNCLEAR", f"does not name {missing}: {lines[0][:100]}"
    return "OK", lines[0][:110]


def cli_error(*argv: str, must: tuple[str, ...] = ()) -> Callable[[Path], Outcome]:
    """A case: ``moe-testbed ARGV`` (``{tmp}`` replaced by a fresh directory) must fail."""

    def case(tmp: Path) -> Outcome:
        rc, _, err = run_cli([a.replace("{tmp}", str(tmp)) for a in argv])
        return judge_error(rc, err, must)

    return case


def train_error(*flags: str, must: tuple[str, ...] = ()) -> Callable[[Path], Outcome]:
    """A bad ``train`` flag: one line naming ``must`` (default: the last flag and its value),
    and nothing written."""

    def case(tmp: Path) -> Outcome:
        rc, _, err = run_cli(["train", *flags, "--out", tmp / "run"])
        verdict = judge_error(rc, err, must or tuple(flags[-2:]))
        if verdict[0] == "OK" and (tmp / "run").exists():
            return "WRONG", "refused, but after writing to the run directory"
        return verdict

    return case


def api_error(fn: Callable[[], object], *must: str) -> Callable[[Path], Outcome]:
    """A Python call that must raise ValueError/TypeError naming every string of ``must``."""

    def case(tmp: Path) -> Outcome:
        try:
            fn()
        except (ValueError, TypeError) as e:
            text = str(e)
            missing = [m for m in must if m not in text]
            if missing or "\n" in text.strip():
                return "UNCLEAR", f"{type(e).__name__} not naming {missing}: {text[:100]}"
            return "OK", f"{type(e).__name__}: {text[:100]}"
        except Exception as e:
            return "UNCLEAR", f"{type(e).__name__}: {str(e)[:100]}"
        return "WRONG", "no error"

    return case


def isolated(code: str, *must: str) -> Callable[[Path], Outcome]:
    """``api_error`` in a child process (for calls that may read out of bounds and crash)."""

    def case(tmp: Path) -> Outcome:
        script = (
            "import torch, moe_kernels as mk\n"
            "try:\n"
            + "".join(f"    {line}\n" for line in code.splitlines())
            + "    print('NO ERROR')\n"
            "except (ValueError, TypeError) as e:\n    print('ERROR', e)\n"
        )
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if res.returncode != 0:
            return "WRONG", f"crashed with status {res.returncode}"
        text = res.stdout.strip()
        if text.startswith("NO ERROR"):
            return "WRONG", "no error"
        missing = [m for m in must if m not in text]
        return ("UNCLEAR", f"not naming {missing}: {text[:90]}") if missing else ("OK", text[:100])

    return case


def train_ok(tmp: Path, *flags: str, out: str = "run") -> tuple[object, str, Path]:
    run = tmp / out
    rc, _, err = run_cli(["train", *SMALL, *flags, "--out", run])
    return rc, err, run


def records(run: Path) -> list[dict]:
    """The training records (evaluations log records of their own at the same steps)."""
    return [r for r in RunDir(run).read_metrics() if "loss" in r]


# ----------------------------------------------------------------------------- run directories


def two_writers(tmp: Path) -> Outcome:
    run = tmp / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "moe_testbed.cli", "train", *SMALL, "--steps", "100000"]
        + ["--out", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = run / ".lock"
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.01)
        rc, _, err = run_cli(["train", *SMALL, "--steps", "4", "--seed", "1", "--out", run])
        running = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    if rc == 0:
        return "LOSS", "both runs wrote into one directory"
    verdict = judge_error(rc, err, (f"pid {first.pid}",))
    return verdict if running else ("UNCLEAR", "the first run was not running")


def no_resume_then_crash(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "6", "--ckpt-every", "2")
    step = train_module.Trainer.train_step

    def crash(self):
        step(self)
        raise KeyboardInterrupt

    with mock.patch.object(train_module.Trainer, "train_step", crash):
        train_ok(tmp, "--steps", "6", "--ckpt-every", "2", "--lr", "0.001", "--no-resume")
    rc, err, run = train_ok(tmp, "--steps", "6", "--ckpt-every", "2", "--lr", "0.001")
    train_ok(tmp, "--steps", "6", "--ckpt-every", "2", "--lr", "0.001", out="fresh")
    if rc != 0:
        return judge_error(rc, err, ())
    if records(run) != records(tmp / "fresh"):
        return "LOSS", "the resumed run is not the lr-0.001 run"
    old = sorted(run.glob(".previous-*"))
    if not old or len(records(old[0])) != 6:
        return "LOSS", "the old run is gone"
    return "OK", "old run in .previous-*, new run identical to a fresh one"


def report_after_no_resume(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "6", "--eval-every", "6")
    rc, err, run = train_ok(tmp, "--steps", "2", "--eval-every", "2", "--no-resume")
    report.make_report(run)
    text = (run / "report" / "summary.md").read_text()
    ok = "final evaluation counts, step 2" in text and RunDir(run).list_counts() == [2]
    return ("OK", "report of the new run only") if ok else ("WRONG", "old counts in the report")


def resume_refused(*flags: str, must: str) -> Callable[[Path], Outcome]:
    def case(tmp: Path) -> Outcome:
        train_ok(tmp, "--steps", "4", "--ckpt-every", "2")
        before = records(tmp / "run")
        rc, err, run = train_ok(tmp, "--steps", "6", "--ckpt-every", "2", *flags)
        if rc == 0:
            return "WRONG", "resumed with changed settings"
        if records(run) != before:
            return "LOSS", "metrics changed by a refused resume"
        return judge_error(rc, err, (must,))

    return case


def resume_with_allowed_change(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "4", "--ckpt-every", "2")
    rc, err, run = train_ok(tmp, "--steps", "6", "--lr", "0.001", "--allow-config-change")
    cfg = RunConfig()
    cfg.train.steps = 6
    if rc != 0:
        return judge_error(rc, err, ())
    logged = records(run)[-1]["lr"]
    history = RunDir(run).read_history()[-1]
    if abs(logged - 1e-3 * lr_at(6, cfg)) > 1e-12 or history.get("allow_config_change") is not True:
        return "WRONG", f"logged lr {logged} or history {history.get('event')}"
    return "OK", "new lr applied from the checkpoint on, recorded in history.jsonl"


def corrupt_newest_checkpoint(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "6", "--ckpt-every", "2")
    last = tmp / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    rc, err, run = train_ok(tmp, "--steps", "8", "--ckpt-every", "2")
    if rc != 0:
        return judge_error(rc, err, ())
    steps = [r["step"] for r in records(run)]
    ok = steps == list(range(1, 9)) and "resuming from previous.pt" in err
    return ("OK", "resumed from previous.pt with a warning") if ok else ("WRONG", str(steps))


def both_checkpoints_corrupt(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "4", "--ckpt-every", "2")
    for name in ("last.pt", "previous.pt"):
        (tmp / "run" / "checkpoints" / name).write_bytes(b"garbage")
    rc, err, _ = train_ok(tmp, "--steps", "6", "--ckpt-every", "2")
    return judge_error(rc, err, ("no readable checkpoint", "--no-resume"))


def stale_temp_removed(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "4", "--ckpt-every", "2")
    stale = tmp / "run" / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 4096)
    rc, err, _ = train_ok(tmp, "--steps", "6", "--ckpt-every", "2")
    if rc != 0:
        return judge_error(rc, err, ())
    return ("WRONG", "stale file kept") if stale.exists() else ("OK", "removed at start")


def not_a_run_directory(tmp: Path) -> Outcome:
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine")
    rc, err, _ = train_ok(tmp, "--steps", "2")
    if not (tmp / "run" / "notes.txt").exists():
        return "LOSS", "the user's file was moved or deleted"
    return judge_error(rc, err, ("notes.txt",))


def steps_extended(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "4", "--ckpt-every", "2")
    rc, err, run = train_ok(tmp, "--steps", "6", "--ckpt-every", "2")
    if rc != 0:
        return judge_error(rc, err, ())
    ok = RunDir(run).read_config()["train"]["steps"] == 6 and records(run)[-1]["step"] == 6
    return ("OK", "resumed to 6 steps") if ok else ("WRONG", "config or metrics not at 6 steps")


def leftover_without_checkpoint(tmp: Path) -> Outcome:
    train_ok(tmp, "--steps", "3", "--ckpt-every", "0")
    rc, err, run = train_ok(tmp, "--steps", "3", "--ckpt-every", "0", "--seed", "1")
    old = sorted(run.glob(".previous-*"))
    if not old or len(records(old[0])) != 3:
        return "LOSS", "the earlier run's metrics are gone"
    ok = rc == 0 and [r["step"] for r in records(run)] == [1, 2, 3]
    return ("OK", "earlier run moved aside") if ok else ("WRONG", "metrics mixed")


def eval_every_zero(tmp: Path) -> Outcome:
    rc, err, run = train_ok(tmp, "--steps", "2", "--eval-every", "0")
    if rc != 0:
        return judge_error(rc, err, ())
    has_val = any("val/loss" in r for r in records(run))
    return ("WRONG", "val/loss logged") if has_val else ("OK", "no evaluation, no val/loss")


# ----------------------------------------------------------------------------- reports


def fake_run(path: Path, seed: int, steps: int, **train) -> Path:
    rd = RunDir(path)
    rd.write_config({"name": path.name, "train": {"seed": seed, "lr": 1e-3, **train}})
    for step in range(1, steps + 1):
        rd.append_metrics({"step": step, "loss": 3.0 - 0.01 * step + 0.001 * seed})
    one = np.ones((1, 2, 2), dtype=np.int64)
    rd.write_counts(steps, requested_LDE=one, kept_LDE=one, weight_sum_LDE=one)
    return path


def compare_different_steps(tmp: Path) -> Outcome:
    runs = [
        fake_run(tmp / "a-s0", 0, 20),
        fake_run(tmp / "a-s1", 1, 20),
        fake_run(tmp / "b", 2, 15),
    ]
    report.compare(runs, tmp / "cmp")
    text = (tmp / "cmp" / "compare.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| a") or line.startswith("| b")]
    ok = len(rows) == 2 and "not averaged" in text
    return ("OK", "listed apart with a note") if ok else ("WRONG", f"{len(rows)} rows")


def compare_data_seed(tmp: Path) -> Outcome:
    runs = [fake_run(tmp / "a-s0", 0, 20, data_seed=0), fake_run(tmp / "a-s1", 1, 20, data_seed=1)]
    report.compare(runs, tmp / "cmp")
    text = (tmp / "cmp" / "compare.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| a")]
    return ("OK", "not grouped") if len(rows) == 2 else ("WRONG", "data seeds averaged")


def corrupt(kind: str) -> Callable[[Path], Outcome]:
    def case(tmp: Path) -> Outcome:
        run = fake_run(tmp / "run", 0, 5)
        if kind == "config":
            (run / "config.json").write_text("{oops")
        elif kind == "counts":
            (run / "counts" / "step_0000005.npz").write_bytes(b"PK\x03\x04broken")
        else:
            (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
        rc, _, err = run_cli(["report", run])
        return judge_error(
            rc,
            err,
            ({"config": "config.json", "counts": "step_0000005.npz"}.get(kind, "metrics.jsonl"),),
        )

    return case
