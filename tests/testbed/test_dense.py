"""Dense baselines (Fan et al. 2024): widths, parameter counts, a short run and its report; the
tiny_e16k4 preset with every balancing method at top-4."""

from __future__ import annotations

import json

import pytest
import torch

from moe_testbed import report
from moe_testbed.config import PRESET_MOE, ConfigError, default_moe, get_preset, validate
from moe_testbed.model import DenseFFN, MoETransformer
from moe_testbed.presets import dense_width, param_counts
from moe_testbed.train import train


def _sizes(dense: str, moe_every: int = 1):
    m = get_preset("tiny")
    m.vocab_size, m.dense, m.moe_every = 256, dense, moe_every
    return m, default_moe()


@pytest.mark.parametrize("moe_every", [1, 2])
def test_dense_parameter_counts(moe_every):
    moe_m, moe = _sizes("none", moe_every)
    counts = {
        d: param_counts(*_sizes(d, moe_every)) for d in ("none", "equal_active", "equal_total")
    }
    router = (
        moe_m.d_model * moe.num_experts * sum(moe_m.is_moe_layer(i) for i in range(moe_m.n_layers))
    )
    # equal_active: the MoE model's active parameters less its routers; equal_total: its total
    assert counts["equal_active"]["total"] == counts["equal_active"]["active"]
    assert counts["equal_active"]["active"] == counts["none"]["active"] - router
    assert counts["equal_total"]["total"] == counts["none"]["total"] - router
    assert counts["equal_total"]["active"] == counts["equal_total"]["total"]
    for dense in ("equal_active", "equal_total"):
        m, moe = _sizes(dense, moe_every)
        model = MoETransformer(m, moe)
        assert model.moe_layers() == []
        n = model.num_params()
        assert n["total"] == counts[dense]["total"] and n["active"] == counts[dense]["active"]
        widths = {b.ffn.w2.in_features for b in model.blocks}
        k_or_e = moe.top_k if dense == "equal_active" else moe.num_experts
        want = {k_or_e * m.d_ff_expert} | ({m.d_ff_dense} if moe_every > 1 else set())
        assert widths == want
        assert all(isinstance(b.ffn, DenseFFN) for b in model.blocks)


def test_dense_width_counts_shared_experts():
    m, _ = _sizes("equal_active")
    moe = default_moe(shared_experts=1)
    assert dense_width(m, moe) == 3 * m.d_ff_expert
    m.dense = "equal_total"
    assert dense_width(m, moe) == 9 * m.d_ff_expert
    m.dense = "none"
    assert dense_width(m, moe) is None


def test_dense_rejects_unknown_value(tiny_cfg):
    cfg = tiny_cfg(model={"dense": "half"})
    with pytest.raises(ConfigError, match=r"model.dense must be one of .*'half'"):
        validate(cfg, resources=False)


def test_dense_run_writes_metrics_and_report(tiny_cfg, tmp_path):
    cfg = tiny_cfg(steps=3, eval_every=3, model={"dense": "equal_active"})
    cfg.train.probes = True  # asked for, but a dense model has nothing to probe
    final = train(cfg, tmp_path / "run")
    assert "val/loss" in final and final["loss"] > 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*recs)
    assert "loss" in keys and "val/loss" in keys
    routing = [k for k in keys if "layer" in k or "max_violation" in k or k == "aux_loss"]
    assert routing == []  # absent, not zero
    ev = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert ev["val_loss"] > 0 and ev["metrics"] == {}  # validation loss, no routing metrics
    paths = report.make_report(tmp_path / "run")
    assert any(p.name == "summary.md" for p in paths)


def test_preset_e16k4_same_parameters_as_tiny():
    m = get_preset("tiny_e16k4")
    moe = default_moe(**PRESET_MOE["tiny_e16k4"])
    assert (moe.num_experts, moe.top_k) == (16, 4)
    tiny = param_counts(get_preset("tiny"), default_moe())
    e16 = param_counts(m, moe)
    routers = m.d_model * 8 * m.n_layers  # 16 router rows per layer instead of 8
    assert e16["total"] == tiny["total"] + routers
    assert e16["active"] == tiny["active"] + routers


@pytest.mark.parametrize(
    "balance,scope",
    [
        ("aux", "global_batch"),
        ("aux_free", "global_batch"),
        ("sinkhorn", "sequence"),
        ("sinkhorn", "micro_batch"),
        ("assignment", "sequence"),
        ("assignment", "micro_batch"),
        ("none", "micro_batch"),
    ],
)
def test_every_balance_trains_with_top_4(tiny_cfg, tmp_path, balance, scope):
    torch.manual_seed(0)
    moe = {**PRESET_MOE["tiny_e16k4"], "balance": balance, "scope": scope}
    cfg = tiny_cfg(steps=2, grad_accum=2, moe=moe, model={"d_ff_expert": 16})
    final = train(cfg, tmp_path / "run")
    assert final["loss"] == pytest.approx(final["loss"]) and final["loss"] > 0  # finite
    vio = final["train/layer0/max_violation@micro_batch"]
    if balance == "assignment":  # 64 tokens x 4 slots: exactly 16 per expert, per micro-batch
        assert vio == 0
    else:
        assert vio >= 0


def _resolve(argv: list[str]):
    from moe_testbed import cli
    from moe_testbed.flags import resolve

    return resolve(cli.build_parser().parse_args(["train", *argv]))


def test_flags_preset_e16k4_dense_and_sinkhorn_scope():
    cfg = _resolve(["--preset", "tiny_e16k4"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.model.d_ff_expert) == (16, 4, 64)
    cfg = _resolve(["--preset", "tiny_e16k4", "--top-k", "2", "--dense", "equal_total"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.model.dense) == (16, 2, "equal_total")
    assert _resolve(["--balance", "sinkhorn", "--scope", "sequence"]).moe.balance == "sinkhorn"
    with pytest.raises(ConfigError, match=r"moe.scope: .*got 'global_batch'") as e:
        _resolve(["--balance", "sinkhorn"])  # the testbed's default scope is global_batch
    assert e.value.field == "moe.scope"


def test_dense_run_resumes(tiny_cfg, tmp_path):
    train(tiny_cfg(steps=2, ckpt_every=2, model={"dense": "equal_total"}), tmp_path / "run")
    final = train(tiny_cfg(steps=4, ckpt_every=2, model={"dense": "equal_total"}), tmp_path / "run")
    assert final["step"] == 4
    history = (tmp_path / "run" / "history.jsonl").read_text()
    assert "resume" in history
