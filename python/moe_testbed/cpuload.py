"""CPU oversubscription: how many cores this process may use and whether others are using them.

Two torch processes with intra-op thread pools on the same cores slow each other down by far
more than 2x (spinning OpenMP workers wait for descheduled peers): one ``grouped_mm`` of
1024 x 128 x 128 went from 0.5 ms to 124 ms with a second 2-thread process on the same two
cores. ``moe-testbed sweep`` therefore gives its J parallel runs ``cores // J`` threads each,
and the trainer warns when other processes already keep the cores busy
(:func:`warn_if_oversubscribed`).

A sweep tells its runs how many threads their siblings use in ``MOE_TESTBED_SIBLING_THREADS``,
so that load the sweep planned for is not counted against a run.
"""

from __future__ import annotations

import os
import sys

SIBLINGS_ENV = "MOE_TESTBED_SIBLING_THREADS"
_checked = False  # the check sleeps a quarter second: once per process is enough


def cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, n_cores: int | None = None) -> int:
    """Threads each of ``jobs`` parallel processes gets so that together they fit the cores:
    ``max(1, cores // jobs)``."""
    n = cores() if n_cores is None else n_cores
    return max(1, n // max(1, jobs))


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process and its threads) or None where
    ``/proc`` is not readable (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy, int(own[11]) + int(own[12])  # utime + stime


def others_busy(window: float = 0.25) -> float | None:
    """Cores that other processes kept busy during the last ``window`` seconds, measured from
    ``/proc/stat`` less this process's own CPU time; None where that cannot be read.

    Unlike the load average (a one-minute mean that still counts a finished ``pip install`` or
    this process's own earlier work), this is what the cores do now."""
    import time

    first = _cpu_ticks()
    if first is None:
        return None
    tic = time.perf_counter()
    time.sleep(window)
    second = _cpu_ticks()
    elapsed = time.perf_counter() - tic
    if second is None or elapsed <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (second[0] - first[0]) - (second[1] - first[1])
    return max(0.0, others / hz / elapsed)


def oversubscription(
    own_threads: int, load: float | None = None, n_cores: int | None = None, who: str = "run"
) -> str | None:
    """A warning text when ``load`` (cores busy with other processes: by default
    :func:`others_busy`, or the 1-minute load average where that cannot be measured, less the
    planned sibling threads of a sweep) plus ``own_threads`` exceeds the cores; else None.
    ``who`` names the process in the text ("run", "sweep")."""
    n = cores() if n_cores is None else n_cores
    what = "other processes use {:.1f} core(s)"
    if load is None:
        load = others_busy()
        if load is None:
            try:
                load, what = os.getloadavg()[0], "load average {:.1f}"
            except (AttributeError, OSError):
                return None
        try:
            siblings = max(0, int(os.environ.get(SIBLINGS_ENV, "0")))
        except ValueError:
            siblings = 0
        load = max(0.0, load - siblings)
    if load + own_threads <= n + 0.5:  # half a core of slack for measurement noise
        return None
    return (
        f"warning: this machine looks oversubscribed: {what.format(load)} + this {who}'s "
        f"{own_threads} thread(s) > {n} core(s); torch ops slow down many times over when "
        "processes share cores (set OMP_NUM_THREADS / torch threads lower, or run fewer jobs)"
    )


def warn_if_oversubscribed(own_threads: int | None = None) -> str | None:
    """Check once per process (the first run a process starts, before its own threads are busy)
    and print the :func:`oversubscription` warning to stderr; returns it, None when checked
    before."""
    global _checked
    if _checked:
        return None
    _checked = True
    if own_threads is None:
        import torch

        own_threads = torch.get_num_threads()
    text = oversubscription(own_threads)
    if text is not None:
        print(f"moe-testbed: {text}", file=sys.stderr, flush=True)
    return text
