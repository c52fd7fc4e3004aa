"""Command line and config: --help, clear errors for bad flags, file/flag precedence, round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from moe_testbed import cli
from moe_testbed.config import SECTIONS, RunConfig, load_file, resolve, save


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
            assert "--" + f.name.replace("_", "-") in text


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
