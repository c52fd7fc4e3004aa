"""``moe-testbed sweep``: grid files, run names, finished/resume states, the commands, the
jobs x threads arithmetic, and small sweeps end to end (subprocess runs of a few steps)."""

from __future__ import annotations

import fcntl
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_testbed import cli, cpuload
from moe_testbed.grids import (
    SHIPPED,
    GridError,
    flag_args,
    load_grid,
    parse_set,
    run_name,
    shipped_grids,
)
from moe_testbed.sweep import DONE, check_jobs, command, plan, state

# Seconds-long runs: synthetic domains, a two-layer model of width 32.
MICRO_BASE = """\
base:
  data-dir: synthetic
  vocab-size: 128
  d-model: 32
  n-layers: 2
  n-heads: 2
  d-ff-expert: 32
  seq-len: 16
  num-experts: 4
  eval-tokens: 64
  micro-batch-size: 4
  steps: {steps}
  warmup-steps: 1
  log-every: 1
  eval-every: 2
  ckpt-every: 2
  probes: false
"""


def write_grid(tmp_path: Path, runs: str, steps: int = 4, name: str = "micro") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(MICRO_BASE.format(steps=steps) + "runs:\n" + runs)
    return path


TWO_RUNS = "  - {balance: aux, scope: micro_batch}\n  - {balance: aux, scope: global_batch}\n"


# ----------------------------------------------------------------------------- grid files


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_grids_load_and_check(name):
    grid = load_grid(name)
    assert grid.path == shipped_grids()[name]
    assert grid.runs and grid.description
    assert len({r.name for r in grid.runs}) == len(grid.runs)
    for run in grid.runs:
        assert run.flags["preset"] == "tiny"
        assert run.steps <= 300


def test_installed_package_ships_the_grids():
    """The grids are package data (setup.py package_data, MANIFEST.in): found next to the
    imported module, wherever it is installed."""
    import moe_testbed.grids as grids

    found = {p.stem for p in (Path(grids.__file__).parent / "grids").glob("*.yaml")}
    assert set(SHIPPED) <= found
    setup = (Path(__file__).parents[2] / "setup.py").read_text()
    assert "grids/*.yaml" in setup
    manifest = (Path(__file__).parents[2] / "MANIFEST.in").read_text()
    assert "graft python/moe_testbed/grids" in manifest


def test_scope_grid_covers_both_methods_at_three_scopes():
    grid = load_grid("scope")
    got = {(r.flags["balance"], r.flags["scope"]) for r in grid.runs}
    scopes = {"sequence", "micro_batch", "global_batch"}
    assert got == {(b, s) for b in ("aux", "aux_free") for s in scopes}
    assert [r.name for r in grid.runs][:2] == [
        "balance-aux_scope-sequence",
        "balance-aux_scope-micro-batch",
    ]


def test_run_names_come_from_settings_that_differ_from_base():
    assert run_name({}) == "base"
    assert run_name({"balance": "aux", "scope": "global_batch"}) == "balance-aux_scope-global-batch"
    assert run_name({"capacity-factor": None, "probes": False}) == "capacity-factor-none_probes-off"
    assert run_name({"domains": "en_lit,de zh/x"}) == "domains-en-lit-de-zh-x"


def test_grid_names_skip_base_values_and_accept_explicit_names(tmp_path):
    path = write_grid(
        tmp_path,
        "  - {balance: aux, steps: 4, scope: micro_batch}\n"
        "  - {balance: aux, scope: global_batch, name: global}\n",
    )
    grid = load_grid(path)
    assert [r.name for r in grid.runs] == ["balance-aux_scope-micro-batch", "global"]
    assert grid.runs[0].own == {"balance": "aux", "scope": "micro_batch"}
    assert grid.runs[0].steps == 4


