"""The MoE layer's expert path against the ways users build an MoE FFN today, on CPU.

Paths (all include the router: logits, softmax top-k, renormalised weights; SwiGLU experts with
HF-fused weights ``gate_up`` (E, 2F, D) and ``down`` (E, D, F)):
- ``moe_kernels``: topk_gating -> route -> ``moe_kernels.GroupedExperts`` (the layer's experts:
  dispatch -> grouped_mm (w1|w3 fused) -> SwiGLU -> grouped_mm -> combine);
- ``naive loop``: per expert, nonzero() the tokens, index them, three mm, index_add_ back;
- ``sort + _grouped_mm``: argsort the slots, gather, torch._grouped_mm x 2 (w1|w3 fused, w2),
  scale, index_add_ (the torchtitan-style composition);
- ``dense``: a dense SwiGLU FFN with the same active parameters (hidden = k * F), the ceiling.

Run: ``python -m benchmarks.layer_cpu``. Prints ms and GFLOP/s (useful FLOPs: 6 T D k F
forward, 3x that forward+backward) and ratios.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import moe_kernels as mk
from benchmarks.common import bench, machine
from moe_kernels.tables import markdown_table

# Named shapes: (name, T, D, F, E, K)
SHAPES = [
    ("coarse-top1", 1024, 256, 1024, 8, 1),
    ("coarse-top2", 8192, 256, 512, 8, 2),
    ("mixtral-ish", 1024, 1024, 1024, 8, 2),
    ("fine-top8", 8192, 1024, 256, 64, 8),
    ("fine-top1", 8192, 1024, 256, 64, 1),
    ("fine-small", 1024, 256, 128, 64, 8),
]


def params(T, D, Fh, E, seed=0):
    """x (T, D), router (D, E), gate_up (E, 2F, D), down (E, D, F); the weights are Parameters
    (GroupedExperts registers them as they are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).requires_grad_(True)
    router = (torch.randn(D, E, generator=g) * D**-0.5).requires_grad_(True)
    gate_up = torch.nn.Parameter(torch.randn(E, 2 * Fh, D, generator=g) * D**-0.5)
    down = torch.nn.Parameter(torch.randn(E, D, Fh, generator=g) * Fh**-0.5)
    return [x, router, gate_up, down]


def gate(x, router, k):
    s = torch.softmax((x @ router).float(), -1)
    w, e = torch.topk(s, k, -1)
    return w / w.sum(-1, keepdim=True), e


def experts(gate_up, down) -> mk.GroupedExperts:
    """The layer's experts on these weights (shared, not copied)."""
    return mk.GroupedExperts.from_fused(gate_up, down, "swiglu")


def path_moe_kernels(x, router, ex: mk.GroupedExperts, k):
    w, e = mk.topk_gating(x @ router, k)
    return ex(x, mk.route(e, ex.num_experts), w)


def path_naive(x, router, gate_up, down, k):
    w, e = gate(x, router, k)
    out = torch.zeros_like(x)
    for ex in range(gate_up.shape[0]):
        tok, slot = (e == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        a, b = (x[tok] @ gate_up[ex].T).chunk(2, dim=-1)
        y = (F.silu(a) * b) @ down[ex].T
        out = out.index_add(0, tok, y * w[tok, slot].unsqueeze(-1))
    return out


def path_grouped(x, router, gate_up, down, k):
    w, e = gate(x, router, k)
    flat = e.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    a, b = torch._grouped_mm(x[tok], gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(a) * b, down.transpose(1, 2), offs=offs)
    return torch.zeros_like(x).index_add(0, tok, y * w.reshape(-1)[order].unsqueeze(-1))


def path_dense(x, w13_dense, w2_dense):
    a, b = (x @ w13_dense).chunk(2, dim=-1)
    return (F.silu(a) * b) @ w2_dense


def run_shape(name, T, D, Fh, E, K, reps):
    p = params(T, D, Fh, E)
    g = torch.Generator().manual_seed(1)
    dense = [
        (torch.randn(D, 2 * K * Fh, generator=g) * D**-0.5).requires_grad_(True),
        (torch.randn(K * Fh, D, generator=g) * (K * Fh) ** -0.5).requires_grad_(True),
    ]
    ex = experts(p[2], p[3])
    ref = path_naive(*p, K)
    for out in (path_moe_kernels(p[0], p[1], ex, K), path_grouped(*p, K)):
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    flops = 6 * T * D * K * Fh
    impls = {
        "moe_kernels": lambda: path_moe_kernels(p[0], p[1], ex, K),
        "naive loop": lambda: path_naive(*p, K),
        "sort+_grouped_mm": lambda: path_grouped(*p, K),
        "dense (same active)": lambda: path_dense(p[0], *dense),
    }
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        res = {}
        for iname, fn in impls.items():
            if mode == "fwd":
                run = lambda fn=fn: torch.no_grad()(fn)()
            else:
                run = lambda fn=fn: fn().sum().backward()
            res[iname] = bench(run, warmup=1, reps=reps)
        f = flops * (1 if mode == "fwd" else 3)
        gf = {k: f / v / 1e6 for k, v in res.items()}
        best_user = min(res["naive loop"], res["sort+_grouped_mm"])
        rows.append(
            [
                name,
                f"T={T} D={D} F={Fh} E={E} k={K}",
                mode,
                res["moe_kernels"],
                res["naive loop"],
                res["sort+_grouped_mm"],
                res["dense (same active)"],
                gf["moe_kernels"],
                best_user / res["moe_kernels"],
                gf["moe_kernels"] / gf["dense (same active)"],
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shapes", nargs="*", default=[s[0] for s in SHAPES], help="named shapes to run"
    )
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    rows = []
    for s in SHAPES:
        if s[0] in args.shapes:
            rows += run_shape(*s, reps=args.reps)
            print(markdown_table(HEADER, rows[-2:], digits=3), flush=True)
    print(f"\nmachine: {machine()}\n")
    print(markdown_table(HEADER, rows, digits=3))


HEADER = [
    "shape",
    "dims",
    "pass",
    "moe_kernels ms",
    "naive ms",
    "sort+_grouped_mm ms",
    "dense ms",
    "moe_kernels GFLOP/s",
    "vs best user path",
    "vs dense GFLOP/s",
]

if __name__ == "__main__":
    main()
