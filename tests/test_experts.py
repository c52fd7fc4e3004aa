"""GroupedExperts against a per-expert loop: dtypes, gradients, empty experts, capacity padding,
biases, the fused HF layout, shared weights, and the fused-gather switch (Triton interpreter on
CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels.experts import GroupedExperts

D, FF, E, K = 16, 24, 5, 2


def decision(T=20, k=K, seed=0, experts=E):
    """fp32 gate weights (T, k) and k distinct int32 expert ids per token."""
    g = torch.Generator().manual_seed(seed)
    w, e = torch.topk(torch.rand(T, experts, generator=g), k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).requires_grad_(True), e.to(torch.int32)


def loop_reference(x_TD, weights_TK, experts_TK, plan, ex: GroupedExperts):
    """Per expert: F.linear on its kept tokens, biases, activation, gate-weighted index_add."""
    w1, w3, w2 = ex.weights()
    kept_TK = plan.slot_row_TK >= 0
    out = torch.zeros_like(x_TD)
    for e in range(ex.num_experts):
        tok, slot = torch.where((experts_TK == e) & kept_TK)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        h = F.linear(xe, w1[e], None if ex.b1_EF is None else ex.b1_EF[e])
        h = ex.act(h)
        if w3 is not None:
            h = h * F.linear(xe, w3[e], None if ex.b3_EF is None else ex.b3_EF[e])
        y = F.linear(h, w2[e], None if ex.b2_ED is None else ex.b2_ED[e])
        out = out.index_add(0, tok, (y.float() * weights_TK[tok, slot, None]).to(out.dtype))
    return out


def run_both(ex, x, w, e, plan, dy):
    """Output and gradients (x, gate weights, every parameter) of ``ex`` and of the loop."""
    leaves = [x, w, *ex.parameters()]
    out = ex(x, plan, w)
    got = [out, *torch.autograd.grad(out, leaves, dy)]
    ref_out = loop_reference(x, w, e, plan, ex)
    ref = [ref_out, *torch.autograd.grad(ref_out, leaves, dy)]
    return got, ref


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_per_expert_loop_fp32(activation, bias):
    torch.manual_seed(0)
    ex = GroupedExperts(E, D, FF, activation, bias=bias)
    if bias:  # zero-initialised: make them count
        with torch.no_grad():
            for b in (ex.b1_EF, ex.b3_EF, ex.b2_ED):
                if b is not None:
                    b.normal_()
    w, e = decision()
    x = torch.randn(20, D, requires_grad=True)
    plan = mk.route(e, E)
    got, ref = run_both(ex, x, w, e, plan, torch.randn(20, D))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32_as_plain_torch_bf16():
    torch.manual_seed(1)
    ex = GroupedExperts(E, D, FF)
    w, e = decision(T=32, seed=1)
    x = torch.randn(32, D)
    plan = mk.route(e, E)
    ref = loop_reference(x, w.detach(), e, plan, ex).double()
    ex16 = GroupedExperts.from_weights(
        *(t.detach().bfloat16() for t in (ex.w1_EFD, ex.w2_EDF, ex.w3_EFD))
    )
    out16 = ex16(x.bfloat16(), plan, w.detach())
    ref16 = loop_reference(x.bfloat16(), w.detach(), e, plan, ex16)
    assert out16.dtype == torch.bfloat16
    err, err_torch = (out16.double() - ref).abs().max(), (ref16.double() - ref).abs().max()
    print(f"bf16 max err {err:.3e}, plain torch bf16 {err_torch:.3e}")
    assert err <= 2 * err_torch + 1e-3


def test_autocast_runs_in_autocast_dtype_and_grads_stay_fp32():
    torch.manual_seed(2)
    ex = GroupedExperts(E, D, FF)
    w, e = decision()
    x = torch.randn(20, D)
    plan = mk.route(e, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(x, plan, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ex.w1_EFD.grad.dtype == torch.float32 and torch.isfinite(ex.w1_EFD.grad).all()


def test_empty_experts_get_zero_gradients():
    # every token picks experts 0 and 1: experts 2..4 see no rows
    torch.manual_seed(3)
    ex = GroupedExperts(E, D, FF)
    T = 9
    e = torch.tensor([[0, 1]] * T, dtype=torch.int32)
    w = torch.full((T, 2), 0.5, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)
    plan = mk.route(e, E)
    got, ref = run_both(ex, x, w, e, plan, torch.randn(T, D))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for grad in got[3:]:  # w1, w3, w2: the experts without rows get exactly zero
        assert grad[:2].abs().sum() > 0 and torch.all(grad[2:] == 0)


def test_capacity_padding_rows_and_dropped_tokens():
    # capacity 2 on 12 tokens x 2 slots over 5 experts: many slots dropped, padding rows exist
    torch.manual_seed(4)
    ex = GroupedExperts(E, D, FF, bias=True)
    with torch.no_grad():
        ex.b2_ED.normal_()  # padding rows would add b2 if combine read them
    w, e = decision(T=12, seed=4)
    plan = mk.route(e, E, capacity=2)
    assert plan.num_rows == E * 2 and int(plan.kept_E.sum()) < 12 * 2
    x = torch.randn(12, D, requires_grad=True)
    got, ref = run_both(ex, x, w, e, plan, torch.randn(12, D))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dropped = (plan.slot_row_TK < 0).all(1)
    assert torch.all(got[0][dropped] == 0)  # fully dropped tokens get no expert output


def test_fused_layout_shares_the_tensors_and_matches_split():
    torch.manual_seed(5)
    split = GroupedExperts(E, D, FF)
    gate_up = torch.nn.Parameter(torch.cat([split.w1_EFD.detach(), split.w3_EFD.detach()], 1))
    down = torch.nn.Parameter(split.w2_EDF.detach().clone())
    fused = GroupedExperts.from_fused(gate_up, down, F.silu)
    assert fused.gate_up_proj is gate_up and fused.down_proj is down  # shared, not copied
    assert set(fused.state_dict()) == {"gate_up_proj", "down_proj"}  # HF's keys
    w, e = decision()
    x = torch.randn(20, D)
    plan = mk.route(e, E)
    torch.testing.assert_close(fused(x, plan, w), split(x, plan, w))
    fused(x, plan, w).square().sum().backward()
    split(x, plan, w).square().sum().backward()
    torch.testing.assert_close(gate_up.grad, torch.cat([split.w1_EFD.grad, split.w3_EFD.grad], 1))
    torch.testing.assert_close(down.grad, split.w2_EDF.grad)


def test_from_weights_registers_parameters_as_given():
    torch.manual_seed(6)
    layer = mk.MoE(D, FF, E, K)
    ex = GroupedExperts.from_weights(layer.w1_EFD, layer.w2_EDF, layer.w3_EFD)
    assert ex.w1_EFD is layer.w1_EFD and ex.w2_EDF is layer.w2_EDF
    x = torch.randn(7, D)
    dec = layer.router(x)
    torch.testing.assert_close(ex(x, layer._plan(dec, 7), dec.weights_TK), layer(x))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GroupedExperts(E, D, FF, "tanh"), "activation"),
        (lambda: GroupedExperts(E, D, FF, gather="sometimes"), "gather"),
        (lambda: GroupedExperts(0, D, FF), "num_experts"),
        (lambda: GroupedExperts(E, D, FF, torch.tanh), "gated"),  # callable: say if gated
        (lambda: GroupedExperts.from_weights(torch.zeros(E, FF, D), torch.zeros(E, D, FF)), "w3"),
        (
            lambda: GroupedExperts.from_weights(
                torch.zeros(E, FF, D), torch.zeros(E, D, FF + 1), torch.zeros(E, FF, D)
            ),
            "w2_EDF",
        ),
        (
            lambda: GroupedExperts.from_fused(torch.zeros(E, 7, D), torch.zeros(E, D, 3), F.silu),
            "gate_up",
        ),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_raises():
    ex = GroupedExperts(E, D, FF)
    w, e = decision()
    with pytest.raises(ValueError, match="x_TD: expected shape"):
        ex(torch.randn(20, D + 1), mk.route(e, E), w)


# ---- the fused gather (Triton) -------------------------------------------------------------

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture
def device(monkeypatch):
    """The GPU, or Triton's interpreter on CPU-only machines (like tests/triton/conftest.py; the
    kernels fix their mode when they first load, so it is set before any gather runs)."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@requires_triton
