"""Metric names (moe_testbed.logging): building, parsing, queries; the TensorBoard sink."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from moe_testbed import logging as names
from moe_testbed import sinks
from moe_testbed.rundir import RunDir


@pytest.mark.parametrize(
    "key, fields",
    [
        (
            "train/layer3/max_violation@global_batch",
            dict(metric="max_violation", split="train", layer=3, scope="global_batch"),
        ),
        (
            "val/all/specialization_score",
            dict(metric="specialization_score", split="val", layer="all"),
        ),
        ("val/en_lit/loss", dict(metric="loss", split="val", domain="en_lit")),
        ("probe/layer0/stiffness", dict(metric="stiffness", split="probe", layer=0)),
        ("layer2/kept_utilization@eval", dict(metric="kept_utilization", layer=2, scope="eval")),
        (
            "all/utilization@global_batch",
            dict(metric="utilization", layer="all", scope="global_batch"),
        ),
        ("val/loss", dict(metric="loss", split="val")),
        ("loss", dict(metric="loss")),
    ],
)
def test_name_and_parse_round_trip(key, fields):
    assert names.name(**fields) == key
    parsed = names.parse(key)
    assert parsed == names.MetricName(**fields) and str(parsed) == key


def test_parsed_name_parts():
    parsed = names.parse("val/layer1/kept_max_violation@eval")
    assert parsed.kept and parsed.base == "max_violation"
    assert parsed.where == "layer1" and parsed.column == "kept_max_violation@eval"
    assert names.kept("purity") == "kept_purity"
    assert names.is_layer_value("train/layer0/purity") and not names.is_layer_value("val/all/x")
    assert names.is_loss("loss") and names.is_loss("val/loss") and names.is_loss("val/de/loss")
    assert not names.is_loss("val/de/ppl") and not names.is_loss("a/b/c/d")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metric="a/b"), "metric"),
        (dict(metric="x", split="test"), "split"),
        (dict(metric="x", layer=-1), "layer"),
        (dict(metric="x", layer=True), "layer"),  # a bool is not a layer index
        (dict(metric="x", layer=0, domain="de"), "layer or domain"),
        (dict(metric="x", scope="a@b"), "scope"),
    ],
)
def test_bad_names_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        names.name(**kwargs)


def test_parse_rejects_too_many_parts():
    with pytest.raises(ValueError, match="split/"):
        names.parse("val/layer0/extra/loss")


def test_layer_values_and_queries():
    values = names.layer_values("max_violation", [1.0, 0.0], split="train", scope="micro_batch")
    assert values == {
        "train/layer0/max_violation@micro_batch": 1.0,
        "train/layer1/max_violation@micro_batch": 0.0,
        "train/all/max_violation@micro_batch": 0.5,
    }
    assert names.layer_values("purity", 0.25) == {"layer0/purity": 0.25, "all/purity": 0.25}
    records = [
        {"step": 1, "train/all/utilization@log_window": 0.5, "val/de/loss": 2.0, "odd/a/b/c": 1},
        {"step": 2, "train/all/utilization@log_window": 0.7, "train/layer0/utilization": 0.1},
        {"step": 2, "val/all/utilization": 0.9, "val/zh/loss": 3.0, "val/zh/ppl": 20.0},
    ]
    assert names.series(records, "utilization") == {
        "train/all/utilization@log_window": ([1, 2], [0.5, 0.7]),
        "val/all/utilization": ([2], [0.9]),
    }
    assert names.series(records, "utilization", layer=0) == {
        "train/layer0/utilization": ([2], [0.1])
    }
    assert names.val_domains(records) == ["de", "zh"]


def _counts(L=2, D=2, E=4):
    return np.arange(1, L * D * E + 1).reshape(L, D, E)


def test_metrics_log_writes_jsonl_and_counts(tmp_path):
    rd = RunDir(tmp_path / "run")
    log = sinks.MetricsLog(rd)
    log.write({"step": 1, "loss": 2.5})
    c = _counts()
    log.write_counts(1, requested_LDE=c, kept_LDE=c, weight_sum_LDE=c, domains=["a", "b"])
    log.close()
    assert rd.read_metrics() == [{"step": 1, "loss": 2.5}]
    assert rd.list_counts() == [1] and not (rd.path / "tensorboard").exists()
    # ranks other than 0 write nothing
    idle = sinks.MetricsLog(RunDir(tmp_path / "other"), active=False)
    idle.write({"step": 1, "loss": 2.5})
    idle.write_counts(1, requested_LDE=c, kept_LDE=c, weight_sum_LDE=c)
    assert not (tmp_path / "other").exists()


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    # What an environment without the tensorboard package sees: the import fails.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError) as err:
        sinks.require_tensorboard()
    message = str(err.value)
    assert "pip install 'moe-testbed[tensorboard]'" in message and "\n" not in message
    with pytest.raises(ImportError, match=r"moe-testbed\[tensorboard\]"):
        sinks.MetricsLog(RunDir(tmp_path), tensorboard=True)
    # a rank that does not write never needs the package
    sinks.MetricsLog(RunDir(tmp_path), tensorboard=True, active=False)


def test_tensorboard_sink_writes_scalars_and_heatmaps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = RunDir(tmp_path / "run")
    log = sinks.MetricsLog(rd, tensorboard=True)
    records = [
        {"step": 1, "loss": 3.0, "train/all/utilization@log_window": 0.5},
        {"step": 2, "loss": 2.0, "val/de/loss": 2.5, "val/layer1/purity": 0.75},
    ]
    for r in records:
        log.write(r)
    c = _counts()
    log.write_counts(2, requested_LDE=c, kept_LDE=c, weight_sum_LDE=c, domains=["de", "zh"])
    log.close()
    events = EventAccumulator(str(rd.path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = {k for r in records for k in r if k != "step"}
    assert set(events.Tags()["scalars"]) == logged
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0)]
    assert events.Scalars("val/layer1/purity")[0].value == pytest.approx(0.75)
    heatmaps = {"val/layer0/routing_heatmap", "val/layer1/routing_heatmap"}
    assert set(events.Tags()["images"]) == heatmaps
    image = events.Images("val/layer0/routing_heatmap")[0]
    assert image.step == 2 and image.width > 100 and image.height > 50
