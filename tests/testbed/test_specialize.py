"""specialize: the score, the budgeted selection, that only the selected experts change (tensor
by tensor), and the three selections end to end on a testbed run and on its HF export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_testbed import metrics
from moe_testbed.config import ModelConfig, default_moe
from moe_testbed.model import MoETransformer
from moe_testbed.specialize import (
    Subject,
    apply_selection,
    expert_tensors,
    finetune,
    random_selection,
    routing_layers,
    select_experts,
    specialization_scores,
    specialize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scores_sum_to_the_domains_routing_specialization():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 8))
    counts[0, 3] = 0  # 0 log 0 = 0
    s = specialization_scores(counts)
    rs = [metrics.routing_specialization(c[None]) for c in counts]
    np.testing.assert_allclose(s.sum(1), rs)
    # For experts used above 1/(eE) the score grows with the domain's share.
    q = counts / counts.sum(1, keepdims=True)
    top = np.argsort(-q, axis=1)[:, :3]
    assert (np.take_along_axis(s, top, 1) == -np.sort(-s, axis=1)[:, :3]).all()
    with pytest.raises(ValueError, match="counts_LE"):
        specialization_scores(np.zeros((2, 4)))


def test_selection_respects_the_budget_rank_by_rank():
    scores = np.array([[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.0, 0.4], [0.3, 0.3, 0.6, 0.1]])
    params = [10, 10, 20]
    chosen = select_experts(scores, params, budget_params=55)
    used = sum(len(c) * p for c, p in zip(chosen, params))
    assert used <= 55
    # Rank 1 of every layer (40), then rank 2 by score: layer 0 (0.5, +10) fits, layer 1
    # (0.4) does not fit after it.
    assert chosen == [[0, 2], [1], [2]]
    assert select_experts(scores, params, budget_params=1e9) == [
        list(np.argsort(-scores[i], kind="stable")) for i in range(3)
    ]
    with pytest.raises(ValueError, match="budget"):
        select_experts(scores, params, budget_params=5)
    rand = random_selection([2, 1, 1], 4, seed=0)
    assert [len(c) for c in rand] == [2, 1, 1] and all(len(set(c)) == len(c) for c in rand)


def test_only_the_selected_experts_change():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff_expert=8, seq_len=12)
    model = MoETransformer(m, default_moe(num_experts=4, top_k=2, expert_bias=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = [[1, 3], [2]]
    trained = apply_selection(model, chosen)
    per = [sum(p[0].numel() for p in expert_tensors(layer)) for layer in routing_layers(model)]
    assert trained == 2 * per[0] + per[1]
    subject = Subject(
        load=lambda: model, forward=lambda mod, x, lab: mod(x, lab), encode=None, sep=0,
        text="", domains=None, seq_len=12, seed=0, eval_tokens=0,
    )  # fmt: skip
    windows = torch.randint(0, 64, (6, 13))
    finetune(subject, model, windows, 0, steps=3, lr=1e-2, batch_size=2, seed=0)
    after = model.state_dict()
    expert_keys = {f"blocks.{i}.ffn.experts." for i in range(2)}
    for key, value in after.items():
        prefix = next((p for p in expert_keys if key.startswith(p)), None)
        if prefix is None:
            assert torch.equal(value, before[key]), f"{key} changed but is not selected"
            continue
        layer = int(key.split(".")[1])
        for e in range(4):
            same = torch.equal(value[e], before[key][e])
            assert same != (e in chosen[layer]), f"{key}[{e}]: selected={e in chosen[layer]}"


def test_three_selections_on_a_testbed_run(sample_run, tmp_path):
    res = specialize(
        str(sample_run), "de", budget=0.1, steps=2, batch_size=2, out=tmp_path, lr=1e-2
    )
    runs = {r["select"]: r for r in res["runs"]}
    assert list(runs) == ["dbes", "random", "all"]
    total = res["total_params"]
    assert runs["dbes"]["trained_params"] <= 0.1 * total
    assert runs["random"]["trained_params"] == runs["dbes"]["trained_params"]
    assert [len(c) for c in runs["random"]["experts"]] == [len(c) for c in res["selected"]]
    assert runs["all"]["trained_params"] == total
    for r in runs.values():
        assert set(r["val_loss"]) == {"de", "code_py", "legal"} and r["wall_s"] > 0
        assert r["target_change"] == pytest.approx(r["val_loss"]["de"] - res["base"]["de"])
    saved = json.loads((tmp_path / "specialize.json").read_text())
    assert saved["runs"][0]["select"] == "dbes"
    assert "| dbes |" in (tmp_path / "specialize.md").read_text()


def test_on_an_hf_model(sample_export):
    pytest.importorskip("transformers")
    res = specialize(
        str(sample_export), "legal", text="sample", domains="de,legal", select=["dbes"],
        steps=1, batch_size=2, seq_len=16, eval_tokens=32,
    )  # fmt: skip
    (run,) = res["runs"]
    assert 0 < run["trained_params"] <= 0.15 * res["total_params"]
    assert set(run["val_loss"]) == {"de", "legal"}


def test_bad_arguments(sample_run):
    with pytest.raises(ValueError, match="select"):
        specialize(str(sample_run), "de", select=["best"])
    with pytest.raises(ValueError, match="budget"):
        specialize(str(sample_run), "de", budget=0.0)
    with pytest.raises(ValueError, match="domain: 'fr'"):
        specialize(str(sample_run), "fr", steps=1)
    with pytest.raises(FileNotFoundError):
        specialize("/nonexistent/run", "de")
