"""Build driver: setuptools packages + CMake for the compiled core ``moe_kernels._C``.

Environment: ``MOE_KERNELS_CUDA=auto|0|1`` (build the CUDA kernels; the rule is
``build_backend/moe_build.cuda_build``: auto = nvcc and a CUDA driver, or ``MOE_CUDA_ARCHS``),
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
sys.path.insert(0, str(ROOT / "build_backend"))
from moe_build import cuda_build, sync_tree  # noqa: E402


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def cutlass_dir(deps: Path) -> str:
    """CUTLASS source tree (include/cutlass/...): $MOE_CUTLASS_DIR, else a stable copy of the
    nvidia-cutlass wheel's headers under the build directory (see moe_build.sync_tree)."""
    if os.environ.get("MOE_CUTLASS_DIR"):
        return os.environ["MOE_CUTLASS_DIR"]
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is None or spec.origin is None:
        return ""
    sync_tree(Path(spec.origin).parent / "source" / "include", deps / "cutlass" / "include")
    return str(deps / "cutlass")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        deps = Path(self.build_temp).resolve() / "deps"
        pybind11_dir = sync_tree(Path(pybind11.__file__).parent, deps / "pybind11")
        with_cuda, why = cuda_build()
        print(f"moe_kernels: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})", flush=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir / 'share' / 'cmake' / 'pybind11'}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMOE_KERNELS_CUDA={int(with_cuda)}",
        ]
        if with_cuda:
            args.append(f"-DMOE_CUTLASS_DIR={cutlass_dir(deps)}")
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
    package_data={"moe_testbed": ["data/sample/*", "grids/*.yaml"]},
    ext_modules=[CMakeExtension("moe_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
