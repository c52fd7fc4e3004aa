"""Run directories that cannot be mixed up: the lock, set-aside, stale temporary files, the two
checkpoints and their fallback, and what a resume may change (in process; the kill tests are in
test_faults.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moe_testbed import checkpoint, report, runstart
from moe_testbed import train as train_module
from moe_testbed.checkpoint import ConfigChangeError, resume_changes, resume_kind
from moe_testbed.config import RunConfig
from moe_testbed.rundir import RunDir
from moe_testbed.runstart import RunDirError
from moe_testbed.train import lr_at, train


def _records(run) -> list[dict]:
    return RunDir(run).read_metrics()


def _fake_run(path) -> RunDir:
    """A run directory as a finished run leaves it (contents do not matter here)."""
    rd = RunDir(path)
    rd.write_config({"train": {"seed": 0}})
    rd.append_metrics({"step": 1, "loss": 1.0})
    rd.write_counts(1, requested_LDE=[[[1]]], kept_LDE=[[[1]]], weight_sum_LDE=[[[1.0]]])
    rd.checkpoints_dir.mkdir()
    (rd.checkpoints_dir / "last.pt").write_bytes(b"x")
    return rd


# ----------------------------------------------------------------------------- lock


def test_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    rd = RunDir(tmp_path / "run")
    held = runstart.lock(rd)
    assert (rd.path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()}\)"):
        runstart.lock(rd)  # flock conflicts between two opens, even in one process
    held.release()
    runstart.lock(rd).release()  # free again once released


def test_lock_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="expected a run directory, got the file"):
        runstart.lock(RunDir(tmp_path / "f"))


def test_train_refuses_a_held_directory_before_any_work(tmp_path, tiny_cfg):
    held = runstart.lock(RunDir(tmp_path / "run"))
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        train(tiny_cfg(steps=2), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    held.release()


# ----------------------------------------------------------------------------- set-aside


def test_set_aside_moves_every_entry_and_deletes_nothing(tmp_path):
    rd = _fake_run(tmp_path / "run")
    before = sorted(p.name for p in rd.path.iterdir())
    moved = runstart.set_aside(rd)
    assert moved.name.startswith(".previous-") and runstart.entries(rd) == []
    assert sorted(p.name for p in moved.iterdir()) == before
    assert RunDir(moved).read_metrics() == [{"step": 1, "loss": 1.0}]
    assert runstart.set_aside(rd) is None  # nothing left to move
    _fake_run(rd.path)
    assert runstart.set_aside(rd) != moved  # a second one gets its own folder
    assert len(runstart.previous_runs(rd)) == 2


def test_set_aside_refuses_a_directory_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no run .*notes.txt"):
        runstart.set_aside(RunDir(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_interrupted_set_aside_is_finished_first(tmp_path):
    rd = _fake_run(tmp_path / "run")
    target = rd.path / ".previous-20000101-000000"
    target.mkdir()
    os.replace(rd.metrics_path, target / "metrics.jsonl")  # the crash came after one move
    (rd.path / ".set-aside").write_text(target.name)
    assert runstart.finish_set_aside(rd) == target
    assert runstart.entries(rd) == [] and not (rd.path / ".set-aside").exists()
    assert {"metrics.jsonl", "config.json", "counts", "checkpoints"} <= {
        p.name for p in target.iterdir()
    }


def test_stale_temporary_files_are_removed(tmp_path):
    rd = _fake_run(tmp_path / "run")
    stale = [
        rd.checkpoints_dir / ".last.pt.k2j3.tmp",
        rd.counts_dir / ".step_0000001.npz.x.tmp",
        rd.path / ".config.json.y.tmp",
    ]
    for p in stale:
        p.write_bytes(b"partial")
    assert sorted(runstart.remove_stale_temp(rd)) == sorted(stale)
    assert not any(p.exists() for p in stale) and (rd.checkpoints_dir / "last.pt").exists()


# ----------------------------------------------------------------------------- checkpoints


def _save(rd: RunDir, step: int) -> None:
    checkpoint.save(rd, {"step": step, "config": {}, "w": torch.full((3,), float(step))})


def test_two_checkpoints_kept_and_a_corrupt_newest_falls_back(tmp_path, capsys):
    rd = RunDir(tmp_path / "run")
    for step in (2, 4, 6):
        _save(rd, step)
    assert sorted(p.name for p in rd.checkpoints_dir.iterdir()) == ["last.pt", "previous.pt"]
    loaded = checkpoint.load(rd, device=torch.device("cpu"))
    assert loaded.state["step"] == 6 and loaded.skipped == []
    last = rd.checkpoints_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    loaded = checkpoint.load(rd, device=torch.device("cpu"))
    assert loaded.state["step"] == 4 and loaded.path.name == "previous.pt"
    assert [name for name, _ in loaded.skipped] == ["last.pt"]
    err = capsys.readouterr().err
    assert "warning: unreadable checkpoint (last.pt:" in err and "resuming from previous.pt" in err
    (rd.checkpoints_dir / "previous.pt").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="no readable checkpoint .*last.pt: .*previous.pt: "):
        checkpoint.load(rd, device=torch.device("cpu"))


def test_a_crash_between_the_renames_leaves_the_previous_checkpoint(tmp_path):
    rd = RunDir(tmp_path / "run")
    _save(rd, 2)
    os.replace(rd.checkpoints_dir / "last.pt", rd.checkpoints_dir / "previous.pt")
    assert checkpoint.exists(rd)
    assert checkpoint.load(rd, device=torch.device("cpu")).state["step"] == 2


# ----------------------------------------------------------------------------- resume rules


def test_resume_rules():
    cfg = RunConfig()
    saved = json.loads(json.dumps(cfg.to_dict()))
    saved["model"]["vocab_size"] = 4096  # derived by the trainer from vocab_size=0
    cfg.train.steps, cfg.train.lr = 500, 1e-3
    assert resume_changes(saved, cfg) == {"train.steps": (200, 500), "train.lr": (3e-3, 1e-3)}
    assert resume_kind("train.steps") == resume_kind("train.eval_every") == "free"
    assert resume_kind("train.lr") == resume_kind("moe.aux_coef") == "allowed"
    assert resume_kind("model.d_model") == resume_kind("moe.num_experts") == "fixed"
    assert resume_kind("train.seed") == resume_kind("data.domains") == "fixed"


def test_resume_refuses_changes_unless_allowed_and_records_them(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    train(tiny_cfg(steps=4), run)
    # more steps and another cadence: free
    train(tiny_cfg(steps=6, log_every=2), run)
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 6]
    # another lr: refused with the list of differences, nothing written
    with pytest.raises(ConfigChangeError, match=r"train\.lr 0\.003 -> 0\.001.*--allow-config"):
        train(tiny_cfg(steps=8, lr=1e-3), run)
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 6]
    # allowed: trains with the new lr from the checkpoint on, and says so in the history
    cfg = tiny_cfg(steps=8, lr=1e-3)
    train(cfg, run, allow_config_change=True)
    last = _records(run)[-1]
    assert last["step"] == 8 and last["lr"] == pytest.approx(1e-3 * lr_at(8, cfg))
    resume = [h for h in RunDir(run).read_history() if h["event"] == "resume"][-1]
    assert resume["allow_config_change"] is True and resume["step"] == 6
    assert resume["changes"]["train.lr"] == [3e-3, 1e-3]
    assert RunDir(run).read_config()["train"]["lr"] == 1e-3
    # shapes of the checkpoint: refused even when allowed
    with pytest.raises(ConfigChangeError, match="moe.num_experts"):
        train(tiny_cfg(steps=10, moe={"num_experts": 4}), run, allow_config_change=True)
    with pytest.raises(ConfigChangeError, match="steps must be >= the checkpoint's step 8"):
        train(tiny_cfg(steps=5, lr=1e-3), run)


def test_resume_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    train(tiny_cfg(steps=6), run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    train(tiny_cfg(steps=8), run)
    assert [r["step"] for r in _records(run)] == list(range(1, 9))
    resume = RunDir(run).read_history()[-1]
    assert resume["event"] == "resume" and resume["step"] == 4
    assert resume["checkpoint"] == "previous.pt" and resume["unreadable"][0].startswith("last.pt")


# ----------------------------------------------------------------------------- the reproductions


def test_no_resume_then_a_crash_does_not_resurrect_the_old_run(tmp_path, tiny_cfg, monkeypatch):
    """Issue 12, case 1: --no-resume, killed after its first log line, then a plain resume."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train(tiny_cfg(steps=6), run)  # lr 3e-3, checkpoints at 2, 4, 6
    step = train_module.Trainer.train_step

    def crash_after_first_log(self):
        step(self)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train_module.Trainer, "train_step", crash_after_first_log)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(steps=6, lr=1e-3), run, resume=False)
    monkeypatch.undo()
    assert [r["step"] for r in _records(run)] == [1]  # the new run's line, the old run moved
    train(tiny_cfg(steps=6, lr=1e-3), run)  # no checkpoint of the new run: starts over
    train(tiny_cfg(steps=6, lr=1e-3), fresh)
    assert _records(run) == _records(fresh)  # the lr-1e-3 run, bit for bit
    assert RunDir(run).read_config()["train"]["lr"] == 1e-3
    old, crashed = runstart.previous_runs(RunDir(run))
    assert RunDir(old).read_config()["train"]["lr"] == 3e-3 and len(_records(old)) == 6
    assert (old / "checkpoints" / "last.pt").exists() and len(_records(crashed)) == 1


def test_report_after_no_resume_shows_only_the_new_run(tmp_path, tiny_cfg):
    """Issue 12, case 4: the old run's counts must not appear in the new run's report."""
    run = tmp_path / "run"
    train(tiny_cfg(steps=6, eval_every=6), run)
    train(tiny_cfg(steps=2, eval_every=2), run, resume=False)
    assert RunDir(run).list_counts() == [2]
    report.make_report(run)
    assert "final evaluation counts, step 2" in (run / "report" / "summary.md").read_text()


def test_resume_with_changed_settings_is_refused_before_any_work(tmp_path, tiny_cfg):
    """Issue 12, case 5: lr, experts, micro-batch, seed or domains changed on resume."""
    run = tmp_path / "run"
    train(tiny_cfg(steps=2), run)
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"}
    for cfg in (
        tiny_cfg(steps=4, lr=1e-3),
        tiny_cfg(steps=4, moe={"num_experts": 4}),
        tiny_cfg(steps=4, micro_batch_size=2),
        tiny_cfg(steps=4, seed=1),
    ):
        with pytest.raises(ConfigChangeError, match="different config|cannot take"):
            train(cfg, run)
    assert {p: p.stat().st_mtime_ns for p in snapshot} == snapshot
