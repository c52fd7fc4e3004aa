"""The targets of the GPU benchmarks, evaluated from their rows; as a script, the targets table
from the JSON of both.

Run: ``python -m benchmarks.gpu_targets LAYER.json OPS.json`` with the ``--json`` outputs of
``benchmarks.layer_gpu`` and ``benchmarks.ops_gpu`` (either may be left out: its targets are
N/A). Prints each target's worst case over the measured shapes, token counts and routings.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from benchmarks.common import CPU_LABEL, machine_line, table

# Shapes with many small experts (benchmarks.gpu_harness.SHAPES), where grouped GEMMs must beat
# torch._grouped_mm.
FINE_GRAINED = ("olmoe", "qwen3_30b", "deepseek_fine")
# "benchmark" names in the JSON files (the older name of the layer benchmark still reads).
LAYER_BENCHMARKS = ("layer_gpu", "gpu_layer")
OPS_BENCHMARKS = ("gpu_ops", "ops_gpu")


@dataclass
class Target:
    name: str
    goal: str  # e.g. ">= 1.15x"
    source: str  # which script measures it: "layer" or "ops"
    value: float | None = None
    where: str = ""
    status: str = "N/A"


def _best_ours(rows: list[dict], **match) -> dict[tuple, dict]:
    """Per case (shape, T, routing, pass[, op]) the fastest checked moe_kernels row."""
    best = {}
    for r in rows:
        if r.get("group") != "ours" or r.get("status") != "ok" or r.get("ms") is None:
            continue
        if any(r.get(k) != v for k, v in match.items()):
            continue
        key = (r["shape"], r["T"], r["routing"], r.get("pass"), r.get("op"))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return best


def _find(rows, ref: dict, impl: str) -> dict | None:
    for r in rows:
        if (
            r.get("impl") == impl
            and r.get("status") == "ok"
            and r.get("ms") is not None
            and all(r.get(k) == ref.get(k) for k in ("shape", "T", "routing", "pass", "op"))
        ):
            return r
    return None


def _ratio_target(
    t: Target, pairs: list[tuple[str, float]], at_least: float, missing: str, pct=False
):
    """Worst case of ``pairs`` (label, ratio) against ``at_least``; N/A (missing) without any."""
    if not pairs:
        t.status = f"N/A ({missing})"
        return
    where, v = min(pairs, key=lambda p: p[1])
    t.value, t.where = v, f"worst: {where}"
    f = (lambda x: f"{100 * x:.3g}%") if pct else (lambda x: f"{x:.3g}")
    t.status = "met" if v >= at_least else f"shortfall ({f(v)} < {f(at_least)})"


def _case_label(r: dict) -> str:
    op = f"{r['op']} " if r.get("op") else ""
    return f"{op}{r['shape']} T={r['T']} {r['routing']}"


def _why_missing(rows: list[dict], impl: str, **match) -> str:
    """Why no (ours, impl) pair was found: the first non-ok status of ``impl`` or of ours."""
    sel = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if not any(r["group"] == "ours" and r["status"] == "ok" for r in sel):
        return "no checked moe_kernels rows"
    base = [r for r in sel if r["impl"] == impl]
    if not base:
        return f"no {impl} rows"
    bad = next((r["status"] for r in base if r["status"] != "ok"), None)
    return f"{impl}: {bad}" if bad else f"no {impl} rows"


def evaluate_targets(
    layer_rows: list[dict] | None, memory_rows: list[dict] | None, ops_rows: list[dict] | None
) -> list[Target]:
    """The issue's targets from measured rows, each the worst case over the measured shapes,
    token counts and routings (best moe_kernels backend per case); N/A when rows are missing."""
    out = []
    fwd = {"pass": "fwd"}
    for name, goal, shapes, impl in (
        ("grouped GEMM vs torch._grouped_mm, fine-grained shapes", 1.15, FINE_GRAINED,
         "torch._grouped_mm"),
        ("grouped GEMM vs dense GEMM at equal FLOPs, mixtral", 0.85, ("mixtral",), "dense mm"),
    ):  # fmt: skip
        t = Target(name, f">= {goal:g}x", "ops")
        if ops_rows is not None:
            pairs = []
            for r in _best_ours(ops_rows, **fwd).values():
                if r["op"].startswith("grouped_mm") and r["shape"] in shapes:
                    base = _find(ops_rows, r, impl)
                    if base:
                        pairs.append((_case_label(r), base["ms"] / r["ms"]))
            gmm = [r for r in ops_rows if r["op"].startswith("grouped_mm") and r["shape"] in shapes]
            missing = _why_missing(gmm, impl, **fwd) if gmm else f"no {'/'.join(shapes)} rows"
            _ratio_target(t, pairs, goal, missing)
        out.append(t)
    for impl, goal, label in (
        ("torch_grouped_mm", 1.2, "torch._grouped_mm layer"),
        ("megablocks", 1.5, "MegaBlocks dMoE"),
    ):
        t = Target(f"layer fwd+bwd vs {label}", f">= {goal:g}x", "layer")
        if layer_rows is not None:
            pairs = []
            for r in _best_ours(layer_rows, **{"pass": "fwd+bwd"}).values():
                base = _find(layer_rows, r, impl)
                if base:
                    pairs.append((_case_label(r), base["ms"] / r["ms"]))
            missing = _why_missing(layer_rows, impl, **{"pass": "fwd+bwd"})
            _ratio_target(t, pairs, goal, missing)
        out.append(t)
    for op in ("topk_gating", "route", "dispatch", "combine", "routing_histogram"):
        t = Target(f"{op} bandwidth at T=32768, fraction of copy", ">= 75%", "ops")
        if ops_rows is not None:
            pairs = [
                (_case_label(r), r["frac_copy"])
                for r in _best_ours(ops_rows, op=op).values()
                if r["T_nominal"] == 32768 and r.get("frac_copy") is not None
            ]
            _ratio_target(t, pairs, 0.75, "no checked moe_kernels rows at T=32768", pct=True)
        out.append(t)
    t = Target("activation memory vs torch._grouped_mm layer", "<= 1.0x", "layer")
    if memory_rows is not None:
        worst = None
        for r in memory_rows:
            if r.get("group") == "ours" and r.get("vs_torch_grouped_mm") is not None:
                if worst is None or r["vs_torch_grouped_mm"] > worst[1]:
                    worst = (f"{r['impl']} {_case_label(r)}", r["vs_torch_grouped_mm"])
        if worst:
            t.value, t.where = worst[1], f"worst: {worst[0]}"
            t.status = "met" if worst[1] <= 1.0 else f"shortfall ({worst[1]:.3g} > 1)"
        else:
            t.status = "N/A (no checked moe_kernels and torch_grouped_mm memory rows)"
    out.append(t)
    for t in out:
        if t.status == "N/A":
            script = "layer_gpu" if t.source == "layer" else "ops_gpu"
            t.status = f"N/A (measured by benchmarks.{script})"
    return out


def targets_table(targets: list[Target], smoke: bool) -> str:
    title = "Targets" + (f" ({CPU_LABEL}: says nothing about the targets)" if smoke else "")
    rows = [[t.name, t.goal, t.value, t.where, t.status] for t in targets]
    return title + "\n\n" + table(["target", "goal", "measured", "where", "status"], rows)


def targets_json(targets: list[Target]) -> list[dict]:
    return [asdict(t) for t in targets]


def main(argv=None) -> list[Target]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_targets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", help="JSON files written by layer_gpu / ops_gpu --json")
    args = p.parse_args(argv)
    layer = memory = ops = None
    smoke = False
    for path in args.results:
        with open(path) as f:
            res = json.load(f)
        smoke = smoke or res["machine"]["smoke"] or "not a GPU figure" in res["machine"]["timer"]
        print(f"{path}: {machine_line(res['machine'])}")
        if res["benchmark"] in LAYER_BENCHMARKS:
            layer, memory = res["layer"], res["memory"] or None
        elif res["benchmark"] in OPS_BENCHMARKS:
            ops = res["ops"]
        else:
            p.error(f"{path}: not a layer_gpu / ops_gpu result")
    targets = evaluate_targets(layer, memory, ops)
    print()
    print(targets_table(targets, smoke))
    return targets


if __name__ == "__main__":
    main()
