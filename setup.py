"""Build driver: setuptools packages + CMake for the compiled core ``moe_kernels._C``.

Environment: ``MOE_KERNELS_CUDA=auto|0|1`` (build the CUDA kernels; auto = when nvcc is found),
``MOE_CUDA_ARCHS`` (default ``80;90a``), ``MOE_BUILD_JOBS`` (parallel compile jobs),
``MOE_CUTLASS=auto|ON|OFF`` (the CUTLASS grouped GEMM) and ``MOE_CUTLASS_DIR`` (CUTLASS source
tree; default: the ``nvidia-cutlass`` wheel, a build requirement when CUDA is on).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def cutlass_dir() -> str:
    """CUTLASS source tree (include/cutlass/...): $MOE_CUTLASS_DIR, else nvidia-cutlass's."""
    if os.environ.get("MOE_CUTLASS_DIR"):
        return os.environ["MOE_CUTLASS_DIR"]
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).parent / "source")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMOE_KERNELS_CUDA={os.environ.get('MOE_KERNELS_CUDA', 'auto')}",
        ]
        if os.environ.get("MOE_KERNELS_CUDA", "auto") != "0":
            args.append(f"-DMOE_CUTLASS_DIR={cutlass_dir()}")
            args.append(f"-DMOE_CUTLASS={os.environ.get('MOE_CUTLASS', 'auto')}")
        if os.environ.get("MOE_CUDA_ARCHS"):
            args.append(f"-DMOE_CUDA_ARCHS={os.environ['MOE_CUDA_ARCHS']}")
        try:
            import ninja

            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
        except ImportError:
            pass
        jobs = os.environ.get("MOE_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


testbed_packages = find_packages("python", include=["moe_testbed", "moe_testbed.*"])
setup(
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]) + testbed_packages,
    package_dir={"moe_testbed": "python/moe_testbed"},
    package_data={"moe_testbed": ["data/sample/*", "configs/*"]},
    ext_modules=[CMakeExtension("moe_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
