"""Expert parallelism: tokens/s of the MoE layer's forward + backward at EP = 1, 2, 4 on CPU with
gloo, the exchange time measured apart from the rest (router, plans, experts, combine).

Every rank routes the same number of its own tokens (weak scaling: P ranks process P times the
tokens of one), so tokens/s = P * T / (time per step). EP = 1 is the plain layer in one process
(no exchange); EP = P > 1 runs P spawned processes (gloo, file store, 1 thread each) holding
E / P experts each. "exchange ms" is the time spent inside the expert-parallel all-to-alls per
step (the count exchange, dispatch and return, and their backward exchanges, waiting for the
slowest rank included), timed around every call; "other ms" is the rest of the step.

Run: ``python -m benchmarks.ep_cpu`` (``--pad`` adds the padded exchange). On a machine with
several GPUs the same measurement runs under torchrun with NCCL, one GPU per rank, timed with
CUDA events: ``torchrun --nproc_per_node 8 -m benchmarks.ep_cpu --device cuda`` (EP = world
size; ``--tokens``/``--shapes`` as here).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import machine
from moe_kernels import MoE, parallel
from moe_kernels.tables import markdown_table

# Named shapes: (name, T per rank, D, F, E, K)
SHAPES = [
    ("coarse-top2", 2048, 256, 512, 8, 2),
    ("fine-top8", 1024, 256, 128, 64, 8),
]
HEADER = [
    "shape",
    "dims",
    "exchange",
    "EP",
    "ms / step",
    "exchange ms",
    "other ms",
    "tokens/s",
    "vs EP=1",
]


class _Clock:
    """Wall time on CPU, CUDA events on GPU; ``total()`` in ms (synchronises on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, t0) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((t0, ev))
        else:
            self.spans.append(1e3 * (time.perf_counter() - t0))

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum(self.spans)


def _instrument(clock: _Clock) -> None:
    """Time every expert-parallel all-to-all (forward and backward) into ``clock``."""
    inner = parallel._all_to_all

    def timed(*args, **kwargs):
        t0 = clock.start()
        out = inner(*args, **kwargs)
        clock.stop(t0)
        return out

    parallel._all_to_all = timed


def measure(shape, ep: int, pad: bool, steps: int, device: torch.device) -> tuple[float, float]:
    """(ms per step, exchange ms per step) on this rank, medians over ``steps`` steps."""
    _, T, D, Fh, E, K = shape
    torch.manual_seed(0)
    group = parallel.init_mesh(ep, device.type) if ep > 1 else None
    layer = MoE(D, Fh, E, K, aux_coef=0.0, z_coef=0.0, ep_group=group, ep_pad=pad).to(device)
    g = torch.Generator(device=device).manual_seed(1 + (dist.get_rank() if ep > 1 else 0))
    x = torch.randn(T, D, generator=g, device=device, requires_grad=True)
    exch = _Clock(device)
    if ep > 1:
        _instrument(exch)
    totals, exchanges = [], []
    for i in range(steps + 2):  # two warm-up steps
        if ep > 1:
            dist.barrier()
        exch.spans.clear()
        step = _Clock(device)
        t0 = step.start()
        layer(x).sum().backward()
        step.stop(t0)
        if i >= 2:
            totals.append(step.total())
            exchanges.append(exch.total())
    return statistics.median(totals), statistics.median(exchanges)


def _worker(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=300)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timeout)
    res = _all_shapes(world, args, torch.device("cpu"))
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def _all_shapes(ep: int, args, device: torch.device) -> dict:
    """{(shape, pad): (ms, exchange ms)}, the slowest rank's figures."""
    res = {}
    for shape in (s for s in SHAPES if s[0] in args.shapes):
        for pad in (False, True) if args.pad and ep > 1 else (False,):
            ms = torch.tensor(measure(shape, ep, pad, args.steps, device), device=device)
            if ep > 1:
                dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            res[(shape[0], pad)] = tuple(ms.tolist())
    return res


def _spawn(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        store = f"file://{tmp}/store"
        mp.spawn(_worker, args=(world, store, args, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def _rows(results: dict[int, dict]) -> list[list]:
    rows = []
    base = {}
    for ep, res in sorted(results.items()):
        for (name, pad), (ms, ex) in res.items():
            _, T, D, Fh, E, K = next(s for s in SHAPES if s[0] == name)
            tps = ep * T / (ms / 1e3)
            base.setdefault(name, tps)
            rows.append(
                [name, f"T={T}/rank D={D} F={Fh} E={E} k={K}", "padded" if pad else "exact",
                 ep, ms, ex, ms - ex, tps, tps / base[name]]
            )  # fmt: skip
    return rows


def _load() -> str:
    try:
        return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "load average unknown"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES])
    p.add_argument("--eps", nargs="*", type=int, default=[1, 2, 4], help="EP sizes (CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    p.add_argument("--pad", action="store_true", help="also time the padded exchange")
    p.add_argument("--device", default="cpu", help="cpu (spawned gloo ranks) or cuda (torchrun)")
    args = p.parse_args()
    print(f"machine: {machine()}; {_load()} at start", flush=True)
    if args.device == "cuda":  # under torchrun: NCCL, one GPU per rank, EP = world size
        dist.init_process_group("nccl")
        rank = dist.get_rank()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        world = dist.get_world_size()
        results = {world: _all_shapes(world, args, torch.device("cuda"))}
        dist.destroy_process_group()
        if rank:
            return
    else:
        torch.set_num_threads(1)
        results = {
            ep: _all_shapes(1, args, torch.device("cpu")) if ep == 1 else _spawn(ep, args)
            for ep in args.eps
        }
    print(f"{_load()} at end; {datetime.date.today()}\n")
    print(markdown_table(HEADER, _rows(results), digits=3))


if __name__ == "__main__":
    main()
