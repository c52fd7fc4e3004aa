"""Shared parts of the GPU benchmarks (``benchmarks.layer_gpu``, ``benchmarks.ops_gpu``): named
shapes, routing generation, the command line, timers and the machine description. The
correctness checks live in ``benchmarks.gpu_checks`` and the targets in ``benchmarks.gpu_targets``;
their names are re-exported here, so the scripts reach everything through this module.

Shapes (bf16 by default), after the MoE layers they are named for:

======================  ====  ==  ====  =====
name                    E     k   D     F
======================  ====  ==  ====  =====
mixtral                 8     2   4096  14336
olmoe                   64    8   2048  1024
qwen3_30b               128   8   2048  768
deepseek_fine           256   8   2048  512
======================  ====  ==  ====  =====

``--smoke`` keeps E and k and divides D, F and T by 32 (F at least 16), so every path runs on a
CPU in seconds; its numbers check the harness, they are not GPU figures.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from benchmarks.common import (  # noqa: F401 (machine_line, table: re-exported for the scripts)
    CPU_LABEL,
    bench,
    device_name,
    machine_line,
    table,
    versions,
)
from benchmarks.gpu_checks import (  # noqa: F401 (re-exported for the scripts)
    TOLERANCES,
    compare,
    error_status,
    rel_errors,
    unavailable_status,
    wrong_status,
)
from benchmarks.gpu_targets import (  # noqa: F401 (re-exported for the scripts)
    FINE_GRAINED,
    Target,
    evaluate_targets,
    targets_json,
    targets_table,
)


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    k: int
    D: int
    F: int

    def dims(self) -> str:
        return f"E={self.E} k={self.k} D={self.D} F={self.F}"


SHAPES = {
    s.name: s
    for s in (
        Shape("mixtral", 8, 2, 4096, 14336),
        Shape("olmoe", 64, 8, 2048, 1024),
        Shape("qwen3_30b", 128, 8, 2048, 768),
        Shape("deepseek_fine", 256, 8, 2048, 512),
    )
}
TOKENS = (8192, 32768)
ROUTINGS = ("uniform", "skewed")
SMOKE_DIV = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def smoke_shape(s: Shape) -> Shape:
    return Shape(s.name, s.E, s.k, s.D // SMOKE_DIV, max(16, s.F // SMOKE_DIV))


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``T_nominal`` is the full-size token count a smoke T stands for
    (equal to T outside ``--smoke``); targets select rows by it."""

    shape: Shape
    T: int
    T_nominal: int
    routing: str

    def key(self) -> dict:
        return {
            "shape": self.shape.name,
            **{f: getattr(self.shape, f) for f in ("E", "k", "D", "F")},
            "T": self.T,
            "T_nominal": self.T_nominal,
            "routing": self.routing,
        }

    def label(self) -> str:
        return f"{self.shape.name} T={self.T} {self.routing}"


# ---- routing -----------------------------------------------------------------------------------


def make_routing(T: int, E: int, k: int, routing: str, zipf: float, seed: int, device):
    """Router logits (T, E) fp32 and the decision they give: softmax -> top-k -> renormalise,
    i.e. fp32 gate weights (T, k) and int32 expert ids (T, k), k distinct experts per token.

    The logits are i.i.d. Gumbel noise, so the top-k is a sample without replacement from the
    expert distribution p: ``uniform`` p = 1/E; ``skewed`` p_e proportional to (e + 1)^-zipf
    (Zipf; expert 0 is the hottest) by adding log p to the noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(T, E, generator=g, device=device).clamp_(1e-12, 1 - 1e-7)
    logits = -torch.log(-torch.log(u))
    if routing == "skewed":
        rank = torch.arange(1, E + 1, device=device, dtype=torch.float32)
        logits = logits - zipf * torch.log(rank)
    elif routing != "uniform":
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    w, e = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return logits.contiguous(), (w / w.sum(-1, keepdim=True)).contiguous(), e.to(torch.int32)


def imbalance(experts_TK: torch.Tensor, E: int) -> float:
    """Busiest expert's rows over the mean (1.0 = perfectly balanced)."""
    counts = torch.bincount(experts_TK.reshape(-1).long(), minlength=E).float()
    return float(counts.max() / counts.mean())


# ---- command line ------------------------------------------------------------------------------

