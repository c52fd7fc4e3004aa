"""The whole expert path on the CUDA backends (topk_gating -> route -> GroupedExperts: dispatch
-> grouped_mm x3 SwiGLU -> combine, forward and backward) runs without a host synchronisation
and replays from a CUDA graph with the results of eager execution."""

import pytest
import torch
from torch import nn

import moe_kernels as mk

pytestmark = pytest.mark.gpu

T, D, FH, E, K = 512, 256, 128, 16, 4
BACKEND = "cuda"


def expert_path(x, router_ED, w1_EFD, w3_EFD, w2_EDF):
    b = BACKEND
    w, e = mk.topk_gating(x.float() @ router_ED.t(), K, backend=b)
    plan = mk.route(e, E, backend=b)
    # Parameters are registered as they are, so their .grad is what the test reads.
    experts = mk.GroupedExperts.from_weights(w1_EFD, w2_EDF, w3_EFD, backend=b)
    return experts(x, plan, w)


def step(params, dy):
    out = expert_path(*params)
    out.backward(dy)
    return out


def make_params(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0, dtype=torch.bfloat16: (
        torch.randn(*s, generator=g, device="cuda") * scale
    ).to(dtype)
    params = [
        r(T, D),
        r(E, D, scale=D**-0.5, dtype=torch.float32),
        r(E, FH, D, scale=D**-0.5),
        r(E, FH, D, scale=D**-0.5),
        r(E, D, FH, scale=FH**-0.5),
    ]
    return [p.requires_grad_(True) if i == 0 else nn.Parameter(p) for i, p in enumerate(params)]


def fresh_leaves(params):
    fresh = [p.detach().clone() for p in params]
    return [p.requires_grad_(True) if i == 0 else nn.Parameter(p) for i, p in enumerate(fresh)]


def test_forward_backward_has_no_host_sync():
    params = make_params()
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    step(params, dy)  # first call: lazy library initialisation may synchronise
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(params, dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in params)


def test_cuda_graph_replay_matches_eager():
    params = make_params(1)
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step(params, dy)
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(params, dy)

    for seed in (2, 3):  # new values in the static inputs each replay
        new = make_params(seed)
        with torch.no_grad():
            params[0].copy_(new[0])
            dy.copy_(torch.randn_like(dy))
        graph.replay()
        torch.cuda.synchronize()
        got_out = static_out.detach().clone()
        got_grads = [p.grad.clone() for p in params]

        eager = fresh_leaves(params)
        want_out = step(eager, dy.clone())
        torch.cuda.synchronize()
        torch.testing.assert_close(got_out, want_out.detach())
        for got, p in zip(got_grads, eager):
            torch.testing.assert_close(got, p.grad)
