"""Command line and config: --help, clear errors for bad flags, file/flag precedence, round trip."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

import pytest
import yaml

from moe_kernels import MoEConfig
from moe_testbed import cli
from moe_testbed.config import SECTIONS, RunConfig, save
from moe_testbed.flags import load_file, resolve


def _resolve(argv: list[str]) -> RunConfig:
    args = cli.build_parser().parse_args(["train", *argv])
    return resolve(args)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "usage: moe-testbed" in capsys.readouterr().out


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            listed = "--" + f.name.replace("_", "-") in text
            assert listed != bool(f.metadata.get("replaced_by")), f.name  # replaced: not listed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--router", "oracle"], "--router must be one of"),
        (["--top-k", "two"], "--top-k must be int"),
        (["--capacity-factor", "x"], "--capacity-factor must be float"),
        (["--scope", "batch"], "--scope must be one of"),
    ],
)
def test_bad_flags_exit_with_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_in_file_and_cross_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe: {routr: learned}\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(bad)])
    assert "unknown field moe.routr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--top-k", "9"])
    assert "moe.top_k must be in [1, num_experts=8]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "huge"])
    assert "unknown preset" in capsys.readouterr().err


def test_precedence_preset_file_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "preset": "small",
                "moe": {"router": "hash", "top_k": 1},
                "train": {"steps": 7, "lr": 1e-4},
            }
        )
    )
    cfg = _resolve(
        ["--config", str(f), "--top-k", "2", "--capacity-factor", "1.25", "--no-normalize"]
    )
    assert cfg.preset == "small" and cfg.model.d_model == 256  # from the preset named in the file
    assert cfg.moe.router == "hash" and cfg.train.steps == 7 and cfg.train.lr == 1e-4  # file
    assert cfg.moe.top_k == 2 and cfg.moe.capacity_factor == 1.25  # flags win
    assert cfg.moe.normalize is False
    assert _resolve(["--capacity-factor", "none"]).moe.capacity_factor is None


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = _resolve(
        [
            "--router",
            "reference",
            "--num-groups",
            "4",
            "--balance",
            "aux_free",
            "--scope",
            "micro_batch",
            "--bias-rule",
            "mean_centred",
            "--moe-every",
            "2",
            "--deterministic",
            "--steps",
            "3",
        ]
    )
    path = tmp_path / ("config" + suffix)
    save(cfg, path)
    again = RunConfig.from_dict(load_file(path))
    assert again == cfg
    # and through the CLI: the saved file reproduces the config
    assert _resolve(["--config", str(path)]) == cfg
    if suffix == ".json":
        assert json.loads(path.read_text())["moe"]["router"] == "reference"


def _train_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_moe_config_field_is_a_flag():
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(MoEConfig):
        assert f"moe.{f.name}" in actions, f"MoEConfig.{f.name} has no moe-testbed train flag"
        assert "--" + f.name.replace("_", "-") in actions[f"moe.{f.name}"].option_strings
        choices = f.metadata.get("choices")
        if choices:  # the accepted values are the field's own
            assert all(str(c) in actions[f"moe.{f.name}"].metavar for c in choices)


def test_every_train_flag_has_help_beyond_its_default():
    for action in _train_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = re.sub(r"\(default [^)]*\)", "", action.help or "").strip()
        assert len(text) >= 8, f"{action.option_strings[0]} has no description: {action.help!r}"


def test_moe_config_is_validated_after_overrides(capsys):
    with pytest.raises(ValueError, match="moe.balance"):
        RunConfig.from_dict({"moe": {"router": "hash", "balance": "aux_free"}})
    with pytest.raises(SystemExit):
        cli.main(["train", "--router", "hash", "--balance", "aux_free"])
    assert "moe.balance" in capsys.readouterr().err
    # the reference router's group count may wait for the corpus (the trainer sets it) ...
    assert _resolve(["--router", "reference"]).moe.num_groups is None
    # ... but a given one is checked at once
    with pytest.raises(SystemExit):
        cli.main(["train", "--router", "reference", "--num-groups", "3"])
    assert "moe.num_groups" in capsys.readouterr().err
    assert RunConfig().moe.scope == "global_batch"  # the testbed's default, not the layer's


def test_train_tensorboard_without_the_package_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    rc = cli.main(["train", "--tensorboard", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "run").exists()
    assert err.count("\n") == 1 and "pip install 'moe-testbed[tensorboard]'" in err