COMMON_HELP = f"""
common options
  --shapes NAME...     named shapes ({", ".join(SHAPES)}); default all.
  --tokens T...        tokens per layer call; default {" ".join(map(str, TOKENS))}
                       (with --smoke: the same divided by {SMOKE_DIV}).
  --routing R...       uniform: every token picks k distinct experts uniformly at random;
                       skewed: experts drawn Zipf(--zipf, default 1.2), expert 0 hottest.
  --backends B...      moe_kernels backends to time: auto (what op selection picks per op),
                       cuda, triton, cpu, reference. A backend that is not built or does not
                       accept the inputs gets a "not available: <reason>" row.
  --dtype              bf16 (default), fp16 or fp32 for activations and weights; gate weights
                       and router logits are fp32.
  --device             cuda (default when available) or cpu.
  --smoke              tiny scaled-down shapes (E, k kept; D, F, T / {SMOKE_DIV}) that run on a CPU
                       in seconds. CPU timings are wall-clock medians labelled "{CPU_LABEL}".
  --json OUT           write every row, the machine and the targets to OUT (atomic write).
  --warmup-ms, --rep-ms  GPU timing: triton.testing.do_bench(fn, warmup, rep) median over
                       CUDA-event timings (a CUDA-event loop when triton is missing).
  --cpu-reps N         CPU timing: median of N wall-clock runs after one warm-up.
  --threads N          CPU threads for torch (default: 1 with --smoke on a CPU, so a busy
                       shared machine does not stall thread pools; else torch's default).

status column
  ok                   checked against the plain-torch reference, then timed.
  WRONG (...)          disagreed with the reference (relative errors shown); not timed.
  not available: ...   the backend is not built / does not accept the inputs.
  not installed        optional third-party package absent (never installed at run time).
  ERROR: ...           raised while running; not timed.
"""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument(
        "--backends",
        nargs="+",
        choices=["auto", "cuda", "triton", "cpu", "reference"],
        default=["auto", "cuda", "triton"],
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", metavar="OUT", default=None)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    cases: list[Case]
    smoke: bool
    backends: list[str]
    zipf: float
    seed: int


def resolve(args: argparse.Namespace) -> Config:
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.tokens is None:
        pairs = [(t // SMOKE_DIV if args.smoke else t, t) for t in TOKENS]
    else:
        pairs = [(t, t * SMOKE_DIV if args.smoke else t) for t in args.tokens]
    cases = []
    for name in args.shapes:
        shape = smoke_shape(SHAPES[name]) if args.smoke else SHAPES[name]
        for T, T_nominal in pairs:
            for routing in args.routing:
                cases.append(Case(shape, T, T_nominal, routing))
    return Config(
        torch.device(dev),
        DTYPES[args.dtype],
        cases,
        args.smoke,
        list(dict.fromkeys(args.backends)),
        args.zipf,
        args.seed,
    )


def ours_name(backend: str) -> str:
    return "moe_kernels" if backend == "auto" else f"moe_kernels[{backend}]"


@contextmanager
def cpu_threads(cfg: Config, threads: int | None):
    """Run CPU work with ``threads`` torch threads (1 for a CPU smoke run unless given)."""
    n = threads if threads is not None else (1 if cfg.device.type == "cpu" and cfg.smoke else None)
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- timing ------------------------------------------------------------------------------------


class Timer:
    """Milliseconds per call of ``fn``: triton.testing.do_bench on CUDA, host-clock median on CPU.

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call (forward+backward)."""

    def __init__(self, device: torch.device, warmup_ms=25.0, rep_ms=100.0, cpu_reps=3) -> None:
        self.device, self.warmup_ms, self.rep_ms, self.cpu_reps = (
            device,
            warmup_ms,
            rep_ms,
            cpu_reps,
        )
        self._do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench

                self._do_bench = do_bench
                self.label = "triton.testing.do_bench (CUDA events), median"
            except ImportError:
                self.label = "CUDA events, median (triton not installed)"
        else:
            self.label = f"wall clock, median of {cpu_reps} ({CPU_LABEL})"

    def __call__(self, fn, grad_to_none=None) -> float:
        grads = list(grad_to_none or [])
        if self._do_bench is not None:
            return float(
                self._do_bench(
                    fn,
                    warmup=self.warmup_ms,
                    rep=self.rep_ms,
                    grad_to_none=grads or None,
                    return_mode="median",
                )
            )

        def run():
            for t in grads:
                t.grad = None
            fn()

        if self.device.type == "cuda":
            return _cuda_events(run, self.warmup_ms, self.rep_ms)
        return bench(run, warmup=1, reps=self.cpu_reps)


def _cuda_events(fn, warmup_ms: float, rep_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    ev = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in ev)
    return times[n // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes``: GB/s counts the bytes read plus the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return {"impl": "copy", "bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / ms / 1e6}


def copy_nbytes(device: torch.device, smoke: bool) -> int:
    return (32 if smoke or device.type != "cuda" else 1024) * 2**20


# ---- machine ---------------------------------------------------------------------------------


def machine_info(device: torch.device, timer: Timer, smoke: bool) -> dict:
    info = {"device": device_name(device), **versions(), "timer": timer.label, "smoke": smoke}
    try:
        import moe_kernels

        info["moe_kernels_build"] = {k: str(v) for k, v in moe_kernels.build_info().items()}
    except Exception as exc:  # the harness must run on any build
        info["moe_kernels_build"] = {"error": str(exc)}
    if device.type != "cuda":
        info["note"] = CPU_LABEL
    return info
