"""The fixed inputs of the backend self-checks and how each op family's backend is compared with
the reference on them (used by the first-use check, ``moe_kernels._first_use``, and by
``python -m moe_kernels.selfcheck``).

Every case is small and built on the CPU from a fixed seed, then moved to the device. The quick
set covers the edge cases (one token, an empty expert, k = E, every token to one expert, dropped
slots, padding rows); ``full=True`` adds larger and odd shapes. A backend runs each op of its
family it implements, forward and backward (combine is dispatch's backward and the reverse,
weight_grad the gate weights' gradient, grouped_mm on transposed weights dx and grouped_mm_dw dw),
and its outputs are compared with the reference backend's run in fp64 on the same device: exact
for ids, plans and counts, :mod:`moe_kernels.tolerances` for float outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moe_kernels.ops import _select as S
from moe_kernels.tolerances import Tolerance, max_error, tolerance

FAMILIES = ("topk_gating", "route", "dispatch_combine", "grouped_mm", "routing_histogram")
EXACT = Tolerance(0.0, 0.0)
# The key dtypes a family is checked in (see moe_kernels.ops._select._key_tensor): the data dtype,
# or int32 for the integer-only ops (route without gate weights, routing_histogram).
FAMILY_DTYPES = {
    "topk_gating": S.FLOAT_DTYPES,
    "route": (torch.int32, torch.float32, torch.float64),
    "dispatch_combine": S.FLOAT_DTYPES,
    "grouped_mm": S.FLOAT_DTYPES,
    "routing_histogram": (torch.int32,),
}
DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int32: "int32",
}


@dataclass
class Row:
    """One op of one backend on one case: the self-check table's row."""

    op: str
    backend: str
    dtype: str
    shape: str
    max_err: float | None
    tol: str
    verdict: str  # "ok", "FAIL" or "ERROR: <exception>"
    ms: float

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    name: str  # what it covers, e.g. "T=1", "empty expert"
    params: dict


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(T, K, E, seed, *, pattern=""):
    """(T, K) int32 distinct expert ids per token; "empty": expert E-1 never chosen; "one": every
    token to expert E // 2 (K must be 1)."""
    if pattern == "one":
        return torch.full((T, K), E // 2, dtype=torch.int32)
    n = E - 1 if pattern == "empty" else E
    return torch.topk(torch.rand(T, n, generator=_gen(seed)), K, -1).indices.to(torch.int32)


# ---- cases ---------------------------------------------------------------------------------------

# Per family: the parameter names, then (name, *values) rows of the quick cases and the extra ones
# of the full set.
FIELDS = {
    "topk_gating": ("T", "E", "k", "score", "normalize", "bias", "hot"),
    "route": ("T", "K", "E", "capacity", "pattern", "drop", "ties"),
    "dispatch_combine": ("T", "K", "E", "D", "capacity", "pattern"),
    "grouped_mm": ("sizes", "pad", "D", "F"),
    "routing_histogram": ("T", "K", "G", "E", "pattern"),
}
QUICK = {
    "topk_gating": [
        ("T=1", 1, 4, 2, "softmax", True, False, None),
        ("K=E", 5, 4, 4, "sigmoid", True, False, None),
        ("one expert", 6, 4, 1, "softmax", False, False, 2),
        ("bias", 7, 8, 2, "sigmoid", True, True, None),
    ],
    "route": [
        ("T=1", 1, 1, 4, None, "", "position", False),
        ("empty expert", 8, 2, 4, None, "empty", "position", False),
        ("K=E", 5, 4, 4, None, "", "position", False),
        ("one expert", 9, 1, 4, None, "one", "position", False),
        ("capacity", 9, 2, 4, 3, "", "position", False),
    ],
    "dispatch_combine": [
        ("T=1", 1, 1, 4, 16, None, ""),
        ("empty expert", 8, 2, 4, 16, None, "empty"),
        ("K=E", 5, 4, 4, 16, None, ""),
        ("one expert", 9, 1, 4, 16, None, "one"),
        ("dropped", 9, 2, 4, 16, 3, ""),
    ],
    "grouped_mm": [
        ("T=1", [0, 1, 0, 0], 0, 16, 24),
        ("empty expert", [3, 0, 5, 2], 2, 16, 24),
        ("K=E", [4, 4, 4, 4], 0, 16, 24),
        ("one expert", [0, 0, 9, 0], 0, 16, 24),
        ("all empty", [0, 0, 0], 3, 16, 24),
    ],
    "routing_histogram": [
        ("T=1", 1, 1, 3, 4, ""),
        ("skipped ids", 12, 2, 3, 4, "skip"),
        ("one expert", 9, 1, 3, 4, "one"),
    ],
}
FULL = {
    "topk_gating": [
        ("T=300 E=64", 300, 64, 8, "softmax", True, True, None),
        ("E=256 k=16", 33, 256, 16, "sigmoid", False, False, None),
        ("hot E=64", 70, 64, 1, "sigmoid", True, False, 63),
    ],
    "route": [
        ("T=2000 E=64", 2000, 8, 64, None, "", "position", False),
        ("capacity E=64", 700, 4, 64, 20, "", "position", False),
        ("capacity 0", 6, 2, 4, 0, "", "position", False),
    ],
    "dispatch_combine": [
        ("T=500 D=264", 500, 4, 16, 264, None, ""),
        ("dropped E=16", 300, 2, 16, 72, 20, ""),
    ],
    "grouped_mm": [
        ("E=64 D=128", [(7 * e) % 50 if e % 4 else 0 for e in range(64)], 5, 128, 64),
        ("odd dims", [17, 0, 130], 3, 72, 40),
        ("big expert", [0, 600, 1, 0], 0, 256, 128),
    ],
    "routing_histogram": [("T=4000 E=64", 4000, 8, 7, 64, "skip")],
}
# route with float gate weights (its key dtype is then the weights'): score dropping, with ties.
ROUTE_SCORE = [
    ("score drop", 9, 2, 4, 3, "", "score", False),
    ("score drop ties", 8, 2, 4, 2, "", "score", True),
]


def cases(family: str, dtype: torch.dtype, full: bool = False) -> list[Case]:
    """The fixed cases of ``family`` for key dtype ``dtype``."""
    rows = QUICK[family] + (FULL[family] if full else [])
    if family == "route" and dtype.is_floating_point:
        rows = rows + ROUTE_SCORE
    return [Case(r[0], dict(zip(FIELDS[family], r[1:]))) for r in rows]


# ---- per family: the selection inputs of a case, and its rows -------------------------------


def _topk_inputs(p, dtype, device):
    T, E = p["T"], p["E"]
    g = _gen(T * 131 + E)
    # Distinct multiples of 1/32 below 8: exact in bf16 and fp16, no near-ties in any dtype.
    perm = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    logits = perm / 32
    if p["hot"] is not None:
        logits[:, p["hot"]] = (E + 32) / 32
    bias = torch.linspace(0.3, -0.2, E, dtype=torch.float32) if p["bias"] else None
    logits = logits.to(device=device, dtype=dtype)
    return logits, (bias.to(device) if bias is not None else None)


def _run_topk(b, ref, p, dtype, device, timed):
    logits, bias = _topk_inputs(p, dtype, device)
    k, score, norm = p["k"], p["score"], p["normalize"]
    if S._reasons(b, dict(logits=logits, bias=bias, k=k), forced=True):
        return None
    rows = []
    (w, ex), ms = timed(lambda: b.forward(logits, k, score, bias, norm))
    w_ref, ex_ref = ref.forward(logits.double(), k, score, bias, norm)
    rows.append(("topk_gating", [(w, w_ref, tolerance(w.dtype)), (ex, ex_ref, EXACT)], ms))
    if callable(getattr(b, "backward", None)):
        grad = torch.randn(logits.shape[0], k, generator=_gen(7)).to(device)
        grad = grad.to(S.weight_dtype_for(dtype))
        d, ms = timed(lambda: b.backward(grad, logits, ex_ref, score, norm))
        d_ref = ref.backward(grad.double(), logits.double(), ex_ref, score, norm)
        rows.append(("topk_gating_backward", [(d, d_ref, tolerance(dtype))], ms))
    return rows


def _route_inputs(p, dtype, device):
    T, K, E = p["T"], p["K"], p["E"]
    experts = _ids(T, K, E, seed=T + 17 * K, pattern=p["pattern"]).to(device)
    weights = None
    if dtype.is_floating_point:
        if p["ties"]:  # equal weights within each token: ties broken by slot order
            weights = torch.full((T, K), 0.5, dtype=dtype)
        else:
            weights = torch.rand(T, K, generator=_gen(T), dtype=torch.float64).to(dtype)
        weights = weights.to(device)
    return experts, weights


def _run_route(b, ref, p, dtype, device, timed):
    experts, weights = _route_inputs(p, dtype, device)
    E = p["E"]
    cap = -1 if p["capacity"] is None else p["capacity"]
    drop = p["drop"]
    if S._reasons(b, dict(experts=experts, weights=weights, num_experts=E), forced=True):
        return None
    out, ms = timed(lambda: b.forward(experts, E, cap, weights, drop))
    out_ref = ref.forward(experts, E, cap, weights, drop)
    return [("route", [(a, r, EXACT) for a, r in zip(out, out_ref)], ms)]


def _plan(p, device):
    from moe_kernels.ops.route import route_reference

    T, K, E = p["T"], p["K"], p["E"]
    experts = _ids(T, K, E, seed=3 * T + K, pattern=p["pattern"])
    _, _, _, row_slot, slot_row = route_reference(experts, E, p["capacity"])
    return row_slot.to(device), slot_row.to(device)


def _run_dispatch_combine(b, ref, p, dtype, device, timed):
    T, K, D = p["T"], p["K"], p["D"]
    row_slot, slot_row = _plan(p, device)
    N = row_slot.shape[0]
    g = _gen(T * D)
    wdtype = S.weight_dtype_for(dtype)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    weights = torch.rand(T, K, generator=g, dtype=torch.float64).to(device=device, dtype=wdtype)
    rows = []
    if not S._reasons(b, dict(x=x, weights=weights), forced=True):
        out, ms = timed(lambda: b.dispatch(x, row_slot, K, weights))
        out_ref = ref.dispatch(x.double(), row_slot, K, weights.double())
        rows.append(("dispatch", [(out, out_ref, tolerance(dtype))], ms))
    if not S._reasons(b, dict(x=y, weights=weights), forced=True):
        out, ms = timed(lambda: b.combine(y, slot_row, weights))
        out_ref = ref.combine(y.double(), slot_row, weights.double())
        rows.append(("combine", [(out, out_ref, tolerance(dtype))], ms))
    if not S._reasons(b, dict(x=y, weights=None), forced=True):
        out, ms = timed(lambda: b.weight_grad(x, y, slot_row, wdtype))
        out_ref = ref.weight_grad(x.double(), y.double(), slot_row, torch.float64)
        rows.append(("weight_grad", [(out, out_ref, tolerance(wdtype, D))], ms))
    return rows or None


def _run_grouped_mm(b, ref, p, dtype, device, timed):
    sizes, D, F = p["sizes"], p["D"], p["F"]
    E, N = len(sizes), sum(sizes) + p["pad"]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    offsets = offsets.to(device)
    g = _gen(N * 7 + D)
    x = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(E, D, F, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(N, F, generator=g).to(device=device, dtype=dtype)
    rows = []
    if not S._reasons(b, dict(x=x, w=w), forced=True):
        y, ms = timed(lambda: b.forward(x, w, offsets))
        y_ref = ref.forward(x.double(), w.double(), offsets)
        rows.append(("grouped_mm", [(y, y_ref, tolerance(dtype, D))], ms))
    wt = w.transpose(1, 2)
    if not S._reasons(b, dict(x=dy, w=wt), forced=True):
        dx, ms = timed(lambda: b.forward(dy, wt, offsets))
        dx_ref = ref.forward(dy.double(), wt.double(), offsets)
        rows.append(("grouped_mm (dx)", [(dx, dx_ref, tolerance(dtype, F))], ms))
    if callable(getattr(b, "dw", None)) and not S._reasons(b, dict(x=x, w=w), forced=True):
        dw, ms = timed(lambda: b.dw(x, dy, offsets))
        dw_ref = ref.dw(x.double(), dy.double(), offsets)
        red = max(sizes) if sizes else 0
        rows.append(("grouped_mm_dw", [(dw, dw_ref, tolerance(dtype, red))], ms))
    return rows or None


def _run_histogram(b, ref, p, dtype, device, timed):
    T, K, G, E = p["T"], p["K"], p["G"], p["E"]
    g = _gen(T + G)
    experts = _ids(T, K, E, seed=T, pattern=p["pattern"] if p["pattern"] == "one" else "")
    labels = torch.randint(0, G, (T,), generator=g)
    if p["pattern"] == "skip":
        experts[::5, 0] = -1  # dropped slots
        labels[1::4] = -1  # padding tokens
    weights = torch.rand(T, K, generator=g)
    experts, labels, weights = experts.to(device), labels.to(device), weights.to(device)
    start = torch.arange(G * E).reshape(G, E).to(device)  # accumulates onto what is there
    out, out_w = start.clone(), torch.ones(G, E, device=device)
    if S._reasons(b, dict(experts=experts, out=out), forced=True):
        return None
    _, ms = timed(lambda: b.forward(experts, labels, out, weights, out_w))
    out_ref, out_w_ref = start.clone(), torch.ones(G, E, dtype=torch.float64, device=device)
    ref.forward(experts, labels, out_ref, weights.double(), out_w_ref)
    red = T * K
    return [
        (
            "routing_histogram",
            [(out, out_ref, EXACT), (out_w, out_w_ref, tolerance(torch.float32, red))],
            ms,
        )
    ]


RUNNERS: dict[str, Callable] = {
    "topk_gating": _run_topk,
    "route": _run_route,
    "dispatch_combine": _run_dispatch_combine,
    "grouped_mm": _run_grouped_mm,
    "routing_histogram": _run_histogram,
}


def _timer(device: torch.device):
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, (time.perf_counter() - t0) * 1e3

    return timed


def _shape_text(family: str, p: dict) -> str:
    keys = {"grouped_mm": ("D", "F")}.get(family, ("T", "K", "k", "E", "D", "G", "capacity"))
    dims = [f"{k}={p[k]}" for k in keys if k in p and p[k] is not None]
    if family == "grouped_mm":
        dims = [f"E={len(p['sizes'])}", f"N={sum(p['sizes']) + p['pad']}"] + dims
    return " ".join(dims)


def check_case(
    family: str, backend: S.Backend, reference: S.Backend, case: Case, dtype, device
) -> list[Row]:
    """The rows of one case: [] when the backend declines it (not a failure)."""
    dname = DTYPE_NAMES.get(dtype, str(dtype))
    shape = f"{case.name}: {_shape_text(family, case.params)}"
    timed = _timer(device)
    try:
        with torch.no_grad():
            results = RUNNERS[family](backend, reference, case.params, dtype, device, timed)
    except Exception as exc:  # a broken kernel may raise anything: that is the finding
        msg = f"ERROR: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return [Row(family, backend.name, dname, shape, None, "-", msg[:200], 0.0)]
    rows = []
    for op, pairs, ms in results or []:
        worst, ok, tols = 0.0, True, []
        for actual, expected, tol in pairs:
            err, good = max_error(actual, expected, tol)
            worst, ok = max(worst, err), ok and good
            tols.append("exact" if tol == EXACT else str(tol))
        verdict = "ok" if ok else "FAIL"
        rows.append(Row(op, backend.name, dname, shape, worst, " / ".join(tols), verdict, ms))
    return rows


def check_backend(
    family: str, backend: S.Backend, reference: S.Backend, dtype, device, *, full: bool = False
) -> list[Row]:
    """Every case of ``family`` in ``dtype`` on ``device`` through ``backend``."""
    rows = []
    for case in cases(family, dtype, full):
        rows += check_case(family, backend, reference, case, dtype, device)
    return rows


def declined(family: str, backend: S.Backend, dtype, device) -> str | None:
    """Why ``backend`` takes none of the family's inputs in ``dtype`` on ``device`` (None: it takes
    them), judged on the first case's selection inputs as ``backend=`` would."""
    p = cases(family, dtype)[0].params
    inputs: dict[str, Any]
    if family == "topk_gating":
        logits, bias = _topk_inputs(p, dtype, device)
        inputs = dict(logits=logits, bias=bias, k=p["k"])
    elif family == "route":
        experts, weights = _route_inputs(p, dtype, device)
        inputs = dict(experts=experts, weights=weights, num_experts=p["E"])
    elif family == "dispatch_combine":
        x = torch.zeros(2, 16, dtype=dtype, device=device)
        inputs = dict(
            x=x, weights=torch.zeros(2, 1, dtype=S.weight_dtype_for(dtype), device=device)
        )
    elif family == "grouped_mm":
        x = torch.zeros(2, 16, dtype=dtype, device=device)
        inputs = dict(x=x, w=torch.zeros(2, 16, 24, dtype=dtype, device=device))
    else:
        inputs = dict(
            experts=torch.zeros(1, 1, dtype=torch.int32, device=device),
            out=torch.zeros(1, 1, dtype=torch.int64, device=device),
        )
    reasons = S._reasons(backend, inputs, forced=True)
    return "; ".join(reasons) if reasons else None
