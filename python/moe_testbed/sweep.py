"""``moe-testbed sweep GRID``: every run of a grid (:mod:`moe_testbed.grids`) for N seeds,
J at a time, then ``compare`` over the whole grid.

Layout of ``--out DIR``::

    DIR/runs/NAME-seedS/     one run directory per run and seed (``moe-testbed train --out``)
    DIR/runs/NAME-seedS/sweep-done.json   written when the run exited cleanly (steps, seconds)
    DIR/logs/NAME-seedS.log  the run's stdout and stderr
    DIR/sweep.json           the last sweep's status of every run (written atomically)
    DIR/compare/             ``moe-testbed compare`` over every finished run

A run is *finished* when its ``sweep-done.json`` records at least the steps the grid asks
for; a run with a checkpoint but no such record is *resumed* (the trainer continues from its
checkpoint); any other run is *new*. Finished runs are skipped, so killing a sweep and starting
it again with the same arguments continues where it stopped.

Each run is a separate ``python -m moe_testbed train`` process. J processes share the cores:
each gets ``cores // J`` torch threads (``OMP_NUM_THREADS``), and J x threads may not exceed
the cores (see :mod:`moe_testbed.cpuload` for why). A failed run is reported and the others go
on; the sweep then exits with status 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_testbed import cpuload
from moe_testbed.grids import Grid, Run, flag_args, known_flags

DONE = "sweep-done.json"


@dataclass
class Job:
    """One run of the grid with one seed."""

    run: Run
    seed: int
    out: Path  # the sweep's DIR

    @property
    def name(self) -> str:
        return f"{self.run.name}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def log(self) -> Path:
        return self.out / "logs" / f"{self.name}.log"


def plan(grid: Grid, seeds: int, out: str | Path) -> list[Job]:
    """Every (run, seed) of ``grid``, runs in grid order, seeds 0..seeds-1 within a run."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds: expected an integer >= 1, got {seeds!r}")
    return [Job(run, seed, Path(out)) for run in grid.runs for seed in range(seeds)]


def state(job: Job) -> str:
    """``finished``, ``resume`` (a checkpoint to continue from) or ``new``."""
    done = job.run_dir / DONE
    if done.is_file():
        try:
            record = json.loads(done.read_text())
        except (OSError, ValueError):
            record = {}
        if int(record.get("steps", -1)) >= job.run.steps:
            return "finished"
    if (job.run_dir / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "new"


def check_jobs(jobs: int, threads: int | None = None, n_cores: int | None = None) -> int:
    """Threads per job for ``jobs`` parallel runs; ``threads`` None = ``cores // jobs``.

    Raises ValueError when ``jobs`` x threads would exceed the cores: two torch processes on
    the same cores slow each other down many times over (:mod:`moe_testbed.cpuload`).
    """
    n = cpuload.cores() if n_cores is None else n_cores
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs: expected an integer >= 1, got {jobs!r}")
    if jobs > n:
        raise ValueError(
            f"--jobs: expected at most the {n} core(s) this process may use, got {jobs} "
            "(parallel torch processes on shared cores run many times slower, not faster)"
        )
    t = cpuload.threads_per_job(jobs, n) if threads is None else threads
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"--threads: expected an integer >= 1, got {t!r}")
    if jobs * t > n:
        raise ValueError(
            f"--threads: --jobs {jobs} x --threads {t} = {jobs * t} threads exceed the {n} "
            f"core(s); expected --threads <= {n // jobs}"
        )
    return t


def command(job: Job, threads: int) -> list[str]:
    """The ``train`` command line of one job (without the environment, see :func:`env`)."""
    flags = dict(job.run.flags)
    if "threads" in known_flags() and "threads" not in flags:
        flags["threads"] = threads
    flags.setdefault("progress", False)  # a log file, not a terminal
    return [
        sys.executable,
        "-m",
        "moe_testbed",
        "train",
        *flag_args(flags),
        "--seed",
        str(job.seed),
        "--out",
        str(job.run_dir),
    ]


