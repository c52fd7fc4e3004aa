"""The GPU benchmark harness (benchmarks.layer_gpu, benchmarks.ops_gpu) in --smoke mode on CPU:
every requested row is reported, every timed implementation agrees with the plain-torch
reference, a wrong one is reported WRONG and not timed, and the activation-memory figures are
what the implementations must save."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk

# benchmarks/ is not installed; find it in the source tree, after the installed packages.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks import baselines as bl  # noqa: E402
from benchmarks import gpu_harness as H  # noqa: E402
from benchmarks import gpu_targets, layer_gpu, ops_gpu  # noqa: E402
from benchmarks.common import write_json_atomic  # noqa: E402

SMOKE = ["--smoke", "--device", "cpu", "--cpu-reps", "1"]


def tiny_problem(T=48, E=6, k=2, D=16, Fh=24, routing="skewed", dtype=torch.float32, seed=0):
    case = H.Case(H.Shape("tiny", E, k, D, Fh), T, T, routing)
    return bl.make_layer_problem(case, dtype, torch.device("cpu"), seed=seed)


def per_token_loop(p: bl.LayerProblem) -> torch.Tensor:
    out = torch.zeros_like(p.x_TD)
    for t in range(p.T):
        for j in range(p.k):
            e = int(p.experts_TK[t, j])
            h = F.silu(p.w1_EFD[e] @ p.x_TD[t]) * (p.w3_EFD[e] @ p.x_TD[t])
            out[t] += p.weights_TK[t, j] * (p.w2_EDF[e] @ h)
    return out


def test_reference_matches_a_per_token_loop():
    p = tiny_problem()
    with torch.no_grad():
        ref = bl.reference_layer(p.x_TD, p.weights_TK, p.experts_TK, p.w1_EFD, p.w3_EFD, p.w2_EDF)
        torch.testing.assert_close(ref, per_token_loop(p), atol=1e-5, rtol=1e-5)


def test_routing_draws_distinct_experts_and_skews():
    _, w, e = H.make_routing(4096, 16, 4, "uniform", 1.2, 0, "cpu")
    assert e.dtype == torch.int32 and e.shape == (4096, 4)
    assert (e.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    torch.testing.assert_close(w.sum(1), torch.ones(4096))
    assert H.imbalance(e, 16) < 1.2
    _, _, es = H.make_routing(4096, 16, 4, "skewed", 1.2, 0, "cpu")
    counts = torch.bincount(es.reshape(-1).long(), minlength=16)
    assert counts[0] == counts.max() and H.imbalance(es, 16) > 2


def test_ours_is_the_layer_expert_path():
    torch.manual_seed(0)
    layer = mk.MoE(16, 24, num_experts=6, top_k=2)
    x = torch.randn(40, 16)
    dec = layer.router(x)
    p = bl.LayerProblem(
        x, dec.weights_TK, dec.experts_TK, layer.w1_EFD, layer.w3_EFD, layer.w2_EDF, x
    )
    torch.testing.assert_close(bl.moe_kernels_layer(p), layer(x))


def test_smoke_tokens_stand_for_the_full_sizes():
    cfg = H.resolve(layer_gpu.parse_args(["--smoke", "--device", "cpu", "--shapes", "olmoe"]))
    assert [(c.T, c.T_nominal) for c in cfg.cases if c.routing == "uniform"] == [
        (256, 8192),
        (1024, 32768),
    ]
    s = cfg.cases[0].shape
    assert (s.E, s.k, s.D, s.F) == (64, 8, 64, 32)


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        layer_gpu.parse_args(["--help"])
    text = capsys.readouterr().out
    for word in ("--smoke", "--json", "--baselines", "gating", "WRONG", "not installed", "Zipf"):
        assert word in text


LAYER_IMPLS = [
    "moe_kernels",
    "moe_kernels[cuda]",
    "moe_kernels[triton]",
    "naive",
    "torch_grouped_mm",
    "megablocks",
    "scattermoe",
]


@pytest.fixture(scope="module")
def layer_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "layer.json"
    argv = SMOKE + ["--shapes", "olmoe", "mixtral", "--tokens", "128", "--json", str(out)]
    return out, layer_gpu.main(argv)


@pytest.fixture(scope="module")
def layer_result(layer_json):
    out, returned = layer_json
    with open(out) as f:
        return returned, json.load(f)


def test_layer_json_has_every_requested_row(layer_result):
    _, res = layer_result
    got = {(r["shape"], r["T"], r["routing"], r["pass"], r["impl"]) for r in res["layer"]}
    want = {
        (s, 128, rt, ps, impl)
        for s in ("olmoe", "mixtral")
        for rt in ("uniform", "skewed")
        for ps in ("fwd", "fwd+bwd")
        for impl in LAYER_IMPLS + ["dense"]
    }
    assert got == want and len(res["layer"]) == len(want)
    mem = {(r["shape"], r["routing"], r["impl"]) for r in res["memory"]}
    assert mem == {
        (s, rt, i)
        for s in ("olmoe", "mixtral")
        for rt in ("uniform", "skewed")
        for i in LAYER_IMPLS
    }
    assert res["machine"]["smoke"] and "not a GPU figure" in res["machine"]["timer"]
    assert res["ceilings"]["copy"]["gbps"] > 0
    assert len(res["targets"]) == 10


def test_layer_rows_checked_then_timed(layer_result):
    _, res = layer_result
    tol_l2, tol_max = H.TOLERANCES[torch.bfloat16]
    for r in res["layer"]:
        impl, status = r["impl"], r["status"]
        if impl in ("moe_kernels", "naive", "torch_grouped_mm"):
            assert status == "ok", r
            assert set(r["errors"]) == {"out", *bl.GRAD_NAMES}
            for l2, mx in r["errors"].values():
                assert 0 <= l2 <= tol_l2 and 0 <= mx <= tol_max
            assert r["ms"] > 0 and r["tflops"] > 0 and r["vs_best_baseline"] > 0
        elif impl in ("megablocks", "scattermoe"):
            installed = importlib.util.find_spec(impl) is not None
            assert status.startswith("not available") if installed else status == "not installed"
            assert r["ms"] is None
        elif impl == "moe_kernels[cuda]":
            assert status.startswith("not available"), r  # CPU tensors
            assert r["ms"] is None
        elif impl == "dense":
            assert r["group"] == "ceiling" and r["ms"] > 0
        else:  # triton: runs only if a kernel accepts CPU tensors (interpreter)
            assert status == "ok" or status.startswith("not available"), r


def test_layer_activation_memory(layer_result):
    _, res = layer_result
    el = 2  # bf16
    for r in res["memory"]:
        if r["impl"] not in ("moe_kernels", "naive", "torch_grouped_mm"):
            assert r["saved_bytes"] is None
            continue
        assert r["saved_bytes"] > 0 and r["cuda_peak_fwd_bytes"] is None
        if r["impl"] == "torch_grouped_mm":
            N = r["T"] * r["k"]
            # The permuted input (kept for the weight gradients of the first two GEMMs), both
            # up-projection outputs (SiLU and product backward) and their product (w2's gradient).
            assert r["saved_bytes"] >= (N * r["D"] + 3 * N * r["F"]) * el
            assert r["vs_torch_grouped_mm"] == 1.0
        else:
            assert r["vs_torch_grouped_mm"] > 0


def test_layer_result_is_the_json(layer_result):
    returned, loaded = layer_result
    assert json.loads(json.dumps(returned, default=str)) == loaded


class SwappedRows(bl.TorchGroupedMM):
    name = "swapped_rows"

    def forward(self, p):
        out = super().forward(p)
        return out[torch.tensor([1, 0, *range(2, p.T)])]


class NoGateGrad(bl.TorchGroupedMM):
    name = "no_gate_grad"

    def forward(self, p):
        q = bl.LayerProblem(**{**vars(p), "weights_TK": p.weights_TK.detach()})
        return bl.torch_grouped_mm_layer(q)


class Raises(bl.LayerImpl):
    name = "raises"

    def forward(self, p):
        raise RuntimeError("kernel launch failed")


def test_wrong_or_failing_implementations_are_reported_not_timed(monkeypatch, tmp_path):
    for cls in (SwappedRows, NoGateGrad, Raises):
        monkeypatch.setitem(bl.BASELINES, cls.name, cls)
    argv = SMOKE + ["--shapes", "olmoe", "--routing", "uniform", "--tokens", "64"]
    argv += ["--backends", "auto", "--baselines", "torch_grouped_mm", "swapped_rows"]
    argv += ["no_gate_grad", "raises", "--json", str(tmp_path / "l.json")]
    res = layer_gpu.main(argv)
    by = {(r["impl"], r["pass"]): r for r in res["layer"]}
    for ps in ("fwd", "fwd+bwd"):
        assert by["torch_grouped_mm", ps]["status"] == "ok"
        wrong = by["swapped_rows", ps]
        assert wrong["status"].startswith("WRONG") and "out rel err" in wrong["status"]
        assert wrong["ms"] is None and wrong["vs_best_baseline"] is None
        nograd = by["no_gate_grad", ps]
        assert nograd["status"].startswith("WRONG") and "weights_TK" in nograd["status"]
        assert math.isinf(nograd["errors"]["weights_TK"][0]) and nograd["ms"] is None
        assert by["raises", ps]["status"].startswith("ERROR: RuntimeError: kernel launch failed")
    mem = {r["impl"]: r for r in res["memory"]}
    assert mem["swapped_rows"]["saved_bytes"] is None


OPS_IMPLS = {
    "topk_gating": ["torch"],
    "route": ["torch"],
    "dispatch": ["torch"],
    "combine": ["torch"],
    "grouped_mm[up]": ["torch._grouped_mm", "dense mm"],
    "grouped_mm[down]": ["torch._grouped_mm", "dense mm"],
    "routing_histogram": ["torch"],
}
OURS = ["moe_kernels", "moe_kernels[cuda]", "moe_kernels[triton]"]


@pytest.fixture(scope="module")
def ops_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ops.json"
    argv = SMOKE + ["--shapes", "qwen3_30b", "--tokens", "128", "--passes", "fwd", "fwd+bwd"]
    ops_gpu.main(argv + ["--json", str(out)])
    return out


def test_ops_json_has_every_requested_row_checked(ops_json):
    with open(ops_json) as f:
        res = json.load(f)
    got = {(r["op"], r["routing"], r["pass"], r["impl"]) for r in res["ops"]}
    want = set()
    for op, chain in OPS_IMPLS.items():
        passes = ("fwd", "fwd+bwd") if op.startswith("grouped_mm") else ("fwd",)
        want |= {
            (op, rt, ps, i) for rt in ("uniform", "skewed") for ps in passes for i in chain + OURS
        }
    assert got == want and len(res["ops"]) == len(want)
    for r in res["ops"]:
        if r["impl"] in ("torch", "torch._grouped_mm", "dense mm", "moe_kernels"):
            assert r["status"] == "ok", r
            assert r["ms"] > 0
        elif r["impl"] == "moe_kernels[cuda]":
            assert r["status"].startswith("not available") and r["ms"] is None
        if r["status"] != "ok" or r["pass"] != "fwd":
            continue
        assert r["gbps"] > 0
        if r["op"].startswith("grouped_mm"):
            assert r["tflops"] > 0 and r["frac_copy"] is None and r["vs_dense"] > 0
            if r["impl"] != "dense mm":  # dense computes something else: not compared
                assert r["errors"]["y"][0] <= H.TOLERANCES[torch.bfloat16][0]
        else:
            assert r["frac_copy"] > 0 and r["vs_torch"] > 0
    assert res["ceilings"]["copy"]["gbps"] > 0


def test_targets_from_both_json_files(layer_json, ops_json, capsys):
    targets = gpu_targets.main([str(layer_json[0]), str(ops_json)])
    text = capsys.readouterr().out
    assert "not a GPU figure" in text and len(targets) == 10
    t = {x.name: x for x in targets}
    # Both sides were measured, so only targets whose rows the smoke run cannot have are N/A:
    # no mixtral in the ops run, no MegaBlocks, no T=32768 (smoke T=128 stands for 4096).
    for name, x in t.items():
        if "mixtral" in name or "MegaBlocks" in name or "T=32768" in name:
            assert x.status.startswith("N/A") and "measured by" not in x.status, x
        else:
            assert x.value is not None and x.value > 0, x
            assert x.status == "met" or x.status.startswith("shortfall"), x


def row(impl, group, ms, **kw):
    base = dict(shape="olmoe", T=256, T_nominal=8192, routing="uniform", status="ok")
    return {**base, "impl": impl, "group": group, "ms": ms, **kw}


def test_targets_met_shortfall_and_missing():
    layer = [
        row("moe_kernels", "ours", 10.0, **{"pass": "fwd+bwd"}),
        row("moe_kernels[cuda]", "ours", 8.0, **{"pass": "fwd+bwd"}),
        row("torch_grouped_mm", "baseline", 12.0, **{"pass": "fwd+bwd"}),
        row("megablocks", "baseline", None, status="not installed", **{"pass": "fwd+bwd"}),
    ]
    memory = [
        {**row("moe_kernels", "ours", None), "vs_torch_grouped_mm": 0.8},
        {**row("moe_kernels[cuda]", "ours", None), "vs_torch_grouped_mm": 1.1},
    ]
    gm = dict(op="grouped_mm[up]", **{"pass": "fwd"})
    ops = [
        row("moe_kernels", "ours", 1.0, **gm),
        row("torch._grouped_mm", "torch", 1.2, **gm),
        row(
            "dispatch_ours",
            "ours",
            1.0,
            op="dispatch",
            T_nominal=32768,
            frac_copy=0.8,
            **{"pass": "fwd"},
        ),
    ]
    t = {x.name: x for x in H.evaluate_targets(layer, memory, ops)}
    layer_t = t["layer fwd+bwd vs torch._grouped_mm layer"]
    assert layer_t.value == pytest.approx(1.5) and layer_t.status == "met"  # best ours: cuda
    assert t["layer fwd+bwd vs MegaBlocks dMoE"].status == "N/A (megablocks: not installed)"
    gmm = t["grouped GEMM vs torch._grouped_mm, fine-grained shapes"]
    assert gmm.value == pytest.approx(1.2) and gmm.status == "met"
    assert t["grouped GEMM vs dense GEMM at equal FLOPs, mixtral"].status == "N/A (no mixtral rows)"
    assert t["dispatch bandwidth at T=32768, fraction of copy"].status == "met"
    combine = t["combine bandwidth at T=32768, fraction of copy"]
    assert combine.status == "N/A (no checked moe_kernels rows at T=32768)"
    mem = t["activation memory vs torch._grouped_mm layer"]
    assert mem.value == pytest.approx(1.1) and mem.status.startswith("shortfall")
    slow = [dict(r, ms=20.0) if r["group"] == "ours" else r for r in layer]
    short = {x.name: x for x in H.evaluate_targets(slow, None, None)}
    assert short["layer fwd+bwd vs torch._grouped_mm layer"].status == "shortfall (0.6 < 1.2)"


def test_json_write_is_atomic(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {("not", "a", "string key"): 1})
    assert json.loads(path.read_text()) == {"a": 2}  # the old file survives a failed write
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind
