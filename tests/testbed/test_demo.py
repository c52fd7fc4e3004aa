"""The demo's configs and its printed reading, which must follow the numbers of its table."""

from __future__ import annotations

import math

import pytest

from moe_testbed import demo


def _run(corrected, se=0.01, step0=0.02, floor=0.2, util=0.95, loss=5.0):
    return {
        "value": corrected,
        "se": se,
        "corrected": corrected,
        "step0": step0,
        "floor": floor,
        "utilization": util,
        "val_loss": loss,
    }


def _results(seq, glo):
    return {
        "reference": _run(1.0),
        "hash": _run(0.02),
        "learned_sequence": seq,
        "learned_global": glo,
    }


def test_configs_differ_only_in_routing_and_balance_scope():
    cfgs = {name: demo.demo_config(name, 10) for name in demo.RUNS}
    assert cfgs["learned_sequence"].moe.scope == "sequence"
    assert cfgs["learned_global"].moe.scope == "global_batch"
    for cfg in cfgs.values():
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (4, 4)
        assert cfg.train.eval_every == cfg.train.steps == 10  # evaluation.json at the end
    a, b = cfgs["learned_sequence"].to_dict(), cfgs["learned_global"].to_dict()
    a["moe"].pop("scope"), b["moe"].pop("scope")
    assert a == b


def test_reading_names_the_wider_scope_when_the_gap_exceeds_the_noise():
    text = demo.reading(_results(_run(0.10), _run(0.30)))
    assert "Balancing scope matters" in text
    assert "over the global-batch scope specializes more than at sequence scope" in text
    assert "0.300 global vs 0.100 sequence" in text
    flipped = demo.reading(_results(_run(0.30), _run(0.10)))
    assert "over the sequence scope specializes more than at global-batch scope" in flipped


def test_reading_says_so_when_the_scopes_cannot_be_told_apart():
    text = demo.reading(_results(_run(0.20, se=0.02), _run(0.22, se=0.02)))
    assert "cannot be told apart" in text and "Balancing scope matters" not in text


def test_reading_places_each_run_against_its_floor():
    text = demo.reading(_results(_run(0.10, floor=0.25), _run(0.35, floor=0.25)))
    assert "to 0.350, above the 0.250" in text
    assert "to 0.100, below the 0.250" in text


def test_reading_says_whether_utilization_is_matched():
    assert "about equally" in demo.reading(_results(_run(0.1, util=0.93), _run(0.3, util=0.96)))
    text = demo.reading(_results(_run(0.1, util=0.70), _run(0.3, util=0.95)))
    assert "Their utilization differs" in text and "about equally" not in text


def test_table_shows_missing_values_as_dashes():
    r = _results(_run(0.1), _run(0.2))
    r["hash"]["floor"] = math.nan
    t = demo.table(r)
    assert t.splitlines()[0].startswith("| run | spec corrected")
    assert "| hash | 0.020 | 0.010 | 0.020 | — |" in t


def test_zero_steps_is_refused_before_training(tmp_path):
    from moe_testbed.config import ConfigError

    with pytest.raises(ConfigError):
        demo.run_demo(tmp_path, steps=0)
    assert not any(tmp_path.iterdir())