def env(threads: int, jobs: int) -> dict[str, str]:
    """Environment additions of every job: the thread count and the siblings' threads."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        cpuload.SIBLINGS_ENV: str(threads * (jobs - 1)),
    }


def shell_line(job: Job, threads: int, jobs: int) -> str:
    """One shell command for a cluster scheduler (environment prefix included)."""
    prefix = " ".join(f"{k}={v}" for k, v in env(threads, jobs).items())
    return f"{prefix} {shlex.join(command(job, threads))}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Children get SIGTERM when the sweep dies, even by SIGKILL (Linux), so that no orphaned
    run holds its directory's lock when the sweep is started again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _final_text(run_dir: Path) -> str:
    from moe_testbed import logging as names
    from moe_testbed.rundir import last_values, read_metrics

    try:
        last = last_values(read_metrics(run_dir))
    except (OSError, ValueError):
        return ""
    val, spec = (
        names.name("loss", split="val"),
        names.name("specialization_score", split="val", layer=names.ALL),
    )
    parts = []
    for label, key in (("val loss", val), ("loss", names.name("loss")), ("spec", spec)):
        if isinstance(last.get(key), (int, float)) and not (label == "loss" and parts):
            parts.append(f"{label} {last[key]:.3f}")
    return ", ".join(parts)


def _write_done(job: Job, seconds: float) -> None:
    from moe_testbed.rundir import atomic_write_json

    atomic_write_json(job.run_dir / DONE, {"steps": job.run.steps, "seconds": round(seconds, 1)})


def _write_status(out: Path, grid: Grid, status: dict[str, dict[str, Any]], seconds: float) -> None:
    from moe_testbed.rundir import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "sweep.json",
        {"grid": str(grid.path), "seconds": round(seconds, 1), "runs": status},
    )


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def execute(
    jobs_list: list[Job], jobs: int, threads: int, grid: Grid, out: Path
) -> dict[str, dict[str, Any]]:
    """Run every unfinished job, ``jobs`` at a time; returns name -> status record."""
    status: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs_list:
        s = state(job)
        status[job.name] = {"state": s}
        if s == "finished":
            print(f"[skip] {job.name}: finished", flush=True)
        else:
            todo.append(job)
    total, done = len(todo), 0
    extra = env(threads, jobs)
    running: dict[subprocess.Popen, tuple[Job, float, Any]] = {}
    tic = time.perf_counter()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                job = todo.pop(0)
                how = status[job.name]["state"]
                job.log.parent.mkdir(parents=True, exist_ok=True)
                job.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "a", encoding="utf-8")  # noqa: SIM115 - closed on exit
                log.write(f"$ {shell_line(job, threads, jobs)}\n")
                log.flush()
                proc = subprocess.Popen(
                    command(job, threads),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **extra},
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
                running[proc] = (job, time.perf_counter(), log)
                verb = "resuming" if how == "resume" else "starting"
                print(
                    f"[{done}/{total}] {verb} {job.name} ({job.run.steps} steps, "
                    f"{threads} thread(s)); log {job.log}",
                    flush=True,
                )
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, start, log = running.pop(proc)
                log.close()
                seconds = time.perf_counter() - start
                done += 1
                rec = status[job.name]
                rec.update(rc=proc.returncode, seconds=round(seconds, 1))
                if proc.returncode == 0:
                    _write_done(job, seconds)
                    rec["state"] = "finished"
                    text = _final_text(job.run_dir)
                    print(
                        f"[{done}/{total}] finished {job.name} in {seconds:.0f} s"
                        + (f": {text}" if text else ""),
                        flush=True,
                    )
                else:
                    rec["state"] = "failed"
                    tail = _log_tail(job.log)
                    print(
                        f"[{done}/{total}] FAILED {job.name} (exit status {proc.returncode}) "
                        f"after {seconds:.0f} s: {tail} (log {job.log})",
                        flush=True,
                    )
    except (KeyboardInterrupt, _Terminated):
        _stop(running)
        _write_status(out, grid, status, time.perf_counter() - tic)
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, old)
    return status


def _stop(running: dict[subprocess.Popen, tuple[Job, float, Any]]) -> None:
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc, (job, _, log) in running.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(f"stopped {job.name}; a later sweep resumes it from its checkpoint", flush=True)


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def run_sweep(
    grid: Grid,
    *,
    seeds: int,
    jobs: int,
    out: str | Path,
    threads: int | None = None,
    dry_run: bool = False,
    print_commands: bool = False,
    compare: bool = True,
) -> int:
    """Run (or list, or print the commands of) every run of ``grid`` for ``seeds`` seeds,
    ``jobs`` at a time, then compare the finished runs into ``OUT/compare`` and print the
    table. Returns the exit status: 0, or 1 when a run failed. Raises ValueError for bad
    ``seeds``/``jobs``/``threads`` before anything runs."""
    out = Path(out).absolute()  # the commands work from any directory
    t = check_jobs(jobs, threads)
    todo = plan(grid, seeds, out)
    if print_commands:
        for job in todo:
            print(shell_line(job, t, jobs))
        return 0
    if dry_run:
        print(f"grid {grid.name} ({grid.path}): {len(todo)} run(s), {jobs} job(s) x {t} thread(s)")
        for job in todo:
            print(f"  {state(job):8s} {job.name}  ({job.run.steps} steps)")
        return 0
    print(
        f"== sweep {grid.name}: {len(grid.runs)} run(s) x {seeds} seed(s), {jobs} job(s) x "
        f"{t} thread(s) on {cpuload.cores()} core(s); out {out}",
        flush=True,
    )
    warning = cpuload.oversubscription(jobs * t, who="sweep")
    if warning:
        print(f"moe-testbed sweep: {warning}", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    status = execute(todo, jobs, t, grid, out)
    seconds = time.perf_counter() - tic
    _write_status(out, grid, status, seconds)
    failed = [n for n, r in status.items() if r["state"] == "failed"]
    finished = [j for j in todo if status[j.name]["state"] == "finished"]
    print(
        f"== sweep {grid.name}: {len(finished)}/{len(todo)} run(s) finished in {seconds:.0f} s"
        + (f"; FAILED: {', '.join(failed)} (logs in {out / 'logs'})" if failed else ""),
        flush=True,
    )
    if compare and finished:
        from moe_testbed.report import compare as compare_runs

        compare_runs([j.run_dir for j in finished], out / "compare")
        md = out / "compare" / "compare.md"
        print(md.read_text(encoding="utf-8"), flush=True)
        print(f"== comparison: {out / 'compare' / 'compare.html'}", flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- command line


def _cmd_sweep(args: Any) -> int:
    from moe_testbed.grids import GridError, load_grid, parse_set

    try:
        grid = load_grid(args.grid, parse_set(args.set or []))
        return run_sweep(
            grid,
            seeds=args.seeds,
            jobs=args.jobs,
            out=args.out or Path("runs") / f"sweep-{grid.name}",
            threads=args.threads,
            dry_run=args.dry_run,
            print_commands=args.print_commands,
            compare=not args.no_compare,
        )
    except GridError as err:
        args._parser.error(" ".join(str(err).split()))
        return 2


def add_sweep_subcommand(subparsers: Any) -> None:
    """Register ``sweep GRID [--seeds N] [--jobs J] [--out DIR] ...`` (sets ``func``)."""
    from moe_testbed.grids import SHIPPED

    p = subparsers.add_parser(
        "sweep",
        help="train every run of a grid for several seeds, J at a time, then compare them",
        description="Run a grid of training runs (a YAML file of train flag sets) for N seeds, "
        "J processes at a time sharing the cores, skipping finished runs and resuming "
        "interrupted ones, then write OUT/compare (mean ± std over seeds) and print its table. "
        "Each run is DIR/runs/NAME-seedS, named from the settings that differ from the grid's "
        "base; its output goes to DIR/logs/NAME-seedS.log.",
    )
    p.add_argument(
        "grid",
        metavar="GRID",
        help=f"a shipped grid ({', '.join(SHIPPED)}) or the path of a grid YAML file "
        "(format: moe_testbed.grids; 'base:' flags shared by all runs, 'runs:' a list of flag "
        "sets)",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per run, 0..N-1 (default 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (default 1); each gets cores // JOBS torch threads, and JOBS may not "
        "exceed the cores",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default cores // JOBS); JOBS x THREADS may not exceed the "
        "cores",
    )
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweep-GRID)")
    p.add_argument(
        "--set",
        action="append",
        metavar="FLAG=VALUE",
        help="override a base setting of every run, e.g. --set steps=50 (repeatable; a train "
        "flag without dashes; run names do not change, so use a new --out for anything but "
        "steps and cadence)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs and whether each is finished, to resume or new; run nothing",
    )
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print one shell command per run (for a cluster scheduler); run nothing",
    )
    p.add_argument("--no-compare", action="store_true", help="skip the comparison at the end")
    p.set_defaults(func=_cmd_sweep, _parser=p)
