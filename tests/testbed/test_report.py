"""Tests of the run directory format (moe_testbed.rundir) and the reports (moe_testbed.report)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from moe_testbed import cli, report
from moe_testbed.rundir import RunDir, atomic_write_bytes, atomic_write_json, truncate_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOMAINS = ["code", "prose"]
L, D, E = 2, 2, 4


def make_run(path, *, seed=0, name="ref", lr=1e-3, bias=True, steps=(100, 200, 300)):
    """A synthetic run: metrics lines every 50 steps, eval counts that specialize over time."""
    rd = RunDir(path)
    rd.write_config({"name": name, "seed": seed, "train": {"lr": lr, "data_seed": 0}})
    rng = np.random.default_rng(seed)
    for step in range(50, max(steps) + 1, 50):
        record = {
            "step": step,
            "tokens": step * 1024,
            "loss": 5.0 / math.log(step) + 0.01 * rng.random(),
            "lr": lr,
            "all/utilization@global_batch": 0.8 + 0.0005 * step,
            "layer0/max_violation@global_batch": 0.5,
            "all/max_violation@global_batch": 0.4,
        }
        if step in steps:
            record["val/loss"] = record["loss"] + 0.1
            for i, d in enumerate(DOMAINS):
                record[f"val/{d}/loss"] = record["loss"] + 0.1 * i
        rd.append_metrics(record)
    for i, step in enumerate(steps):
        block = np.kron(np.eye(D, dtype=np.int64), np.ones((1, E // D), dtype=np.int64))
        requested = (10 * (i + 1) * block + 5 + rng.integers(0, 3, (L, D, E))).astype(np.int64)
        kept = requested - (requested > 30)
        arrays = dict(
            requested_LDE=torch.from_numpy(requested),
            kept_LDE=kept,
            weight_sum_LDE=requested * 0.5,
            domains=DOMAINS,
            groups=[[0, 1], [2, 3]],
        )
        if bias:
            arrays["bias_LE"] = 1e-3 * (i + 1) * rng.standard_normal((L, E))
        rd.write_counts(step, **arrays)
    return rd


# ----------------------------------------------------------------------------- run directory


def test_counts_round_trip(tmp_path):
    rd = make_run(tmp_path / "run")
    assert rd.list_counts() == [100, 200, 300]
    assert rd.counts_path(100).name == "step_0000100.npz"
    c = rd.load_counts(200)
    assert c["requested_LDE"].dtype == np.int64 and c["requested_LDE"].shape == (L, D, E)
    assert c["kept_LDE"].dtype == np.int64
    assert c["weight_sum_LDE"].dtype == np.float32
    assert c["bias_LE"].shape == (L, E)
    assert c["domains"] == DOMAINS and c["groups"] == [[0, 1], [2, 3]]
    with pytest.raises(FileNotFoundError, match="step 7"):
        rd.load_counts(7)


def test_write_counts_validates(tmp_path):
    rd = RunDir(tmp_path)
    ok = np.ones((L, D, E), dtype=np.int64)
    with pytest.raises(ValueError, match="missing \\['weight_sum_LDE'\\]"):
        rd.write_counts(1, requested_LDE=ok, kept_LDE=ok)
    with pytest.raises(ValueError, match="kept_LDE must have shape"):
        rd.write_counts(1, requested_LDE=ok, kept_LDE=ok[:1], weight_sum_LDE=ok)
    with pytest.raises(ValueError, match="bias_LE"):
        rd.write_counts(1, requested_LDE=ok, kept_LDE=ok, weight_sum_LDE=ok, bias_LE=np.ones(3))
    # ragged groups survive the -1 padding
    rd.write_counts(1, requested_LDE=ok, kept_LDE=ok, weight_sum_LDE=ok, groups=[[0], [1, 2]])
    assert rd.load_counts(1)["groups"] == [[0], [1, 2]]


def test_config_round_trip_and_atomic_writes(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.write_config({"name": "x", "lr": np.float32(0.5), "layers": np.arange(2)})
    assert rd.read_config() == {"name": "x", "lr": 0.5, "layers": [0, 1]}
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    # a failed write leaves the old file intact and no temporary file behind
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "r"]


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    rd = RunDir(tmp_path)
    for step in (1, 2, 3):
        rd.append_metrics({"step": step, "loss": float(step)})
    with open(rd.metrics_path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"step": 4, "lo')
    assert [r["step"] for r in rd.read_metrics()] == [1, 2, 3]
    rd.append_metrics({"step": 4, "loss": 4.0, "nan": float("nan")})
    records = rd.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4] and math.isnan(records[-1]["nan"])
    assert rd.metrics_path.read_bytes().endswith(b"\n")


def test_truncate_metrics_for_resume(tmp_path):
    rd = RunDir(tmp_path)
    for step in (10, 20, 30, 40):
        rd.append_metrics({"step": step, "loss": 1.0})
    with open(rd.metrics_path, "ab") as f:
        f.write(b'{"step": 5')
    assert truncate_metrics(tmp_path, after_step=20) == 2
    assert [r["step"] for r in rd.read_metrics()] == [10, 20]
    rd.append_metrics({"step": 30, "loss": 0.5})
    assert [r["step"] for r in rd.read_metrics()] == [10, 20, 30]


def test_corrupt_middle_line_raises(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        rd.read_metrics()
    with pytest.raises(ValueError, match="step"):
        rd.append_metrics({"loss": 1.0})


# ----------------------------------------------------------------------------- reports


def test_make_report(tmp_path):
    rd = make_run(tmp_path / "run")
    paths = report.make_report(rd.path)
    names = {p.name for p in paths}
    expected = {
        "loss.png",
        "heatmap_layer0.png",
        "heatmap_layer1.png",
        "routing_over_training.png",
        "bias_drift.png",
        "report.html",
        "summary.md",
    }
    assert names == expected
    for p in paths:
        assert p.parent == rd.report_dir and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
    page = (rd.report_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == 5
    assert "specialization_score" in page and "&quot;name&quot;: &quot;ref&quot;" in page
    summary = (rd.report_dir / "summary.md").read_text()
    assert "| layer |" in summary and "![loss](loss.png)" in summary


def test_make_report_without_counts_or_bias(tmp_path):
    rd = make_run(tmp_path / "run", bias=False)
    assert "bias_drift.png" not in {p.name for p in report.make_report(rd.path)}
    bare = RunDir(tmp_path / "bare")
    bare.append_metrics({"step": 1, "loss": 3.0})
    assert {p.name for p in report.make_report(bare.path)} == {
        "loss.png",
        "report.html",
        "summary.md",
    }
    with pytest.raises(FileNotFoundError):
        report.make_report(tmp_path / "missing")


def test_compare_mean_std_over_seeds(tmp_path):
    runs = [make_run(tmp_path / f"ref_s{s}", seed=s, name=f"ref-s{s}") for s in (0, 1, 2)]
    runs.append(make_run(tmp_path / "other", name="hash", lr=3e-3))
    paths = report.compare([r.path for r in runs], tmp_path / "cmp")
    assert {p.name for p in paths} == {
        "compare.md",
        "compare.html",
        "compare_loss.png",
        "compare_utilization.png",
        "compare_specialization.png",
    }
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[6:]}
    assert set(rows) == {"ref", "hash"}
    assert rows["ref"].split(" | ")[1] == "3" and "±" in rows["ref"]
    assert rows["hash"].split(" | ")[1] == "1" and "±" not in rows["hash"]
    header = table.splitlines()[4]
    assert (
        "val/loss" in header and "specialization_score" in header and "max_violation@eval" in header
    )
    # the mean of the three seeds' final validation losses
    finals = [r.read_metrics()[-1]["val/loss"] for r in runs[:3]]
    col = header.strip("| ").split(" | ").index("val/loss")
    assert rows["ref"].strip("| ").split(" | ")[col].startswith(f"{np.mean(finals):.4g} ± ")
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "<table>" in html and "±" in html and html.count("data:image/png;base64,") == 3
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC


def test_cli_subcommands(tmp_path, capsys):
    a = make_run(tmp_path / "a", seed=0)
    b = make_run(tmp_path / "b", seed=1)
    parser = argparse.ArgumentParser()
    cli.add_report_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(a.path)])
    assert args.func(args) == 0 and (a.report_dir / "report.html").exists()
    args = parser.parse_args(["compare", str(a.path), str(b.path), "--out", str(tmp_path / "c")])
    assert args.func(args) == 0 and (tmp_path / "c" / "compare.md").exists()
    args = parser.parse_args(["compare", str(a.path), str(b.path)])
    assert args.func(args) == 0 and (tmp_path / "compare" / "compare.html").exists()
    args = parser.parse_args(["report", str(tmp_path / "nope")])
    assert args.func(args) == 2 and "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what reports say


def test_report_and_compare_refuse_a_run_with_nothing_to_report(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    started = RunDir(tmp_path / "started")  # killed before its first log line
    started.write_config({"name": "started", "seed": 0})
    (started.path / ".previous-20240101-000000").mkdir()
    ok = make_run(tmp_path / "ok")
    for run in (empty, started.path):
        with pytest.raises(ValueError, match="nothing to report"):
            report.make_report(run)
        with pytest.raises(ValueError, match="nothing to report"):
            report.compare([ok.path, run], tmp_path / "cmp")
    assert not (empty / "report").exists()
    assert cli.main(["report", str(started.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "earlier runs set aside here: .previous-20240101" in err
    assert cli.main(["compare", str(ok.path), str(empty)]) == 2
    assert "nothing to report" in capsys.readouterr().err


def _table_rows(path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    header = lines[4].strip("| ").split(" | ")
    rows = {}
    for line in lines[6:]:
        if not line.startswith("|"):
            continue
        cells = line.strip("| ").split(" | ")
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_compare_averages_seeds_only_at_the_same_step(tmp_path):
    full = [make_run(tmp_path / f"ref_s{s}", seed=s, name=f"ref-s{s}") for s in (0, 1)]
    short = make_run(tmp_path / "ref_s2", seed=2, name="ref-s2", steps=(100, 150))
    report.compare([*(r.path for r in full), short.path], tmp_path / "cmp")
    rows = _table_rows(tmp_path / "cmp" / "compare.md")
    assert set(rows) == {"ref", "ref-s2"}
    assert (rows["ref"]["seeds"], rows["ref"]["step"]) == ("2", "300")
    assert (rows["ref-s2"]["seeds"], rows["ref-s2"]["step"]) == ("1", "150")
    assert rows["ref"]["val/loss"].endswith("(n=2)") and "±" not in rows["ref-s2"]["val/loss"]
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "stopped at different steps (step 150: ref-s2; step 300: ref-s0, ref-s1)" in text
    assert "not averaged" in (tmp_path / "cmp" / "compare.html").read_text()


def test_compare_keeps_runs_apart_that_differ_in_more_than_the_seed(tmp_path):
    a = make_run(tmp_path / "a", seed=0, name="ref-s0")
    b = make_run(tmp_path / "b", seed=1, name="ref-s1")
    config = b.read_config()
    config["train"]["data_seed"] = 1  # another data order: not a seed of the same experiment
    b.write_config(config)
    c = make_run(tmp_path / "c", seed=2, name="ref-s2")
    config = c.read_config()
    config["train"]["progress"] = False  # display only: still a seed
    c.write_config(config)
    report.compare([a.path, b.path, c.path], tmp_path / "cmp")
    rows = _table_rows(tmp_path / "cmp" / "compare.md")
    assert sorted((r["run"], r["seeds"]) for r in rows.values()) == [("ref", "2"), ("ref-s1", "1")]


def test_overlay_draws_a_std_band_per_group_of_seeds(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bands = []
    fill = Axes.fill_between

    def recording(self, x, low, high, **kw):
        bands.append((list(x), np.asarray(low), np.asarray(high)))
        return fill(self, x, low, high, **kw)

    monkeypatch.setattr(Axes, "fill_between", recording)
    runs = [make_run(tmp_path / f"s{s}", seed=s, name=f"x-s{s}") for s in (0, 1, 2)]
    runs.append(make_run(tmp_path / "alone", name="alone", lr=1.0))
    report.compare([r.path for r in runs], tmp_path / "cmp")
    assert len(bands) == 3  # one band per curve for the group of three; none for the single run
    steps, low, high = bands[0]
    val = "val/loss"
    finals = np.array([[r[val] for r in run.read_metrics() if val in r] for run in runs[:3]])
    mean, std = finals.mean(axis=0), finals.std(axis=0, ddof=1)
    np.testing.assert_allclose(low, mean - std)
    np.testing.assert_allclose(high, mean + std)


def test_chance_plot_draws_groups_with_a_corrected_score_only(tmp_path):
    from moe_testbed import plots

    assert plots.plot_chance({"a": [{}], "b": [{"floor": 0.2}]}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    groups = {
        "global": [{"corrected": 0.3, "step0": 0.02, "floor": 0.3}, {"corrected": 0.25}],
        "sequence": [{"corrected": 0.1, "step0": 0.02, "floor": 0.3}],
        "no evaluation": [{}],
    }
    path = plots.plot_chance(groups, tmp_path / "chance.png")
    assert path == tmp_path / "chance.png" and path.stat().st_size > 1000


def test_corrected_reads_the_three_corrected_values():
    from moe_testbed import chance_report

    ev = {
        "metrics": {
            "specialization_score": {
                "corrected": 0.3,
                "step0_corrected": 0.01,
                "floor_corrected": float("nan"),
            }
        }
    }
    assert chance_report.corrected(ev) == {"corrected": 0.3, "step0": 0.01}
    assert chance_report.corrected(None) == {}