@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("triton", torch.float32),  # every op on Triton: gathered or dispatched rows
        ("triton", torch.bfloat16),
        # the Triton gather beside the default backends (cpu here); in bf16 the two GEMM kernels
        # round differently, so only fp32 is compared across kernels
        (None, torch.float32),
    ],
)
@pytest.mark.parametrize("layout", ["split", "fused"])
@pytest.mark.parametrize("capacity", [None, 3])  # 3: dropped slots and padding rows
def test_gather_switch_equals_unfused_path(device, backend, dtype, layout, capacity):
    torch.manual_seed(7)
    ex = GroupedExperts(E, D, FF, bias=layout == "split", backend=backend)
    ex = ex.to(device=device, dtype=dtype)
    if layout == "fused":
        gate_up = torch.cat([ex.w1_EFD.detach(), ex.w3_EFD.detach()], 1)
        down = ex.w2_EDF.detach().clone()
        ex = GroupedExperts.from_fused(gate_up, down, F.silu, backend=backend)
    else:
        with torch.no_grad():
            ex.b1_EF.normal_(), ex.b3_EF.normal_(), ex.b2_ED.normal_()
    w, e = decision(T=19, seed=7)
    w = w.detach().to(device)
    plan = mk.route(e.to(device), E, capacity=capacity)
    x = torch.randn(19, D, device=device).to(dtype)
    dy = torch.randn(19, D, device=device).to(dtype)
    names = ["out", "x", "weights", *(n for n, _ in ex.named_parameters())]
    results = {}
    for gather in (True, False):
        ex.gather = gather
        assert ex.use_gather() == gather
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = ex(xs, plan, ws)
        results[gather] = [out, *torch.autograd.grad(out, [xs, ws, *ex.parameters()], dy)]
    for name, a, b in zip(names, results[True], results[False]):
        err = (a.double() - b.double()).abs().max().item()
        print(f"{layout} {backend} {dtype} {name}: max |gather - unfused| {err:.2e}")
        # Same kernels, same rounding: equal up to the order of sums (1-2 ulps; dx adds the
        # two GEMMs' row gradients in another order).
        torch.testing.assert_close(a, b)


@requires_triton
def test_gather_auto_follows_the_forced_triton_backend(device):
    torch.manual_seed(8)
    auto = GroupedExperts(E, D, FF, backend="triton").to(device)
    assert auto.use_gather() and not GroupedExperts(E, D, FF).use_gather()
    plain = GroupedExperts.from_weights(auto.w1_EFD, auto.w2_EDF, auto.w3_EFD, gather=False)
    w, e = decision(T=11, seed=8)
    w = w.detach().to(device)
    plan = mk.route(e.to(device), E)
    x = torch.randn(11, D, device=device)
    torch.testing.assert_close(auto(x, plan, w), plain(x, plan, w), atol=1e-5, rtol=1e-5)
