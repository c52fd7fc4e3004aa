"""Load-balancing losses, scopes and the aux-loss-free bias, checked against hand computations."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from moe_kernels import MoE, stats, update_routers
from moe_kernels.balancing import (
    aux_free_update,
    selection_counts,
    sequence_aux_loss,
    switch_aux_loss,
    z_loss,
)

A = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]


def test_perfect_balance_is_one():
    # uniform scores and every expert chosen equally often
    E = 4
    probs = torch.full((8, E), 1 / E)
    counts = torch.tensor([4.0, 4, 4, 4])
    assert switch_aux_loss(probs, counts).item() == pytest.approx(1.0)
    # balanced counts make the value sum_i P_i = 1 whatever the scores
    probs = torch.softmax(torch.randn(8, E), -1)
    assert switch_aux_loss(probs, counts).item() == pytest.approx(1.0, abs=1e-6)


def test_skewed_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    counts = torch.tensor([2.0, 0.0])  # both tokens chose expert 0: f = [1, 0], P = [0.7, 0.3]
    assert switch_aux_loss(probs, counts).item() == pytest.approx(2 * 0.7)


def test_selection_counts_skip_negative():
    ex = torch.tensor([[0, 2], [2, -1]])  # -1 = a slot not taken (expert choice)
    assert selection_counts(ex, 3).tolist() == [[1, 0, 1], [0, 0, 1]]


def test_sequence_aux_by_hand():
    probs = torch.tensor([[[A, 1 - A], [A, 1 - A]], [[1 - A, A], [A, 1 - A]]])
    experts = torch.tensor([[[0], [0]], [[1], [0]]])
    # sequence 0: f = [1, 0], P = [A, 1-A] -> 2A; sequence 1: f = [.5, .5] -> 1
    assert sequence_aux_loss(probs, experts).item() == pytest.approx((2 * A + 1) / 2, rel=1e-6)


def test_empty_batch_gives_zero_losses():
    # T = 0 (an empty micro-batch): every loss is 0, not NaN
    assert switch_aux_loss(torch.zeros(0, 4), torch.zeros(4)).item() == 0.0
    assert sequence_aux_loss(torch.zeros(0, 3, 4), torch.zeros(0, 3, 2, dtype=torch.long)) == 0
    for scope in ("sequence", "micro_batch", "global_batch"):
        m = MoE(8, 16, 4, 2, scope=scope, capacity_factor=1.0)
        y = m(torch.randn(0, 3, 8))
        assert y.shape == (0, 3, 8) and m.aux_loss.item() == 0.0


def test_z_loss_by_hand():
    assert z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2)
    assert z_loss(torch.zeros(0, 2)).item() == 0.0  # T = 0


def test_aux_free_update_rules():
    counts = torch.tensor([3.0, 1, 0, 0])  # mean 1
    b = aux_free_update(torch.zeros(4), counts, 0.1, "sign")
    assert torch.allclose(b, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    b = aux_free_update(torch.zeros(4), counts, 0.1, "mean_centred")
    assert abs(b.mean().item()) < 1e-7 and b[0] < b[1] < b[2]


def _toy_layer(scope="micro_batch", balance="aux", **kw):
    """E=2, k=1, D=2 with router weight = identity, so logits = x and the choices are readable."""
    torch.manual_seed(0)
    m = MoE(2, 4, 2, 1, balance=balance, scope=scope, aux_coef=1.0, z_coef=0.0, **kw)
    with torch.no_grad():
        m.router.weight_ED.copy_(torch.eye(2))
    return m


SEQ0 = torch.tensor([[[2.0, 0], [2.0, 0]]])  # both tokens -> expert 0, scores [A, 1-A]
SEQ1 = torch.tensor([[[0.0, 2], [2.0, 0]]])  # experts 1 and 0


def test_layer_scopes_by_hand():
    x = torch.cat([SEQ0, SEQ1])
    m = _toy_layer("micro_batch")
    m(x)
    P0 = (2 * A + 1) / 4  # mean of A, A, 1-A, A
    expect = 2 * (0.75 * P0 + 0.25 * (1 - P0))  # counts [3, 1]
    assert m.aux_loss.item() == pytest.approx(expect, rel=1e-6)
    m = _toy_layer("sequence")
    m(x)
    assert m.aux_loss.item() == pytest.approx((2 * A + 1) / 2, rel=1e-6)


def test_global_scope_accumulates_micro_batches():
    m = _toy_layer("global_batch")
    m(SEQ0)
    assert m.aux_loss.item() == pytest.approx(2 * A, rel=1e-6)  # counts so far [2, 0]
    m(SEQ1)
    # counts of micro-batches 1..2 = [3, 1]; P of micro-batch 2 = [.5, .5]
    assert m.aux_loss.item() == pytest.approx(2 * (0.75 * 0.5 + 0.25 * 0.5), rel=1e-6)
    m(SEQ0)  # without a reset: counts [5, 1]
    assert m.aux_loss.item() == pytest.approx(2 * (5 * A + (1 - A)) / 6, rel=1e-6)
    update_routers(m)  # new optimizer step: accumulators reset
    m(SEQ0)
    assert m.aux_loss.item() == pytest.approx(2 * A, rel=1e-6)
    m.eval()  # evaluation passes do not accumulate (micro-batch value)
    m(SEQ1)
    m(SEQ1)
    assert m.aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_aux_loss_includes_z_loss():
    m = _toy_layer("micro_batch")
    m.config.z_coef = 0.5
    m(SEQ0)
    lse = math.log(math.exp(2) + 1)
    assert m.aux_loss.item() == pytest.approx(2 * A + 0.5 * lse**2, rel=1e-6)


@pytest.mark.parametrize("rule", ["sign", "mean_centred"])
def test_aux_free_bias_balances_skewed_router(rule):
    torch.manual_seed(0)
    E, D = 4, 8
    m = MoE(D, 8, E, 1, balance="aux_free", bias_rate=0.05, bias_rule=rule, z_coef=0.0)
    with torch.no_grad():  # a router that prefers expert 0 for nearly every token
        m.router.weight_ED.mul_(0.1)
        m.router.weight_ED[0] += 0.3
    x = torch.randn(64, D)
    w_before = m.router.weight_ED.detach().clone()
    first = None
    stats.enable(m, num_labels=1)
    for _ in range(40):
        m(x)
        update_routers(m)
        load = stats.read(m)["requested_LDE"][0, 0]
        first = load if first is None else first
    maxvio = lambda c: E * c.max() / c.sum() - 1
    print("load before", first, "after", load, "bias", m.bias_E.tolist())
    assert maxvio(load) < 0.5 * maxvio(first)
    assert torch.equal(m.router.weight_ED, w_before)  # the router itself did not change
    assert m.aux_loss.item() == 0.0  # no auxiliary loss with aux_free
    # gate weights are the unbiased scores (k = 1, normalised -> 1; check unnormalised too)
    m2 = MoE(D, 8, E, 2, balance="aux_free", normalize=False)
    m2.load_state_dict(m.state_dict(), strict=False)
    m2.bias_E.copy_(torch.tensor([-5.0, 5.0, 5.0, -5.0]))
    dec = m2.router(x, bias_E=m2.bias_E)
    assert set(dec.experts_TK.unique().tolist()) == {1, 2}  # selection follows the bias
    s = torch.softmax(m2.router.logits(x), -1)
    assert torch.allclose(dec.weights_TK, s.gather(1, dec.experts_TK.long()))
    if rule == "mean_centred":
        assert abs(m.bias_E.mean().item()) < 1e-6


def test_aux_free_global_window_sums_micro_batches():
    m = _toy_layer(scope="global_batch", balance="aux_free", bias_rate=1.0)
    m(SEQ0)
    m(SEQ1)  # window counts [3, 1] -> expert 0 down, expert 1 up
    update_routers(m)
    assert m.bias_E.tolist() == [-1.0, 1.0]
    m = _toy_layer(scope="micro_batch", balance="aux_free", bias_rate=1.0)
    m(SEQ0)
    m(torch.tensor([[[0.0, 2], [0.0, 2]]]))  # only the last micro-batch counts: [0, 2]
    update_routers(m)
    assert m.bias_E.tolist() == [1.0, -1.0]


# ---- two processes (gloo): global scope across data-parallel ranks -------------------------

E_DP, K_DP, D_DP = 4, 2, 6


def _dp_data():
    g = torch.Generator().manual_seed(123)
    # [rank][micro-batch] -> (B=2, S=3, D)
    return [[torch.randn(2, 3, D_DP, generator=g) for _ in range(2)] for _ in range(2)]


def _dp_layer(scope):
    torch.manual_seed(7)
    return MoE(D_DP, 8, E_DP, K_DP, scope=scope, aux_coef=1.0, z_coef=0.0)


def _dp_worker(rank, store_path, out_path):
    import torch.distributed as dist

    # A file store: no TCP port to race for with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        m = _dp_layer("global_batch")
        ddp = torch.nn.parallel.DistributedDataParallel(m)  # averages gradients over ranks
        stats.enable(m, num_labels=1)
        data = _dp_data()[rank]
        losses, grads = [], []
        for x in data:
            m.zero_grad()
            y = ddp(x)
            (m.aux_loss + 0 * y.sum()).backward()  # every parameter takes part (DDP needs it)
            losses.append(m.aux_loss.detach())
            grads.append(m.router.weight_ED.grad.clone())
        s = stats.read(m, all_reduce=True)
        torch.save(
            {"losses": losses, "grads": grads, "tokens": torch.from_numpy(s["tokens_L"])},
            f"{out_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_global_scope_two_processes_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        store = os.path.join(tmp, "store")
        mp.spawn(_dp_worker, args=(store, out), nprocs=2, join=True)
        res = [torch.load(f"{out}.{r}") for r in range(2)]
    data = _dp_data()
    # micro-batch 1: the single-process micro-batch loss on the concatenated batch (both ranks)
    ref = _dp_layer("micro_batch")
    ref(torch.cat([data[0][0], data[1][0]]))
    ref.aux_loss.backward()
    mean_loss = (res[0]["losses"][0] + res[1]["losses"][0]) / 2
    print("global mb1", mean_loss.item(), "single", ref.aux_loss.item())
    torch.testing.assert_close(mean_loss, ref.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0]["grads"][0], ref.router.weight_ED.grad, rtol=1e-4, atol=1e-6)
    # micro-batch 2: f from the counts of micro-batches 1..2 on both ranks, P local
    ref = _dp_layer("micro_batch")
    counts = sum(
        ref.router(x).experts_TK.reshape(-1).bincount(minlength=E_DP).float()
        for rank in data
        for x in rank
    )
    for r in range(2):
        p = torch.softmax(ref.router.logits(data[r][1].reshape(-1, D_DP)), -1).mean(0)
        expect = E_DP * (counts / counts.sum() * p).sum()
        torch.testing.assert_close(res[r]["losses"][1], expect, rtol=1e-5, atol=1e-6)
    assert res[0]["tokens"].tolist() == [2 * 2 * 2 * 3]  # stats all-reduced: 2 ranks x 2 mbs x 6