@pytest.mark.parametrize(
    "runs, message",
    [
        ("  - {balanse: aux}\n", r"runs\[0\]: unknown train flag --balanse"),
        ("  - {scope: micro_batch}\n  - {scope: everywhere}\n", r"runs\[1\]:.*everywhere"),
        ("  - {top-k: 9}\n", r"runs\[0\]: --top-k"),
        ("  - {seed: 3}\n", r"runs\[0\]: flag --seed is not allowed.*--seeds"),
        ("  - {out: x}\n", r"runs\[0\]: flag --out is not allowed"),
        ("  - {scope: sequence}\n  - {scope: sequence}\n", r"runs\[1\]: run name .* repeats"),
        ("  - [scope, sequence]\n", r"runs\[0\]: expected a mapping"),
        ("  - {name: 'a b', scope: sequence}\n", r"runs\[0\]: name must be"),
        ("  - {steps: [1, 2]}\n", r"runs\[0\]: --steps must be a single value"),
    ],
)
def test_bad_runs_name_file_index_and_flag(tmp_path, runs, message):
    path = write_grid(tmp_path, runs)
    with pytest.raises(GridError, match=message) as err:
        load_grid(path)
    assert str(path) in str(err.value)


def test_bad_grid_files(tmp_path):
    with pytest.raises(GridError, match="shipped grid .*scope.*got 'nope'"):
        load_grid("nope")
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {a: [\n")
    with pytest.raises(GridError, match="not a readable YAML"):
        load_grid(bad)
    bad.write_text("base: {}\n")
    with pytest.raises(GridError, match="'runs' must be a non-empty list"):
        load_grid(bad)
    bad.write_text("bases: {}\nruns: [{}]\n")
    with pytest.raises(GridError, match="unknown top-level keys \\['bases'\\]"):
        load_grid(bad)
    bad.write_text("base: {preset: tiny, lr: -1}\nruns: [{}]\n")
    with pytest.raises(GridError, match=r"runs\[0\]: --lr"):
        load_grid(bad)


def test_set_overrides_base_without_renaming(tmp_path):
    path = write_grid(tmp_path, TWO_RUNS)
    grid = load_grid(path, parse_set(["steps=2", "probes=true"]))
    assert [r.steps for r in grid.runs] == [2, 2]
    assert grid.runs[0].flags["probes"] is True
    assert grid.runs[0].name == load_grid(path).runs[0].name
    with pytest.raises(GridError, match="--set: expected KEY=VALUE"):
        parse_set(["steps"])
    with pytest.raises(GridError, match="--set: unknown train flag --stepz"):
        load_grid(path, parse_set(["stepz=3"]))


def test_flag_args():
    got = flag_args({"probes": False, "stats": True, "capacity-factor": None, "steps": 5})
    assert got == ["--no-probes", "--stats", "--capacity-factor", "none", "--steps", "5"]


# ----------------------------------------------------------------------------- jobs, states


def test_jobs_times_threads_never_exceed_the_cores():
    assert check_jobs(1, n_cores=2) == 2
    assert check_jobs(2, n_cores=2) == 1
    assert check_jobs(3, n_cores=8) == 2
    assert check_jobs(2, 3, n_cores=8) == 3
    with pytest.raises(ValueError, match="--jobs: expected at most the 2 core"):
        check_jobs(3, n_cores=2)
    with pytest.raises(ValueError, match="--jobs 2 x --threads 2 = 4 threads exceed the 2"):
        check_jobs(2, 2, n_cores=2)
    with pytest.raises(ValueError, match="--jobs: expected an integer >= 1, got 0"):
        check_jobs(0, n_cores=2)
    assert cpuload.threads_per_job(4, 2) == 1


def test_oversubscription_warning_numbers():
    assert cpuload.oversubscription(1, load=0.3, n_cores=2) is None
    text = cpuload.oversubscription(2, load=2.0, n_cores=2)
    assert "other processes use 2.0 core(s)" in text and "2 thread(s) > 2 core(s)" in text


def test_others_busy_sees_a_busy_thread_and_not_its_own_work():
    """others_busy counts other processes' CPU time, not this process's: a busy child process
    shows up as about one core, this process spinning shows up as none."""
    import threading

    if cpuload.others_busy(0.05) is None:
        pytest.skip("/proc/stat not readable here")
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = cpuload.others_busy(0.5)
    finally:
        child.kill()
        child.wait()
    assert busy is not None and 0.6 <= busy <= cpuload.cores() + 0.1, busy

    def spin():
        while time.perf_counter() < stop:
            pass

    before = cpuload.others_busy(0.3)
    stop = time.perf_counter() + 0.5
    t = threading.Thread(target=spin)
    t.start()
    own = cpuload.others_busy(0.3)
    t.join()
    assert own is not None and own < before + 0.6, (before, own)  # own spinning not counted


def test_oversubscription_subtracts_sweep_siblings(monkeypatch):
    monkeypatch.setattr(cpuload, "others_busy", lambda: 1.0)
    monkeypatch.setattr(cpuload, "cores", lambda: 2)
    monkeypatch.delenv(cpuload.SIBLINGS_ENV, raising=False)
    assert cpuload.oversubscription(2) is not None
    monkeypatch.setenv(cpuload.SIBLINGS_ENV, "1")
    assert cpuload.oversubscription(1) is None


def test_states_and_commands(tmp_path):
    grid = load_grid(write_grid(tmp_path, TWO_RUNS))
    jobs = plan(grid, 2, tmp_path / "sw")
    assert [j.name for j in jobs] == [
        "balance-aux_scope-micro-batch-seed0",
        "balance-aux_scope-micro-batch-seed1",
        "balance-aux_scope-global-batch-seed0",
        "balance-aux_scope-global-batch-seed1",
    ]
    job = jobs[1]
    assert state(job) == "new"
    (job.run_dir / "checkpoints").mkdir(parents=True)
    (job.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert state(job) == "resume"
    (job.run_dir / DONE).write_text(json.dumps({"steps": 3}))
    assert state(job) == "resume"  # finished fewer steps than the grid now asks for
    (job.run_dir / DONE).write_text(json.dumps({"steps": 4}))
    assert state(job) == "finished"
    cmd = command(job, 1)
    assert cmd[:4] == [sys.executable, "-m", "moe_testbed", "train"]
    assert cmd[-4:] == ["--seed", "1", "--out", str(job.run_dir)]
    assert "--no-progress" in cmd and "--scope" in cmd


def test_dry_run_and_print_commands(tmp_path, capsys):
    path = write_grid(tmp_path, TWO_RUNS)
    out = tmp_path / "sw"
    done = out / "runs" / "balance-aux_scope-micro-batch-seed0"
    done.mkdir(parents=True)
    (done / DONE).write_text(json.dumps({"steps": 4}))
    assert cli.main(["sweep", str(path), "--seeds", "2", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 run(s)" in lines[0]
    assert lines[1].split() == ["finished", "balance-aux_scope-micro-batch-seed0", "(4", "steps)"]
    assert lines[2].split()[:2] == ["new", "balance-aux_scope-micro-batch-seed1"]
    argv = ["sweep", str(path), "--seeds", "2", "--jobs", "1", "--out", str(out)]
    assert cli.main([*argv, "--print-commands"]) == 0
    cmds = capsys.readouterr().out.splitlines()
    assert len(cmds) == 4
    words = shlex.split(cmds[3])
    assert words[0] == f"OMP_NUM_THREADS={cpuload.cores()}"
    assert words[-3:] == ["1", "--out", str(out / "runs" / "balance-aux_scope-global-batch-seed1")]
    assert not (out / "logs").exists()  # nothing ran


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = write_grid(tmp_path, "  - {balanse: aux}\n")
    with pytest.raises(SystemExit) as err:
        cli.main(["sweep", str(path), "--dry-run"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown train flag --balanse" in msg and len(msg.strip().splitlines()) == 1
    rc = cli.main(["sweep", str(write_grid(tmp_path, TWO_RUNS)), "--jobs", "99", "--dry-run"])
    assert rc == 2
    assert "--jobs: expected at most" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def test_sweep_end_to_end_skips_finished_and_resumes(tmp_path, capsys):
    path = write_grid(tmp_path, TWO_RUNS)
    out = tmp_path / "sw"
    first = ["sweep", str(path), "--seeds", "1", "--jobs", "1", "--out", str(out)]
    # seed the second run with a 2-step checkpoint: the sweep must resume it, not restart it
    assert cli.main([*first, "--set", "steps=2", "--no-compare"]) == 0
    capsys.readouterr()
    assert cli.main(first) == 0
    text = capsys.readouterr().out
    assert "resuming balance-aux_scope-micro-batch-seed0" in text
    assert "finished balance-aux_scope-global-batch-seed0" in text
    for name in ("balance-aux_scope-micro-batch-seed0", "balance-aux_scope-global-batch-seed0"):
        run = out / "runs" / name
        assert json.loads((run / DONE).read_text())["steps"] == 4
        events = [
            json.loads(ln)["event"] for ln in (run / "history.jsonl").read_text().splitlines()
        ]
        assert events[0] == "start" and "resume" in events
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    # the compare table, one row per run
    assert re.search(r"^\| balance-aux_scope-micro-batch(-seed0)? +\| 1 +\| 4 ", text, re.M)
    assert re.search(r"^\| balance-aux_scope-global-batch(-seed0)? +\| 1 +\| 4 ", text, re.M)
    assert (out / "compare" / "compare.md").is_file()
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert {r["state"] for r in status.values()} == {"finished"}
    # everything finished: a third sweep trains nothing
    assert cli.main(first) == 0
    text = capsys.readouterr().out
    assert text.count("[skip]") == 2 and "starting" not in text


def test_failed_run_is_reported_and_others_continue(tmp_path, capsys):
    path = write_grid(tmp_path, TWO_RUNS)
    out = tmp_path / "sw"
    bad = out / "runs" / "balance-aux_scope-micro-batch-seed0"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{not json")  # an unusable run directory
    (bad / "checkpoints").mkdir()
    (bad / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    rc = cli.main(["sweep", str(path), "--out", str(out), "--no-compare"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAILED balance-aux_scope-micro-batch-seed0" in text
    assert "finished balance-aux_scope-global-batch-seed0" in text
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert status["balance-aux_scope-micro-batch-seed0"]["state"] == "failed"


@pytest.mark.skipif(sys.platform != "linux", reason="children die with the sweep on Linux")
def test_killed_sweep_resumes(tmp_path):
    path = write_grid(tmp_path, "  - {balance: aux, scope: global_batch}\n", steps=400)
    out = tmp_path / "sw"
    argv = [sys.executable, "-m", "moe_testbed", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen([*argv, "--no-compare"], stdout=subprocess.DEVNULL)
    ckpt = out / "runs" / "balance-aux_scope-global-batch-seed0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists()
    proc.send_signal(signal.SIGKILL)  # no clean-up at all: the run must die with the sweep
    proc.wait()
    lock = ckpt.parents[1] / ".lock"
    with open(lock, "a") as f:  # the orphaned run gets SIGTERM and lets go of its lock
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the run outlived its sweep"
                time.sleep(0.2)
        fcntl.flock(f, fcntl.LOCK_UN)
    logged = (ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()
    steps = max(json.loads(ln)["step"] for ln in logged if ln.endswith("}")) + 2  # >= ckpt's
    rc = subprocess.run(
        [*argv, "--set", f"steps={steps}", "--no-compare"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rc.returncode == 0, rc.stdout + rc.stderr
    assert "resuming balance-aux_scope-global-batch-seed0" in rc.stdout
    events = (ckpt.parents[1] / "history.jsonl").read_text()
    assert '"resume"' in events
