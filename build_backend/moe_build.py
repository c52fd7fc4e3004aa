"""PEP 517 build backend: setuptools' own, plus the CUTLASS headers when CUDA kernels will build.

One rule decides whether the CUDA kernels are compiled (:func:`cuda_build`), read by this
backend (the CUTLASS requirement) and by ``setup.py`` (the value handed to CMake):

- ``MOE_KERNELS_CUDA=0``: never; ``MOE_KERNELS_CUDA=1``: always (nvcc required; CI sets it so
  every CUDA source compiles on every run);
- ``auto`` (default): when nvcc is found **and** either a CUDA driver is installed (its library
  ``libcuda.so.1`` or an NVIDIA device node is present; nothing queries a GPU) or
  ``MOE_CUDA_ARCHS`` is set. A CPU machine that merely has the toolkit skips the CUDA kernels,
  which take most of a build's time.

The CUDA grouped GEMM includes CUTLASS from the ``nvidia-cutlass`` wheel (header-only use), a
build requirement only when the CUDA kernels build and ``MOE_CUTLASS`` is not off.
"""

from __future__ import annotations

import ctypes.util
import filecmp
import os
import shutil
from pathlib import Path

from setuptools import build_meta as _setuptools

# The other hooks (build_wheel, build_editable, ...) are setuptools' own, unchanged.
from setuptools.build_meta import *  # noqa: F403

CUTLASS_REQUIREMENT = "nvidia-cutlass>=4.2,<5"
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
# Where the driver library lives on common distributions and in containers (not the toolkit's
# stubs/libcuda.so, which every toolkit ships and which is no driver).
DRIVER_FILES = (
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    "/usr/lib64/libcuda.so.1",
    "/usr/lib/libcuda.so.1",
    "/usr/local/nvidia/lib64/libcuda.so.1",
    "/usr/lib/wsl/lib/libcuda.so.1",
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/proc/driver/nvidia/version",
)


def nvcc_found() -> bool:
    """nvcc where CMake would look: ``CUDACXX``, ``CUDA_HOME``/``CUDA_PATH``, ``PATH``,
    ``/usr/local/cuda``."""
    candidates = [os.environ.get("CUDACXX", "")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return any(c and Path(c).is_file() for c in candidates)


def cuda_driver_found() -> bool:
    """A CUDA driver is installed: its library is known to the loader or lies in a usual
    place, or an NVIDIA device node exists. Reads the file system only."""
    found = ctypes.util.find_library("cuda")
    if found and "stubs" not in found:
        return True
    return any(Path(p).exists() for p in DRIVER_FILES)


def cuda_build() -> tuple[bool, str]:
    """(whether the CUDA kernels build, why). Raises ValueError for an unknown
    ``MOE_KERNELS_CUDA`` value."""
    mode = os.environ.get("MOE_KERNELS_CUDA", "auto").strip().lower()
    if mode in _OFF:
        return False, "MOE_KERNELS_CUDA=0"
    if mode in _ON:
        return True, "MOE_KERNELS_CUDA=1"
    if mode != "auto":
        raise ValueError(f"MOE_KERNELS_CUDA: expected auto, 0 or 1, got {mode!r}")
    if not nvcc_found():
        return False, "auto: nvcc not found"
    if os.environ.get("MOE_CUDA_ARCHS"):
        return True, "auto: nvcc found and MOE_CUDA_ARCHS set"
    if cuda_driver_found():
        return True, "auto: nvcc and a CUDA driver found"
    return False, (
        "auto: nvcc found but no CUDA driver (set MOE_KERNELS_CUDA=1 or MOE_CUDA_ARCHS to "
        "compile the CUDA kernels anyway)"
    )


def cutlass_wanted() -> bool:
    return os.environ.get("MOE_CUTLASS", "auto").strip().lower() not in _OFF


def cuda_requirements() -> list[str]:
    if not (cuda_build()[0] and cutlass_wanted()):
        return []
    if os.environ.get("MOE_CUTLASS_DIR"):  # headers given explicitly
        return []
    return [CUTLASS_REQUIREMENT]


def sync_tree(src: Path, dst: Path) -> Path:
    """Make ``dst`` a copy of ``src``, rewriting only files whose bytes differ (unchanged files
    keep their times) and removing files ``src`` lacks. Returns ``dst``.

    Build dependencies of an isolated build live in a new temporary directory each time; CMake
    given their stable copies issues the same compile commands, so ninja reuses the objects of
    an earlier build of an unchanged tree.
    """
    src, dst = Path(src), Path(dst)
    wanted = set()
    for path in src.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(src)
        wanted.add(rel)
        out = dst / rel
        if out.is_file() and filecmp.cmp(path, out, shallow=False):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out)
    if dst.is_dir():
        for path in dst.rglob("*"):
            if path.is_file() and path.relative_to(dst) not in wanted:
                path.unlink()
    return dst


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + cuda_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + cuda_requirements()
