"""Cost of on-device routing statistics: MoE layer forward+backward with stats on vs off.

Statistics add two ``routing_histogram`` calls (requested and kept counts by label x expert,
with gate-weight sums) and the router entropy / max-probability sums per forward, with no host
synchronisation. This script times a training step of one layer (forward, aux loss, backward)
both ways, interleaving the two so drift affects both equally, and prints the median times and
the overhead in percent, plus the time of the statistics update alone relative to a step.
CPU host clocks are fine here (the work is synchronous); a GPU run would need CUDA events.

Run: ``python -m benchmarks.stats_cpu [--reps 30]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from moe_kernels import MoE, aux_losses, stats
from moe_kernels.tables import markdown_table

# (name, T tokens, d_model, d_ff, E, k): small testbed shapes that run in seconds on a laptop CPU.
SHAPES = [
    ("tiny", 1024, 128, 256, 8, 2),
    ("small", 2048, 256, 512, 16, 2),
    ("small-k4", 2048, 256, 256, 32, 4),
]


def step(layer: MoE, x: torch.Tensor, labels: torch.Tensor) -> None:
    y = layer(x, labels=labels)
    (y.float().square().mean() + aux_losses(layer)).backward()
    layer.zero_grad(set_to_none=True)


def measure(shape, reps: int, groups: int) -> tuple[float, float]:
    _, T, D, F, E, k = shape
    torch.manual_seed(0)
    layer = MoE(D, F, E, k)
    x = torch.randn(T, D)
    labels = torch.randint(0, groups, (T,))
    times = {True: [], False: []}
    for on in (False, True):  # warm-up both paths; the loop below ends with stats on
        (stats.enable(layer, num_labels=groups) if on else stats.disable(layer))
        for _ in range(3):
            step(layer, x, labels)
    for _ in range(reps):
        for on in (False, True):
            (stats.enable(layer, num_labels=groups) if on else stats.disable(layer))
            t0 = time.perf_counter()
            step(layer, x, labels)
            times[on].append(time.perf_counter() - t0)
    off, on = (1e3 * statistics.median(times[v]) for v in (False, True))
    return off, on, 1e3 * record_time(layer, x, labels, reps)


def record_time(layer: MoE, x: torch.Tensor, labels: torch.Tensor, reps: int) -> float:
    """Median time of the statistics update alone (what stats add to a forward), measured on
    the same routing decision: less sensitive to machine noise than the difference of steps."""
    with torch.no_grad():
        dec = layer.router(x)
        plan = layer._plan(dec, x.shape[0])
        kept = torch.where(plan.slot_row_TK >= 0, dec.experts_TK, -1)
    rec = lambda: layer._stats.record(
        dec.experts_TK, kept, dec.weights_TK, dec.scores_TE, layer.config.score, labels
    )
    for _ in range(3):
        rec()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rec()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--groups", type=int, default=8, help="number of labels (domains)")
    args = ap.parse_args()
    print(
        f"# stats overhead, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), median of {args.reps}"
    )
    rows = []
    for shape in SHAPES:
        off, on, rec = measure(shape, args.reps, args.groups)
        overhead, share = f"{100 * (on - off) / off:+.1f}%", f"{100 * rec / off:.2f}%"
        rows.append([*shape, off, on, overhead, rec, share])
    print(markdown_table(HEADER, rows, digits=3))


HEADER = ["shape", "T", "D", "F", "E", "k", "stats off (ms)", "stats on (ms)", "overhead"]
HEADER += ["record only (ms)", "record / step"]


if __name__ == "__main__":
    main()
