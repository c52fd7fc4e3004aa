"""PEP 517 build backend: setuptools' own, plus the CUTLASS headers when CUDA kernels will build.

The CUDA grouped GEMM includes CUTLASS from the ``nvidia-cutlass`` wheel (header-only use). A
CPU-only build must not need it, so it is a build requirement only when ``MOE_KERNELS_CUDA`` is
not ``0`` and nvcc is there (the same nvcc CMake would find: ``CUDACXX``, ``CUDA_HOME`` or
``CUDA_PATH``, ``PATH``, ``/usr/local/cuda``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import build_meta as _setuptools

# The other hooks (build_wheel, build_editable, ...) are setuptools' own, unchanged.
from setuptools.build_meta import *  # noqa: F403

CUTLASS_REQUIREMENT = "nvidia-cutlass>=4.2,<5"


def nvcc_found() -> bool:
    candidates = [os.environ.get("CUDACXX", "")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return any(c and Path(c).is_file() for c in candidates)


def cuda_requirements() -> list[str]:
    if os.environ.get("MOE_KERNELS_CUDA", "auto") == "0" or os.environ.get("MOE_CUTLASS") in (
        "OFF",
        "0",
    ):
        return []
    if os.environ.get("MOE_CUTLASS_DIR"):  # headers given explicitly
        return []
    return [CUTLASS_REQUIREMENT] if nvcc_found() else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + cuda_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + cuda_requirements()
