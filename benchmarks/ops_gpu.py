"""Each moe_kernels op against the plain-torch chain a user would write for it, with the device
copy bandwidth and dense GEMMs as ceilings.

Run: ``python -m benchmarks.ops_gpu [--shapes ...] [--tokens ...] [--json OUT]`` on a GPU, or
``python -m benchmarks.ops_gpu --smoke`` anywhere (CPU: checks the harness, no GPU figures).

Ops and their torch chains (inputs from the named shape, T tokens and the routing):

- ``topk_gating``: softmax -> topk -> renormalise, from fp32 logits (T, E);
- ``route``: stable argsort of the expert ids, bincount, cumsum, inverse permutation;
- ``dispatch``: ``x[row_token]`` (row gather into expert order);
- ``combine``: scale rows by their gate weight, ``index_add_`` into tokens;
- ``grouped_mm[up]`` (N x D @ D x F per expert) and ``grouped_mm[down]`` (N x F @ F x D): the
  chain is ``torch._grouped_mm``; ``dense mm`` is one GEMM with the same FLOPs (N x D @ D x F);
  ``--passes fwd+bwd`` adds forward+backward (dx and dW; 3x the FLOPs);
- ``routing_histogram``: ``bincount`` of label * E + expert, counts and gate-weight sums.

Every implementation's output is checked first (exact for ids, plans, gathers and counts; the
per-dtype tolerance against an fp32 reference for float results); a disagreeing one is WRONG and
not timed. GB/s counts the bytes the op must read and write once (see ``BYTES`` in the code);
"% copy" is that over the measured device-to-device copy bandwidth (read + write). TFLOP/s for
the GEMMs counts 2 N D F per forward. "vs torch" = the torch chain's ms / this row's ms, "vs
dense" = dense mm ms / this row's ms (> 1: faster).
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass

import torch

import moe_kernels as mk
from benchmarks import gpu_harness as H
from benchmarks.common import write_json_atomic
from moe_kernels.ops.dispatch_combine import combine_reference

OPS = (
    "topk_gating",
    "route",
    "dispatch",
    "combine",
    "grouped_mm[up]",
    "grouped_mm[down]",
    "routing_histogram",
)
GROUPS = 8  # label groups (domains) of the histogram


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ops_gpu",
        description=__doc__,
        epilog=H.COMMON_HELP
        + "\nops options\n"
        + f"  --ops NAME...        any of {', '.join(OPS)} (default all).\n"
        + "  --passes P...        fwd, fwd+bwd: grouped_mm passes (default fwd; the other ops\n"
        + "                       are timed forward only).\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    H.add_common_args(p)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd"])
    return p.parse_args(argv)


@dataclass
class OpsProblem:
    logits_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    plan: mk.RoutingPlan
    x_TD: torch.Tensor
    y_ND: torch.Tensor
    h_NF: torch.Tensor
    w1_EFD: torch.Tensor
    w2_EDF: torch.Tensor
    dense_DF: torch.Tensor
    labels_T: torch.Tensor


def make_problem(case: H.Case, cfg: H.Config) -> OpsProblem:
    s, dev, dt = case.shape, cfg.device, cfg.dtype
    logits, w, e = H.make_routing(case.T, s.E, s.k, case.routing, cfg.zipf, cfg.seed, dev)
    plan = mk.route(e, s.E)
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)
    N = plan.num_rows
    return OpsProblem(
        logits,
        w,
        e,
        plan,
        r(case.T, s.D),
        r(N, s.D),
        r(N, s.F),
        r(s.E, s.F, s.D, scale=s.D**-0.5),
        r(s.E, s.D, s.F, scale=s.F**-0.5),
        r(s.D, s.F, scale=s.D**-0.5),
        torch.randint(0, GROUPS, (case.T,), generator=g, device=dev),
    )


# ---- torch chains ------------------------------------------------------------------------------


def torch_topk_gating(logits, k):
    w, e = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return w / w.sum(-1, keepdim=True), e


def torch_route(experts, E):
    flat = experts.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cumsum(counts, 0)
    slot_row = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    return counts, offsets, order, slot_row


def torch_combine(y, w, plan, T):
    tok = plan.row_token_N.long()
    wr = w.reshape(-1)[plan.row_slot_N.long()].unsqueeze(-1)
    return torch.zeros(T, y.shape[1], dtype=y.dtype, device=y.device).index_add_(
        0, tok, (y * wr).to(y.dtype)
    )


def torch_routing_histogram(e, labels, E, w):
    idx = (labels.long().unsqueeze(1) * E + e.long()).reshape(-1)
    counts = torch.bincount(idx, minlength=GROUPS * E)
    wsum = torch.bincount(idx, weights=w.reshape(-1), minlength=GROUPS * E)
    return counts.view(GROUPS, E), wsum.float().view(GROUPS, E)


def grouped_mm_fp32(x, w_EDF, offsets):
    """Per-expert fp32 loop (the float reference for the grouped GEMMs)."""
    y = x.new_zeros(x.shape[0], w_EDF.shape[2], dtype=torch.float32)
    b = offsets.tolist()
    for e in range(w_EDF.shape[0]):
        if b[e + 1] > b[e]:
            y[b[e] : b[e + 1]] = x[b[e] : b[e + 1]].float() @ w_EDF[e].float()
    return y


# ---- one op: its implementations, check and size -----------------------------------------------


@dataclass
class OpSpec:
    name: str
    impls: dict  # impl name -> (group, callable)
    check: object  # callable(output) -> (ok, errors)
    nbytes: int
    flops: int = 0
    grads: object = None  # for fwd+bwd: callable(impl name) -> (fn running fwd+bwd, params)
    reset: object = None  # called before each implementation's check (accumulating ops)


def exact(got: dict, want: dict) -> tuple[bool, dict]:
    errors, ok = {}, True
    for n, w in want.items():
        g = got[n]
        same = g.shape == w.shape and bool(torch.equal(g.long(), w.long()))
        errors[n] = "equal" if same else "differs"
        ok = ok and same
    return ok, errors


def _ours(cfg: H.Config, make) -> dict:
    """moe_kernels rows for every requested backend: impl name -> ("ours", fn)."""
    return {H.ours_name(b): ("ours", make(None if b == "auto" else b)) for b in cfg.backends}


def topk_gating_spec(cfg, P, T, E, k) -> OpSpec:
    ref_w, ref_e = torch_topk_gating(P.logits_TE, k)

    def check(res):
        w, e = res
        ok_e, err = exact({"experts": e}, {"experts": ref_e})
        ok_w, err_w = H.compare({"weights": w}, {"weights": ref_w}, torch.float32)
        return ok_e and ok_w, {**err, **err_w}

    impls = {"torch": ("torch", lambda: torch_topk_gating(P.logits_TE, k))}
    impls.update(_ours(cfg, lambda b: lambda: mk.topk_gating(P.logits_TE, k, backend=b)))
    return OpSpec("topk_gating", impls, check, T * E * 4 + T * k * 8)


def route_spec(cfg, P, T, E, k) -> OpSpec:
    names = ("counts", "offsets", "row_slot", "slot_row")
    want = dict(zip(names, torch_route(P.experts_TK, E)))

    def check(res):
        if isinstance(res, mk.RoutingPlan):
            got = (res.counts_E, res.offsets_E1[1:], res.row_slot_N, res.slot_row_TK.reshape(-1))
        else:
            got = res
        return exact(dict(zip(names, got)), want)

    impls = {"torch": ("torch", lambda: torch_route(P.experts_TK, E))}
    impls.update(_ours(cfg, lambda b: lambda: mk.route(P.experts_TK, E, backend=b)))
    return OpSpec("route", impls, check, 16 * T * k)


def dispatch_spec(cfg, P, N, D, el) -> OpSpec:
    tok = P.plan.row_token_N.long()
    want = P.x_TD[tok]
    impls = {"torch": ("torch", lambda: P.x_TD[tok])}
    impls.update(_ours(cfg, lambda b: lambda: mk.dispatch(P.x_TD, P.plan, backend=b)))
    return OpSpec("dispatch", impls, lambda r: exact({"x_ND": r}, {"x_ND": want}), 2 * N * D * el)


def combine_spec(cfg, P, T, N, D, el) -> OpSpec:
    want = combine_reference(P.y_ND.float(), P.plan.slot_row_TK, P.weights_TK)
    impls = {"torch": ("torch", lambda: torch_combine(P.y_ND, P.weights_TK, P.plan, T))}
    impls.update(_ours(cfg, lambda b: lambda: mk.combine(P.y_ND, P.weights_TK, P.plan, backend=b)))
    check = lambda r: H.compare({"out": r}, {"out": want}, cfg.dtype)
    return OpSpec("combine", impls, check, (N + T) * D * el)


def grouped_mm_spec(cfg, P, which, E, N, D, Fh, el) -> OpSpec:
    """``up``: x_ND (N, D) @ w1[e]^T -> (N, F); ``down``: h_NF (N, F) @ w2[e]^T -> (N, D)."""
    plan, off = P.plan, P.plan.offsets_E1
    if which == "up":
        x, w_EDF, din, dout = P.x_TD[plan.row_token_N.long()], P.w1_EFD.transpose(1, 2), D, Fh
        dense = P.dense_DF
    else:
        x, w_EDF, din, dout = P.h_NF, P.w2_EDF.transpose(1, 2), Fh, D
        dense = P.dense_DF.t()
    offs32 = off[1:].to(torch.int32)
    want = grouped_mm_fp32(x, w_EDF, off)
    impls = {
        "torch._grouped_mm": ("torch", lambda: torch._grouped_mm(x, w_EDF, offs=offs32)),
        "dense mm": ("ceiling", lambda: x @ dense),
    }
    impls.update(_ours(cfg, lambda b: lambda: mk.grouped_mm(x, w_EDF, off, backend=b)))

    def grads(impl):
        """Forward+backward (dx and the weight gradient) on fresh leaves of the same values."""
        xl = x.detach().clone().requires_grad_(True)
        wl = w_EDF.detach().transpose(1, 2).contiguous().requires_grad_(True)  # (E, out, in)
        dl = dense.detach().clone().requires_grad_(True)
        dy = torch.ones(x.shape[0], dout, dtype=x.dtype, device=x.device)
        if impl == "torch._grouped_mm":
            f = lambda: torch._grouped_mm(xl, wl.transpose(1, 2), offs=offs32).backward(dy)
            return f, [xl, wl]
        if impl == "dense mm":
            return (lambda: (xl @ dl).backward(dy)), [xl, dl]
        b = None if impl == "moe_kernels" else impl[len("moe_kernels[") : -1]
        f = lambda: mk.grouped_mm(xl, wl.transpose(1, 2), off, backend=b).backward(dy)
        return f, [xl, wl]

    check = lambda r: H.compare({"y": r}, {"y": want}, cfg.dtype)
    nbytes = el * (N * din + E * din * dout + N * dout)
    return OpSpec(f"grouped_mm[{which}]", impls, check, nbytes, 2 * N * din * dout, grads)


def routing_histogram_spec(cfg, P, T, E, k) -> OpSpec:
    want_c, want_w = torch_routing_histogram(P.experts_TK, P.labels_T, E, P.weights_TK)
    bufs = {}

    def make(b):
        def fn():
            if b not in bufs:
                bufs[b] = (
                    torch.zeros(GROUPS, E, dtype=torch.int64, device=cfg.device),
                    torch.zeros(GROUPS, E, dtype=torch.float32, device=cfg.device),
                )
            c, w = bufs[b]
            mk.routing_histogram(P.experts_TK, P.labels_T, c, P.weights_TK, w, backend=b)
            return c, w

        return fn

    def check(res):
        c, w = res
        ok_c, err = exact({"counts": c}, {"counts": want_c})
        ok_w, err_w = H.compare({"weight_sums": w}, {"weight_sums": want_w}, torch.float32)
        return ok_c and ok_w, {**err, **err_w}

    impls = {
        "torch": (
            "torch",
            lambda: torch_routing_histogram(P.experts_TK, P.labels_T, E, P.weights_TK),
        )
    }
    impls.update(_ours(cfg, make))
    # The check runs on fresh buffers (reset); timing then keeps accumulating into them.
    return OpSpec("routing_histogram", impls, check, T * k * 12 + T * 8, reset=bufs.clear)


def specs(case: H.Case, cfg: H.Config, P: OpsProblem, ops: list[str]) -> list[OpSpec]:
    s, T = case.shape, case.T
    E, k, D, Fh = s.E, s.k, s.D, s.F
    el = torch.empty((), dtype=cfg.dtype).element_size()
    N = P.plan.num_rows
    build = {
        "topk_gating": lambda: topk_gating_spec(cfg, P, T, E, k),
        "route": lambda: route_spec(cfg, P, T, E, k),
        "dispatch": lambda: dispatch_spec(cfg, P, N, D, el),
        "combine": lambda: combine_spec(cfg, P, T, N, D, el),
        "grouped_mm[up]": lambda: grouped_mm_spec(cfg, P, "up", E, N, D, Fh, el),
        "grouped_mm[down]": lambda: grouped_mm_spec(cfg, P, "down", E, N, D, Fh, el),
        "routing_histogram": lambda: routing_histogram_spec(cfg, P, T, E, k),
    }
    return [build[op]() for op in OPS if op in ops]


# ---- running -----------------------------------------------------------------------------------


def run_case(case, cfg, args, timer, copy_gbps) -> list[dict]:
    P = make_problem(case, cfg)
    base = {**case.key(), "imbalance": H.imbalance(P.experts_TK, case.shape.E)}
    rows = []
    for spec in specs(case, cfg, P, args.ops):
        passes = args.passes if spec.grads else ["fwd"]
        for ps in passes:
            for impl, (group, fn) in spec.impls.items():
                status, errors, ms = "ok", {}, None
                try:
                    if spec.reset is not None:
                        spec.reset()
                    # Ceilings compute something else (same FLOPs); they are not compared.
                    ok, errors = (True, {}) if group == "ceiling" else spec.check(fn())
                    if not ok:
                        status = H.wrong_status(errors, cfg.dtype)
                    elif ps == "fwd":
                        ms = timer(fn)
                    else:
                        f, params = spec.grads(impl)
                        ms = timer(f, grad_to_none=params)
                except Exception as exc:
                    status = (
                        H.unavailable_status(exc)
                        if type(exc).__name__ == "NoBackendError"
                        else H.error_status(exc)
                    )
                flops = spec.flops * (1 if ps == "fwd" else 3)
                gbps = spec.nbytes / ms / 1e6 if ms and ps == "fwd" else None
                rows.append(
                    {
                        **base,
                        "op": spec.name,
                        "pass": ps,
                        "impl": impl,
                        "group": group,
                        "status": status,
                        "ms": ms,
                        "bytes": spec.nbytes,
                        "gbps": gbps,
                        "frac_copy": gbps / copy_gbps if gbps and not spec.flops else None,
                        "flops": flops or None,
                        "tflops": flops / ms / 1e9 if (ms and flops) else None,
                        "errors": errors,
                    }
                )
    del P
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["op"], r["shape"], r["T"], r["routing"], r["pass"])
    chain = {key(r): r["ms"] for r in rows if r["group"] == "torch" and r["status"] == "ok"}
    dense = {key(r): r["ms"] for r in rows if r["impl"] == "dense mm" and r["status"] == "ok"}
    for r in rows:
        c, d = chain.get(key(r)), dense.get(key(r))
        r["vs_torch"] = c / r["ms"] if (c and r["ms"]) else None
        r["vs_dense"] = d / r["ms"] if (d and r["ms"]) else None


HEADER = ["op", "shape", "T", "routing", "pass", "impl", "status", "ms", "GB/s", "% copy"]
HEADER += ["TFLOP/s", "vs torch", "vs dense"]


def ops_table(rows) -> str:
    pct = lambda v: None if v is None else 100 * v
    return H.table(
        HEADER,
        [
            [
                r["op"],
                r["shape"],
                r["T"],
                r["routing"],
                r["pass"],
                r["impl"],
                r["status"],
                r["ms"],
                r["gbps"],
                pct(r["frac_copy"]),
                r["tflops"],
                r["vs_torch"],
                r["vs_dense"],
            ]
            for r in rows
        ],
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = H.resolve(args)
    timer = H.Timer(cfg.device, args.warmup_ms, args.rep_ms, args.cpu_reps)
    with H.cpu_threads(cfg, args.threads):
        info = H.machine_info(cfg.device, timer, cfg.smoke)
        print(H.machine_line(info), flush=True)
        if cfg.device.type != "cuda":
            print(f"*** {H.CPU_LABEL} ***", flush=True)
        copy = H.copy_bandwidth(timer, cfg.device, H.copy_nbytes(cfg.device, cfg.smoke))
        print(f"ceiling: device copy {copy['bytes'] / 2**20:.0f} MiB: {copy['gbps']:.1f} GB/s\n")
        rows = []
        for case in cfg.cases:
            rows += run_case(case, cfg, args, timer, copy["gbps"])
            print(f"done: {case.label()} ({case.shape.dims()})", file=sys.stderr, flush=True)
    add_ratios(rows)
    targets = H.evaluate_targets(None, None, rows)
    print(ops_table(rows))
    print()
    print(H.targets_table(targets, cfg.smoke or cfg.device.type != "cuda"))
    result = {
        "benchmark": "ops_gpu",
        "machine": info,
        "args": vars(args),
        "ceilings": {"copy": copy},
        "ops": rows,
        "targets": H.targets_json(targets),
    }
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
