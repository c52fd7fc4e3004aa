"""On-device routing statistics: counts by label x expert, sums, read/reset, layer stacking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_kernels import MoE, stats, update_routers

D, FF, E, K, G = 8, 16, 4, 2, 3


def test_counts_and_sums_match_manual():
    torch.manual_seed(0)
    m = MoE(D, FF, E, K, capacity_factor=0.5)
    x = torch.randn(2, 6, D)
    labels = torch.randint(0, G, (2, 6))
    labels[1, -1] = -1  # padding: ignored
    stats.enable(m, num_labels=G)
    m(x, labels=labels)
    s = stats.read(m, reset=False)
    with torch.no_grad():
        dec = m.router(x)
    plan = m._plan(dec, 12)
    lab = labels.reshape(-1)
    req = np.zeros((G, E), dtype=np.int64)
    kept = np.zeros((G, E), dtype=np.int64)
    wsum = np.zeros((G, E), dtype=np.float32)
    for t in range(12):
        for k in range(K):
            if lab[t] < 0:
                continue
            e = int(dec.experts_TK[t, k])
            req[lab[t], e] += 1
            wsum[lab[t], e] += float(dec.weights_TK[t, k])
            kept[lab[t], e] += int(plan.slot_row_TK[t, k] >= 0)
    assert (s["requested_LDE"][0] == req).all()
    assert (s["kept_LDE"][0] == kept).all() and kept.sum() < req.sum()  # capacity dropped some
    np.testing.assert_allclose(s["weight_sum_LDE"][0], wsum, rtol=1e-5, atol=1e-6)
    p = dec.scores_TE[lab >= 0]
    ent = (-(p * p.log()).sum(-1) / math.log(E)).sum().item()
    assert s["entropy_sum_L"][0] == pytest.approx(ent, rel=1e-5)
    assert s["max_prob_sum_L"][0] == pytest.approx(p.max(-1).values.sum().item(), rel=1e-5)
    assert s["tokens_L"].tolist() == [11]
    assert s["bias_LE"] is None
    assert s["requested_LDE"].dtype == np.int64 and s["weight_sum_LDE"].dtype == np.float32


def test_read_resets_and_accumulates():
    m = MoE(D, FF, E, K)
    stats.enable(m, num_labels=1)
    x = torch.randn(5, D)
    m(x)
    m(x)  # no labels: everything counts as label 0
    s = stats.read(m)
    assert s["tokens_L"].tolist() == [10] and s["requested_LDE"].sum() == 20
    assert stats.read(m)["tokens_L"].tolist() == [0]  # reset by the previous read
    stats.disable(m)
    m(x)
    with pytest.raises(ValueError, match="stats.enable"):
        stats.read(m)


def test_stacked_over_layers_with_bias():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        MoE(D, FF, E, K, balance="aux_free", bias_rate=0.1), MoE(D, FF, E, K, balance="aux")
    )
    stats.enable(model, num_labels=G)
    x = torch.randn(7, D)
    labels = torch.randint(0, G, (7,))
    for m in model:
        x = x + m(x, labels=labels)
    update_routers(model)
    s = stats.read(model)
    assert s["requested_LDE"].shape == (2, G, E) and s["entropy_sum_L"].shape == (2,)
    assert s["bias_LE"].shape == (2, E)
    np.testing.assert_allclose(s["bias_LE"][0], model[0].bias_E.numpy())
    assert (s["bias_LE"][1] == 0).all()  # a layer without aux-free bias reads as zeros


def test_enable_errors():
    with pytest.raises(ValueError, match="num_labels"):
        stats.enable(MoE(D, FF, E, K), num_labels=0)
    with pytest.raises(ValueError, match="model"):
        stats.enable(torch.nn.Linear(2, 2))
