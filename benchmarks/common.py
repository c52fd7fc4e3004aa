"""Timing, machine and table helpers shared by the benchmarks (host clocks are fine on CPU; GPU
benchmarks time with CUDA events instead). Tables are ``moe_kernels.tables.markdown_table``."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

# ``markdown_table`` is imported from here by the op benchmarks.
from moe_kernels.tables import markdown_table


def bench(fn, *, warmup: int = 2, reps: int = 7, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


CPU_LABEL = "CPU smoke, not a GPU figure"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table of benchmark rows: 3 significant digits, "-" for a missing value."""
    return markdown_table(header, [["-" if v is None else v for v in r] for r in rows], digits=3)


def machine_line(info: dict) -> str:
    """One line naming the device, the versions and the timer of a GPU benchmark result."""
    return (
        f"device: {info['device']}; torch {info['torch']}, CUDA {info['cuda']}, "
        f"triton {info['triton']}, Python {info['python']}; timer: {info['timer']}"
    )


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``moe_kernels.selfcheck``'s writer)."""
    from moe_kernels.selfcheck import write_json_atomic as write

    write(path, obj)


def versions() -> dict:
    """torch / CUDA / triton / Python versions (triton: "not installed" when absent)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    """GPU name with compute capability and memory, or the CPU model, cores and torch threads."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return machine().split(", torch ")[0] + f", {torch.get_num_threads()} torch threads"
