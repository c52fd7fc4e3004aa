"""Each C++ CPU op against the plain-torch op chain a user would write for it.

Run: ``python -m benchmarks.ops_cpu [--T 8192] [--E 64] [--K 8] [--D 1024]``. Prints a Markdown
table: ms per call for the C++ kernel and the torch chain, GB/s of the C++ kernel (bytes it must
read and write), and the speed-up.
"""

from __future__ import annotations

import argparse

import torch

import moe_kernels as mk
from benchmarks.common import bench, machine, markdown_table
from moe_kernels.ops.dispatch_combine import combine_reference, dispatch_reference
from moe_kernels.ops.route import route_reference
from moe_kernels.ops.topk_gating import topk_gating_reference


def torch_topk_gating(logits, k):
    s = torch.softmax(logits.float(), -1)
    w, e = torch.topk(s, k, -1)
    return w / w.sum(-1, keepdim=True), e


def torch_route(experts, E):
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, counts, torch.cumsum(counts, 0)


def torch_combine(y, w, plan, T):
    # The common un-permute: scale rows by their gate weight, then index_add_ into tokens.
    K = plan.slot_row_TK.shape[1]
    n = plan.num_rows
    tok = plan.row_token_N.long()
    wr = w.reshape(-1)[plan.row_slot_N.long()].unsqueeze(-1)
    return (
        torch.zeros(T, y.shape[1], dtype=y.dtype).index_add_(0, tok[:n], (y * wr).to(y.dtype))
        if K
        else y
    )


def run(T: int, E: int, K: int, D: int, G: int, dtype: torch.dtype) -> list[list]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    w, e = mk.topk_gating(logits, K)
    plan = mk.route(e, E)
    x = torch.randn(T, D, generator=g).to(dtype)
    y = torch.randn(plan.num_rows, D, generator=g).to(dtype)
    labels = torch.randint(0, G, (T,), generator=g)
    counts = torch.zeros(G, E, dtype=torch.int64)
    wsum = torch.zeros(G, E)
    el = x.element_size()
    cases = [
        # name, C++ op, torch chain, bytes moved by the C++ op
        (
            "topk_gating",
            lambda: mk.topk_gating(logits, K, backend="cpu"),
            lambda: torch_topk_gating(logits, K),
            T * E * 4 + T * K * 8,
        ),
        (
            "route",
            lambda: mk.route(e, E, backend="cpu"),
            lambda: torch_route(e.long(), E),
            T * K * 4 * 4,
        ),
        (
            "dispatch",
            lambda: mk.dispatch(x, plan, backend="cpu"),
            lambda: x[plan.row_token_N.long()],
            2 * T * K * D * el,
        ),
        (
            "combine",
            lambda: mk.combine(y, w, plan, backend="cpu"),
            lambda: torch_combine(y, w, plan, T),
            (T * K + T) * D * el,
        ),
        (
            "routing_histogram",
            lambda: mk.routing_histogram(e, labels, counts, w, wsum, backend="cpu"),
            lambda: (
                counts.view(-1).add_(
                    torch.bincount((labels[:, None] * E + e).reshape(-1), minlength=G * E)
                ),
                wsum.view(-1).add_(
                    torch.bincount(
                        (labels[:, None] * E + e).reshape(-1),
                        weights=w.reshape(-1),
                        minlength=G * E,
                    ).float()
                ),
            ),
            T * K * 12 + T * 8,
        ),
    ]
    rows = []
    for name, ours, chain, nbytes in cases:
        t_ours = bench(ours, reps=15)
        t_chain = bench(chain, reps=15)
        rows.append(
            [
                name,
                f"T={T} E={E} K={K} D={D} {str(dtype)[6:]}",
                t_ours,
                t_chain,
                nbytes / t_ours / 1e6,
                t_chain / t_ours,
            ]
        )
    return rows


def check_correctness():
    """The chains compared are the same computation (sanity, not a test)."""
    logits = torch.randn(64, 8)
    w, e = mk.topk_gating(logits, 2)
    assert torch.equal(e.long(), topk_gating_reference(logits, 2)[1].long())
    plan = mk.route(e, 8)
    assert all(torch.equal(a, b) for a, b in zip(plan[:5], route_reference(e, 8)))
    x = torch.randn(64, 16)
    assert torch.equal(mk.dispatch(x, plan), dispatch_reference(x, plan.row_slot_N, 2))
    y = torch.randn(plan.num_rows, 16)
    torch.testing.assert_close(mk.combine(y, w, plan), combine_reference(y, plan.slot_row_TK, w))
    torch.testing.assert_close(
        torch_combine(y, w, plan, 64), combine_reference(y, plan.slot_row_TK, w)
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--T", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--G", type=int, default=8, help="label groups (domains) for the histogram")
    args = p.parse_args()
    check_correctness()
    rows = []
    for T in args.T:
        for dtype in (torch.float32, torch.bfloat16):
            rows += run(T, args.E, args.K, args.D, args.G, dtype)
    print(f"machine: {machine()}\n")
    print(markdown_table(["op", "shape", "C++ ms", "torch chain ms", "C++ GB/s", "speed-up"], rows))


if __name__ == "__main__":
    main()
