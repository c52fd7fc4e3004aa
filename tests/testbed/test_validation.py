"""One validation pass before any work, and one line per user error: every config field,
every command, the data preparation and the layer's label/token-id checks."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from moe_kernels import MoE
from moe_testbed import cli, report
from moe_testbed.config import ConfigError, RunConfig, validate
from moe_testbed.data.prepare import prepare_from_dir
from moe_testbed.rundir import RunDir
from moe_testbed.train import train


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and one line on stderr; return that line."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _corpus(path, docs: dict[str, int]):
    """A corpus directory with ``docs[name]`` documents per domain."""
    path.mkdir()
    manifest = {"format": 1, "domains": {}, "unavailable": {}}
    for name, n in docs.items():
        with gzip.open(path / f"{name}.jsonl.gz", "wt") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} document {i} " * 20, "src": "t"}) + "\n")
        manifest["domains"][name] = {"file": f"{name}.jsonl.gz", "documents": n, "sha256": "0"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


# Every case: the flags, the flag the error must name and a piece of the expected/actual text.
BAD_TRAIN_FLAGS = [
    (["--lr", "nan"], "--lr", "finite number > 0, got nan"),
    (["--lr", "0"], "--lr", "got 0.0"),
    (["--seq-len", "0"], "--seq-len", ">= 1, got 0"),
    (["--capacity-factor", "0"], "--capacity-factor", "a number > 0, got 0.0"),
    (["--capacity-factor", "-1"], "--capacity-factor", "got -1.0"),
    (["--jitter", "1.5"], "--jitter", "[0, 1), got 1.5"),
    (["--aux-coef", "-0.1"], "--aux-coef", "got -0.1"),
    (["--router", "reference", "--num-groups", "3"], "--num-groups", "got 3"),
    (["--router", "reference", "--num-groups", "4"], "--num-groups", "number of domains (11"),
    (["--router", "reference", "--domains", "de,en_lit,zh"], "--num-groups", "got 3"),
    (["--data-dir", "/nonexistent/corpus"], "--data-dir", "'/nonexistent/corpus'"),
    (["--domains", "en_lit,klingon"], "--domains", "['klingon']"),
    (["--domains", "en_lit,en_lit"], "--domains", "['en_lit'] repeated"),
    (["--data-dir", "synthetic", "--domains", "en_lit"], "--domains", "got 'en_lit'"),
    (["--vocab-size", "100"], "--vocab-size", ">= data.tokenizer_vocab (4096), got 100"),
    (["--tokenizer-vocab", "100"], "--tokenizer-vocab", "[512, 65536], got 100"),
    (["--eval-batches", "4"], "--eval-batches", "no longer used (got 4); give --eval-tokens"),
    (["--steps", "0"], "--steps", ">= 1, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size", "got 0"),
    (["--grad-accum", "-1"], "--grad-accum", "got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps", "got -1"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio", "[0, 1], got 2.0"),
    (["--beta2", "1"], "--beta2", "[0, 1), got 1.0"),
    (["--grad-clip", "inf"], "--grad-clip", "got inf"),
    (["--seed", "-1"], "--seed", "got -1"),
    (["--log-every", "-5"], "--log-every", "got -5"),
    (["--d-model", "30"], "--n-heads", "d_model (30)"),
    (["--top-k", "9"], "--top-k", "moe.top_k must be in [1, num_experts=8], got 9"),
    (["--device", "tpu"], "--device", "got 'tpu'"),
    (["--device", "cuda:99"], "--device", "got 'cuda:99'"),
    (["--rope-theta", "-1"], "--rope-theta", "got -1.0"),
    (["--preset", "huge"], "--preset", "unknown preset 'huge'"),
]


@pytest.mark.parametrize("argv, flag, text", BAD_TRAIN_FLAGS)
def test_bad_train_flag_is_one_line_naming_flag_expected_and_actual(
    argv, flag, text, capsys, tmp_path
):
    line = _one_line_error(capsys, ["train", "--out", str(tmp_path / "run"), *argv])
    assert line.startswith(f"moe-testbed train: error: {flag}: "), line
    assert text in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", "--device", "cuda", "--out", str(tmp_path / "r")])
    assert "--device: " in line and "no CUDA device" in line and "got 'cuda'" in line


def test_corpus_problems_are_caught_before_loading(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(capsys, ["train", "--data-dir", str(empty)])
    assert line.startswith("moe-testbed train: error: --data-dir: ") and "manifest.json" in line
    corpus = _corpus(tmp_path / "c", {"a": 3, "b": 0})
    line = _one_line_error(capsys, ["train", "--data-dir", str(corpus), "--domains", "a,b"])
    assert "--domains: " in line and "'b'" in line and "empty" in line
    (corpus / "a.jsonl.gz").unlink()
    line = _one_line_error(capsys, ["train", "--data-dir", str(corpus), "--domains", "a"])
    assert "--domains: " in line and "no a.jsonl.gz" in line


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.yaml", "moe: {router: [unclosed\n", "bad.yaml is not valid YAML"),
        ("bad.json", '{"moe": ', "bad.json is not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("run.toml", "x = 1\n", "must end in .yaml, .yml or .json"),
        ("types.yaml", "train: {steps: many}\n", "--steps: "),
    ],
)
def test_bad_config_files_name_the_file(name, text, message, capsys, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    line = _one_line_error(capsys, ["train", "--config", str(path)])
    assert message in line
    line = _one_line_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in line and "not found" in line


def test_api_checks_types_and_ranges_of_every_section():
    for section, name, value, text in [
        ("train", "steps", "10", "train.steps must be int, got '10'"),
        ("train", "lr", True, "train.lr must be float, got True"),
        ("model", "d_model", 64.0, "model.d_model must be int, got 64.0"),
        ("data", "domains", 3, "data.domains must be str | None, got 3"),
        ("train", "dtype", "fp16", "train.dtype must be one of ['auto', 'fp32', 'bf16']"),
        ("moe", "z_coef", float("nan"), "moe.z_coef: expected a finite number >= 0, got nan"),
    ]:
        cfg = RunConfig()
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("|", r"\|")) as e:
            validate(cfg)
        assert e.value.field == f"{section}.{name}"


def test_train_api_validates_before_touching_the_run_directory(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="train.lr"):
        train(tiny_cfg(steps=2, lr=float("nan")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    argv = ["train", "--data-dir", "synthetic", "--steps", "1", "--out", str(tmp_path / "f")]
    line = _one_line_error(capsys, argv)
    assert "expected a run directory, got the file" in line


def test_debug_shows_the_traceback_and_unexpected_errors_say_so(capsys, tmp_path, monkeypatch):
    with pytest.raises(ConfigError):
        cli.main(["train", "--debug", "--lr", "nan"])
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", "--lr", "nan"])

    def broken(run_dir):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(report, "make_report", broken)
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "moe-testbed report: error: RuntimeError: boom second line (an unexpected error; "
        "--debug shows the traceback)\n"
    )
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["report", "--debug", str(tmp_path)])


def test_demo_steps_zero_is_an_error_not_200_steps(capsys, tmp_path):
    for steps in ("0", "-3"):
        line = _one_line_error(capsys, ["demo", "--steps", steps, "--out", str(tmp_path / "d")])
        assert line.startswith("moe-testbed demo: error: --steps: ") and f"got {steps}" in line
    assert not (tmp_path / "d").exists()


def test_prepare_mb_zero_is_an_error_on_every_path(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "prose.txt").write_text("a sentence of prose that is long enough to keep. " * 40)
    for argv in (
        ["data", "prepare", "--mb", "0", "--from-dir", str(src), "--out", str(tmp_path / "o")],
        ["data", "prepare", "--mb", "0", "--domains", "chat", "--out", str(tmp_path / "o")],
        ["data", "prepare", "--mb", "-1", "--from-dir", str(src), "--out", str(tmp_path / "o")],
        ["data", "prepare", "--mb", "nan", "--from-dir", str(src), "--out", str(tmp_path / "o")],
    ):
        line = _one_line_error(capsys, argv)
        assert line.startswith("moe-testbed data prepare: error: --mb: expected a positive")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="mb: expected a positive size in MB or None"):
        prepare_from_dir(src, tmp_path / "o", mb=0)
    m = prepare_from_dir(src, tmp_path / "o", quiet=True)  # no --mb: no cap
    assert m["domains"]["prose"]["documents"] >= 1


def test_corrupt_run_files_are_named(capsys, tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.append_metrics({"step": 1, "loss": 1.0})
    rd.config_path.write_text("{not json")
    line = _one_line_error(capsys, ["report", str(rd.path)])
    assert "config.json: not a valid JSON config" in line
    rd.config_path.write_text("{}")
    rd.counts_dir.mkdir()
    rd.counts_path(1).write_bytes(b"PK\x03\x04 truncated")
    line = _one_line_error(capsys, ["report", str(rd.path)])
    assert "step_0000001.npz: unreadable counts file" in line


def test_layer_refuses_labels_below_minus_one_and_negative_token_ids():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    ref = MoE(16, 16, 4, 1, router="reference", num_groups=2)
    ref(x, labels=torch.tensor([0, 1, -1, 0, 1, 0]))  # -1 (padding) is fine
    with pytest.raises(ValueError, match=r"labels: expected domain labels in \[-1, 2\), found -3"):
        ref(x, labels=torch.tensor([0, 1, -3, 0, 1, 0]))
    hashed = MoE(16, 16, 4, 1, router="hash", balance="none")
    hashed(x, token_ids=torch.arange(6))
    with pytest.raises(ValueError, match="token_ids: expected ids >= 0, found -2"):
        hashed(x, token_ids=torch.tensor([0, 1, -2, 3, 4, 5]))


def test_compare_and_report_of_missing_directories_are_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for argv in (["compare", str(tmp_path / "file")], ["report", str(tmp_path / "nope")]):
        assert "run directory not found" in _one_line_error(capsys, argv)
