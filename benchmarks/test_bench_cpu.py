"""pytest-benchmark suites for the CPU ops and the expert path (not part of the default test run).

Run: ``pytest benchmarks/test_bench_cpu.py --benchmark-group-by=param:case``. Each C++ op is
timed next to the plain-torch op chain it replaces, and the functional expert path next to the
two ways users build it today and the dense FFN with the same active parameters. The tables in
``benchmarks/RESULTS.md`` come from ``ops_cpu.py`` and ``layer_cpu.py``, which time the same
functions.
"""

import pytest
import torch

import moe_kernels as mk
from benchmarks import layer_cpu as ep
from benchmarks.ops_cpu import torch_combine, torch_route, torch_topk_gating

T, E, K, D, G = 8192, 64, 8, 1024, 8


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    w, e = mk.topk_gating(logits, K)
    plan = mk.route(e, E)
    x = torch.randn(T, D, generator=g)
    y = torch.randn(plan.num_rows, D, generator=g)
    labels = torch.randint(0, G, (T,), generator=g)
    return dict(logits=logits, w=w, e=e, plan=plan, x=x, y=y, labels=labels)


OPS = {
    "topk_gating": (
        lambda i: mk.topk_gating(i["logits"], K, backend="cpu"),
        lambda i: torch_topk_gating(i["logits"], K),
    ),
    "route": (
        lambda i: mk.route(i["e"], E, backend="cpu"),
        lambda i: torch_route(i["e"].long(), E),
    ),
    "dispatch": (
        lambda i: mk.dispatch(i["x"], i["plan"], backend="cpu"),
        lambda i: i["x"][i["plan"].row_token_N.long()],
    ),
    "combine": (
        lambda i: mk.combine(i["y"], i["w"], i["plan"], backend="cpu"),
        lambda i: torch_combine(i["y"], i["w"], i["plan"], T),
    ),
    "routing_histogram": (
        lambda i: mk.routing_histogram(
            i["e"], i["labels"], torch.zeros(G, E, dtype=torch.long), backend="cpu"
        ),
        lambda i: torch.bincount((i["labels"][:, None] * E + i["e"]).reshape(-1), minlength=G * E),
    ),
}


@pytest.mark.parametrize("impl", ["cpp", "torch_chain"])
@pytest.mark.parametrize("case", list(OPS))
def test_op(benchmark, inputs, case, impl):
    fn = OPS[case][0 if impl == "cpp" else 1]
    benchmark(fn, inputs)


PATHS = {
    "moe_kernels": lambda x, router, gate_up, down, k: ep.path_moe_kernels(
        x, router, ep.experts(gate_up, down), k
    ),
    "naive_loop": ep.path_naive,
    "sort_grouped_mm": ep.path_grouped,
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", [*PATHS, "dense"])
@pytest.mark.parametrize("case", ["fine-small", "coarse-top2"])
def test_expert_path(benchmark, case, impl, mode):
    _, t, d, f, e, k = next(s for s in ep.SHAPES if s[0] == case)
    p = ep.params(t, d, f, e)
    if impl == "dense":
        dense = [
            torch.randn(d, 2 * k * f).requires_grad_(True),
            torch.randn(k * f, d).requires_grad_(True),
        ]
        fn = lambda: ep.path_dense(p[0], *dense)
    elif impl == "moe_kernels":
        ex = ep.experts(p[2], p[3])  # built once, like a layer's experts
        fn = lambda: ep.path_moe_kernels(p[0], p[1], ex, k)
    else:
        fn = lambda: PATHS[impl](*p, k)
    if mode == "fwd":
        benchmark(torch.no_grad()(fn))
    else:
        benchmark(lambda: fn().sum().backward())
