"""The whole SwiGLU expert layer, forward and forward+backward, against the ways it is built
today, with FLOP and memory ceilings.

Run: ``python -m benchmarks.layer_gpu [--shapes ...] [--tokens ...] [--json OUT]`` on a GPU, or
``python -m benchmarks.layer_gpu --smoke`` anywhere (CPU: checks the harness, no GPU figures).

What is timed (gating excluded): from the layer input and a fixed routing decision (fp32 gate
weights, int32 expert ids) to the layer output, i.e. building the row layout, gather, three
GEMMs, SwiGLU and the weighted scatter; forward+backward adds the gradients of the input, the
gate weights and the three expert weights. The router projection and top-k gating are identical
for every implementation and are timed by ``benchmarks.ops_gpu``. ``fwd`` runs under
``torch.no_grad()``; ``fwd+bwd`` is one forward plus ``backward`` of a fixed random gradient.

Rows (see ``benchmarks.baselines``): ``moe_kernels`` (``moe_kernels.GroupedExperts``, the
layer's own experts, with automatic backend selection; the note says which backend each op
got), ``moe_kernels[cuda]``, ``moe_kernels[triton]`` (forced; with ``--gather auto`` the Triton
row runs the fused gather, the note says so); baselines
``naive`` (per-expert loop), ``torch_grouped_mm`` (argsort + gather + torch._grouped_mm x3 +
scatter_add), ``megablocks`` and ``scattermoe`` (only when they import); ceilings ``dense`` (a
dense SwiGLU FFN with hidden k*F: equal FLOPs in plain cuBLAS GEMMs) and a device copy (GB/s).

Before anything is timed, its forward output and all five gradients are compared with a plain-torch
fp32 reference on the same inputs; a disagreeing implementation is reported WRONG and not timed.

Columns: ms (median), TFLOP/s of useful FLOPs (forward 3 GEMMs x 2 T k D F, forward+backward
3x that), "vs best baseline" = fastest checked baseline's ms / this row's ms (> 1: faster).
Memory: bytes of the tensors the forward saves for backward (``saved_tensors_hooks``; storages
of the inputs and weights excluded), on CUDA also the peak allocation during forward and during
forward+backward above what was allocated before; "vs torch_grouped_mm" = saved bytes ratio.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from benchmarks import baselines as bl
from benchmarks import gpu_harness as H
from benchmarks.common import write_json_atomic

PASSES = ("fwd", "fwd+bwd")
CEILINGS = ("dense",)
DEFAULT_BASELINES = [*bl.BASELINES, *CEILINGS]
GATHER = {"auto": "auto", "on": True, "off": False}  # --gather -> GroupedExperts(gather=...)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.layer_gpu",
        description=__doc__,
        epilog=H.COMMON_HELP
        + "\nlayer options\n"
        + "  --baselines NAME...  any of "
        + ", ".join(DEFAULT_BASELINES)
        + " (default all; megablocks and\n"
        + '                       scattermoe print "not installed" when absent).\n'
        + "  --passes P...        fwd, fwd+bwd (default both).\n"
        + "  --megablocks-impl    sparse (default, block-sparse dMoE) or grouped.\n"
        + "  --gather             the experts' fused gather (first GEMMs read token rows):\n"
        + "                       auto (default: on for the forced triton row), on, off.\n"
        + "  --no-memory          skip the activation-memory measurement.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    H.add_common_args(p)
    p.add_argument("--baselines", nargs="+", default=DEFAULT_BASELINES)
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--megablocks-impl", choices=["sparse", "grouped"], default="sparse")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--gather", choices=list(GATHER), default="auto")
    args = p.parse_args(argv)
    unknown = [b for b in args.baselines if b not in bl.BASELINES and b not in CEILINGS]
    if unknown:
        p.error(f"--baselines: unknown {unknown}; expected any of {DEFAULT_BASELINES}")
    return args


def build_impls(args) -> list[bl.LayerImpl]:
    gather = GATHER[args.gather]
    impls: list[bl.LayerImpl] = [bl.MoeKernels(b, gather) for b in dict.fromkeys(args.backends)]
    for name in args.baselines:
        if name == "megablocks":
            impls.append(bl.MegaBlocksDMoE(args.megablocks_impl))
        elif name in bl.BASELINES:
            impls.append(bl.BASELINES[name]())
    return impls


# ---- measurements ------------------------------------------------------------------------------


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def check(impl: bl.LayerImpl, p: bl.LayerProblem, ref: dict, dtype) -> tuple[str, dict]:
    """Forward + backward once, compare output and gradients with the reference."""
    params = impl.params(p)
    _clear_grads(params)
    out = impl.forward(p)
    out.backward(p.dy_TD)
    got = {"out": out.detach(), **impl.grads(p)}
    ok, errors = H.compare(got, ref, dtype)
    _clear_grads(params)
    return ("ok" if ok else H.wrong_status(errors, dtype)), errors


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages ``fn``'s forward saves for backward, minus ``exclude``'s."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def cuda_peaks(fn, dy, params, device) -> tuple[int, int]:
    """Peak bytes allocated above the starting point during forward, and forward+backward."""
    _clear_grads(params)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    fwd = torch.cuda.max_memory_allocated(device) - base
    out.backward(dy)
    torch.cuda.synchronize(device)
    both = torch.cuda.max_memory_allocated(device) - base
    del out
    _clear_grads(params)
    return fwd, both


def time_passes(timer, fn, dy, params, passes) -> dict:
    res = {}
    for ps in passes:
        if ps == "fwd":

            def run():
                with torch.no_grad():
                    fn()

            res[ps] = timer(run)
        else:
            res[ps] = timer(lambda: fn().backward(dy), grad_to_none=params)
    return res


def run_case(case: H.Case, cfg: H.Config, args, impls, timer) -> tuple[list, list]:
    dev, dtype = cfg.device, cfg.dtype
    p = bl.make_layer_problem(case, dtype, dev, seed=cfg.seed, zipf=cfg.zipf)
    ref = bl.reference_outputs(p)
    s = case.shape
    flops = bl.layer_flops(case.T, s.k, s.D, s.F)
    base = {**case.key(), "imbalance": H.imbalance(p.experts_TK, s.E)}
    rows, mem = [], []
    for impl in impls:
        status, errors, times, note = "ok", {}, {}, ""
        m = {"saved_bytes": None, "cuda_peak_fwd_bytes": None, "cuda_peak_fwd_bwd_bytes": None}
        try:
            impl.prepare(p)
            note = impl.note
            status, errors = check(impl, p, ref, dtype)
            if status == "ok":
                fn = lambda impl=impl, p=p: impl.forward(p)
                params = impl.params(p)
                if not args.no_memory:
                    m["saved_bytes"] = saved_bytes(fn, p.inputs() + params)
                    if dev.type == "cuda":
                        peaks = cuda_peaks(fn, p.dy_TD, params, dev)
                        m["cuda_peak_fwd_bytes"], m["cuda_peak_fwd_bwd_bytes"] = peaks
                times = time_passes(timer, fn, p.dy_TD, params, args.passes)
        except bl.Unavailable as exc:
            status = str(exc)
        except Exception as exc:
            status = (
                H.unavailable_status(exc)
                if type(exc).__name__ == "NoBackendError"
                else H.error_status(exc)
            )
        finally:
            _clear_grads(p.leaves())
            impl.release()
        for ps in args.passes:
            ms = times.get(ps)
            f = flops * (1 if ps == "fwd" else 3)
            rows.append(
                {
                    **base,
                    "pass": ps,
                    "impl": impl.name,
                    "group": impl.group,
                    "status": status,
                    "ms": ms,
                    "tflops": f / ms / 1e9 if ms else None,
                    "errors": errors,
                    "note": note,
                }
            )
        if not args.no_memory:
            mem.append({**base, "impl": impl.name, "group": impl.group, "status": status, **m})
    if "dense" in args.baselines:
        dense = bl.DenseFFN.like(p)
        x = p.x_TD.detach()
        times = time_passes(timer, lambda: dense.forward(x), p.dy_TD, dense.params(), args.passes)
        for ps in args.passes:
            f = flops * (1 if ps == "fwd" else 3)
            rows.append(
                {
                    **base,
                    "pass": ps,
                    "impl": "dense",
                    "group": "ceiling",
                    "status": "ok",
                    "ms": times[ps],
                    "tflops": f / times[ps] / 1e9,
                    "errors": {},
                    "note": f"dense SwiGLU FFN, hidden k*F = {s.k * s.F}, equal FLOPs",
                }
            )
    del p, ref
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows, mem


def add_ratios(rows: list[dict], mem: list[dict]) -> None:
    keyf = lambda r: (r["shape"], r["T"], r["routing"], r.get("pass"))
    best = {}
    for r in rows:
        if r["group"] == "baseline" and r["status"] == "ok" and r["ms"]:
            k = keyf(r)
            best[k] = min(best.get(k, r["ms"]), r["ms"])
    for r in rows:
        b = best.get(keyf(r))
        r["vs_best_baseline"] = b / r["ms"] if (b and r["ms"]) else None
    tgmm = {keyf(r): r["saved_bytes"] for r in mem if r["impl"] == "torch_grouped_mm"}
    for r in mem:
        t = tgmm.get(keyf(r))
        r["vs_torch_grouped_mm"] = r["saved_bytes"] / t if (t and r["saved_bytes"]) else None


# ---- output ------------------------------------------------------------------------------------

LAYER_HEADER = ["shape", "T", "routing", "imbalance", "pass", "impl", "status", "ms", "TFLOP/s"]
LAYER_HEADER += ["vs best baseline", "note"]
MEM_HEADER = ["shape", "T", "routing", "impl", "saved for bwd MiB", "saved B/token"]
MEM_HEADER += ["CUDA peak fwd MiB", "CUDA peak fwd+bwd MiB", "vs torch_grouped_mm", "status"]


def layer_table(rows) -> str:
    return H.table(
        LAYER_HEADER,
        [
            [
                r["shape"],
                r["T"],
                r["routing"],
                r["imbalance"],
                r["pass"],
                r["impl"],
                r["status"],
                r["ms"],
                r["tflops"],
                r["vs_best_baseline"],
                r["note"],
            ]
            for r in rows
        ],
    )


def memory_table(mem) -> str:
    mib = lambda b: None if b is None else b / 2**20
    return H.table(
        MEM_HEADER,
        [
            [
                r["shape"],
                r["T"],
                r["routing"],
                r["impl"],
                mib(r["saved_bytes"]),
                None if r["saved_bytes"] is None else r["saved_bytes"] / r["T"],
                mib(r["cuda_peak_fwd_bytes"]),
                mib(r["cuda_peak_fwd_bwd_bytes"]),
                r["vs_torch_grouped_mm"],
                r["status"],
            ]
            for r in mem
        ],
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = H.resolve(args)
    timer = H.Timer(cfg.device, args.warmup_ms, args.rep_ms, args.cpu_reps)
    impls = build_impls(args)
    rows, mem = [], []
    with H.cpu_threads(cfg, args.threads):
        info = H.machine_info(cfg.device, timer, cfg.smoke)
        print(H.machine_line(info), flush=True)
        if cfg.device.type != "cuda":
            print(f"*** {H.CPU_LABEL} ***", flush=True)
        copy = H.copy_bandwidth(timer, cfg.device, H.copy_nbytes(cfg.device, cfg.smoke))
        print(f"ceiling: device copy {copy['bytes'] / 2**20:.0f} MiB: {copy['gbps']:.1f} GB/s\n")
        for case in cfg.cases:
            r, m = run_case(case, cfg, args, impls, timer)
            rows += r
            mem += m
            print(f"done: {case.label()} ({case.shape.dims()})", file=sys.stderr, flush=True)
    add_ratios(rows, mem)
    targets = H.evaluate_targets(rows, None if args.no_memory else mem, None)
    print(layer_table(rows))
    if not args.no_memory:
        print("\nActivation memory (forward of one layer)\n")
        print(memory_table(mem))
    print()
    print(H.targets_table(targets, cfg.smoke or cfg.device.type != "cuda"))
    result = {
        "benchmark": "layer_gpu",
        "machine": info,
        "args": vars(args),
        "topk_gating": "excluded (routing decision is an input; see module docstring)",
        "ceilings": {"copy": copy},
        "layer": rows,
        "memory": mem,
        "targets": H.targets_json(targets),
    }
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
