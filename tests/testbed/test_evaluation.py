"""The evaluation pass: validation set, step-0 model, capacity on mixed batches, evaluation.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RUN

from moe_kernels import stats
from moe_testbed import evaluation
from moe_testbed.cli import main
from moe_testbed.config import RunConfig
from moe_testbed.data.dataset import BatchLoader, validation_sequences
from moe_testbed.sources import build_data
from moe_testbed.train import Trainer, train


def _corpus_cfg(**data) -> RunConfig:
    cfg = RunConfig.from_dict(RUN)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_interleaved_order_takes_domains_round_robin():
    dom = torch.tensor([0, 0, 0, 1, 1, 2])
    order = evaluation.interleaved(dom)
    assert dom[order].tolist() == [0, 1, 2, 0, 1, 0]
    assert sorted(order.tolist()) == list(range(6))


def test_validation_set_is_independent_of_the_micro_batch_size(one_thread):
    a = build_data(_corpus_cfg(), 0, 1)
    cfg = _corpus_cfg()
    cfg.train.micro_batch_size = 16
    b = build_data(cfg, 0, 1)
    ta, da = a.val_sequences()
    tb, db = b.val_sequences()
    assert torch.equal(ta, tb) and torch.equal(da, db)
    assert (da == 0).sum() == 256 // 32  # eval_tokens / seq_len windows per domain


def test_data_seed_not_train_seed_sets_split_and_tokenizer(one_thread):
    a = _corpus_cfg()
    b = _corpus_cfg()
    b.train.seed = 1
    da, db = build_data(a, 0, 1), build_data(b, 0, 1)
    assert da.vocab_size == db.vocab_size
    assert torch.equal(da.val_sequences()[0], db.val_sequences()[0])
    dc = build_data(_corpus_cfg(data_seed=1), 0, 1)
    assert not torch.equal(da.val_sequences()[0], dc.val_sequences()[0])


def test_spread_windows_cover_the_whole_stream(one_thread):
    data = build_data(_corpus_cfg(), 0, 1)
    first = validation_sequences(data.val_set, 3)
    spread = validation_sequences(data.val_set, 3, spread=True)
    for name in data.domains:
        stream = np.asarray(data.val_set.tokens[name])
        total = len(stream) // 33
        last = stream[(total - 1) * 33 : total * 33]
        assert np.array_equal(spread[name][-1].numpy(), last)
        assert np.array_equal(first[name][0].numpy(), spread[name][0].numpy())


def test_single_domain_micro_batches(one_thread):
    data = build_data(_corpus_cfg(), 0, 1)
    loader = BatchLoader(data.train_set, 8, seed=0, mixing="single")
    for step in range(5):
        _, labels = loader.batch(step)
        assert labels.unique().numel() == 1
    mixed = BatchLoader(data.train_set, 8, seed=0)
    assert any(mixed.batch(s)[1].unique().numel() > 1 for s in range(5))
    with pytest.raises(ValueError, match="mixing"):
        BatchLoader(data.train_set, 8, mixing="some")


def test_step0_model_is_the_trainers_initial_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg(steps=1, seed=3)
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        fresh = evaluation.initial_model(cfg).state_dict()
        for k, v in trainer.raw.state_dict().items():
            assert torch.equal(v.cpu(), fresh[k]), k
    finally:
        trainer.close()


def test_eval_capacity_applies_to_mixed_domain_batches(tiny_cfg):
    """The reference router sends every token of a domain to its group: a single-domain batch
    overflows the group (half the selections dropped at capacity factor 1), an interleaved
    batch of all domains does not."""
    cfg = tiny_cfg(
        moe={
            "router": "reference",
            "num_groups": 8,
            "top_k": 1,
            "capacity_factor": 1.0,
            "balance": "none",
        }
    )
    cfg.data.eval_batch_size = 8
    data = build_data(cfg, 0, 1)
    model = evaluation.initial_model(cfg)
    stats.enable(model, num_labels=8)
    tokens, dom = data.val_sequences()
    evaluation.forward_pass(model, cfg, torch.device("cpu"), tokens, dom)
    s = stats.read(model)
    mixed_drop = 1 - s["kept_LDE"].sum() / s["requested_LDE"].sum()
    one = dom == 0
    cfg.data.eval_batch_size = int(one.sum())
    evaluation.forward_pass(model, cfg, torch.device("cpu"), tokens[one], dom[one])
    s = stats.read(model)
    single_drop = 1 - s["kept_LDE"].sum() / s["requested_LDE"].sum()
    assert mixed_drop == pytest.approx(0.0)
    assert single_drop > 0.5


@pytest.mark.parametrize("router", ["learned", "expert_choice", "hash"])
def test_pass_counts_are_the_selections_the_stats_count(tiny_cfg, router):
    """Per-sequence counts summed by domain equal the layers' own statistics (expert choice:
    the pairs the experts took, not every expert of every token)."""
    cfg = tiny_cfg(moe={"router": router, "balance": "none"})
    data = build_data(cfg, 0, 1)
    model = evaluation.initial_model(cfg)
    stats.enable(model, num_labels=8)
    tokens, dom = data.val_sequences()
    run = evaluation.forward_pass(model, cfg, torch.device("cpu"), tokens, dom)
    want = stats.read(model)["requested_LDE"]
    got = evaluation.chance.domain_counts(run.counts_LNE, run.domain_N, 8)
    np.testing.assert_array_equal(got, want)
    assert "selection" not in vars(model.moe_layers()[0].router)  # the class's method again


def _chance(path):
    return json.loads((path / "evaluation.json").read_text())


def test_training_writes_evaluation_json_reference_corrects_to_one(tiny_cfg, tmp_path):
    cfg = tiny_cfg(steps=2, eval_every=2, moe={"router": "reference", "num_groups": 8, "top_k": 1})
    train(cfg, tmp_path / "ref")
    ev = _chance(tmp_path / "ref")
    spec = ev["metrics"]["specialization_score"]
    assert spec["value"] == pytest.approx(1.0)
    assert spec["corrected"] == pytest.approx(1.0)
    assert spec["step0"] == pytest.approx(1.0)  # the reference router needs no training
    for key in ("null_mean", "null_p95", "se", "floor", "floor_corrected", "step0_corrected"):
        assert np.isfinite(spec[key]), key
    assert ev["windows_per_domain"] == 64 // 16 and ev["router"] == "reference"
    assert set(ev["step0"]["metrics"]) == set(ev["metrics"])


def test_random_router_value_is_the_mean_over_draws(tiny_cfg, tmp_path):
    cfg = tiny_cfg(steps=2, eval_every=2, moe={"router": "random"})
    train(cfg, tmp_path / "rnd")
    ev = _chance(tmp_path / "rnd")
    spec = ev["metrics"]["specialization_score"]
    assert spec["value"] == pytest.approx(spec["floor"])  # the random router over draws
    assert ev["floor_draws"] == 8


def test_evaluate_command_on_an_old_run_dir(tiny_cfg, tmp_path, capsys):
    """A run directory written before eval_tokens/data_seed existed: defaults for the new
    fields, and its training seed as data seed (it split its data with that seed)."""
    run = tmp_path / "old"
    train(tiny_cfg(steps=2, seed=3), run)
    saved = json.loads((run / "config.json").read_text())
    for k in ("eval_tokens", "eval_batch_size", "data_seed", "batch_domains"):
        del saved["data"][k]
    (run / "config.json").write_text(json.dumps(saved))
    rc = main(
        ["evaluate", str(run), "--eval-tokens", "32", "--permutations", "10", "--floor-draws", "2"]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("evaluation.json")
    ev = _chance(run)
    assert ev["data_seed"] == 3 and ev["eval_tokens"] == 32 and ev["permutations"] == 10
    assert ev["windows_per_domain"] == 2 and ev["step"] == 2
    assert 0.0 <= ev["metrics"]["nmi"]["value"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--permutations", "0"], "permutations"),
        (["--eval-tokens", "0"], "eval_tokens"),
        (["--floor-draws", "-1"], "floor_draws"),
    ],
)
def test_evaluate_command_rejects_bad_arguments(tiny_cfg, tmp_path, capsys, args, message):
    run = tmp_path / "r"
    train(tiny_cfg(steps=1), run)
    assert main(["evaluate", str(run), *args]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_command_without_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none")]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_report_and_compare_show_the_chance_tables(tiny_cfg, tmp_path):
    from moe_testbed.report import compare, make_report

    runs = []
    for seed in (0, 1):
        run = tmp_path / f"learned-s{seed}"
        train(tiny_cfg(steps=2, eval_every=2, seed=seed), run)
        runs.append(run)
    make_report(runs[0])
    summary = (runs[0] / "report" / "summary.md").read_text()
    assert "## Against chance" in summary and "specialization_score" in summary
    compare(runs, tmp_path / "cmp")
    text = (tmp_path / "cmp" / "compare.md").read_text()
    chance_part = text.split("## Against chance")[1]
    assert "spec corrected" in chance_part and "(n=2)" in chance_part  # two training seeds
    other = tmp_path / "learned-data1"
    cfg = tiny_cfg(steps=2, eval_every=2)
    cfg.data.data_seed = 1
    train(cfg, other)
    compare([*runs, other], tmp_path / "cmp2")
    rows = (tmp_path / "cmp2" / "compare.md").read_text().split("## Against chance")[1]
    assert "(n=1)" in rows  # another data seed is not a seed of the same config


def test_resuming_a_run_saved_before_data_seed_keeps_its_data_seed():
    from moe_testbed.checkpoint import resume_changes, resume_kind

    saved = RunConfig().to_dict()
    saved["train"]["seed"] = 3
    del saved["data"]["data_seed"]
    cfg = RunConfig()
    cfg.train.seed = 3
    assert resume_changes(saved, cfg) == {"data.data_seed": (3, 0)}
    assert resume_kind("data.data_seed") == "fixed"
    cfg.data.data_seed = 3
    assert resume_changes(saved, cfg) == {}
