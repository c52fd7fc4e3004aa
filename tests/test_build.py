import importlib.util
import os
import types
from pathlib import Path

import pytest

import moe_kernels


def test_build_info_reports_compiled_parts():
    info = moe_kernels.build_info()
    assert info["cpu"] is True, info
    assert isinstance(info["cuda"], bool)
    assert "cxx_compiler" in info and info["openmp"]
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_compiler"].startswith("nvcc")


def test_import_without_gpu_even_with_cuda_built():
    # Importing the module (and its CUDA part, if built) must not touch a GPU.
    from moe_kernels import _C

    assert hasattr(_C, "topk_gating_cpu")


ROOT = Path(__file__).resolve().parents[1]


def load_build_backend():
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("moe_build", ROOT / "build_backend/moe_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cutlass_grouped_gemm_built_when_nvcc_and_headers_are_there():
    info = moe_kernels.build_info()
    if os.environ.get("MOE_CUTLASS") in ("OFF", "0"):
        pytest.skip("MOE_CUTLASS is off in this environment")
    headers = os.environ.get("MOE_CUTLASS_DIR") or importlib.util.find_spec("cutlass_library")
    # CI builds with build isolation: the headers lived in the build environment only, and a
    # CUDA build there must have compiled the grouped GEMM.
    in_ci = os.environ.get("CI", "").lower() in ("1", "true")
    if not (info["cuda"] and (headers or in_ci)):
        pytest.skip("needs a CUDA build and the CUTLASS headers (nvidia-cutlass) installed here")
    assert info["cutlass"] is True, (
        "built with nvcc and the CUTLASS headers are installed, but the grouped GEMM was not "
        "compiled (set MOE_CUTLASS=OFF if that was deliberate)"
    )
    from moe_kernels import _C

    cuda_archs = info["cuda_archs"].split(",")
    archs = _C.grouped_mm_cuda_archs()
    assert (90 in archs) == ("90a" in cuda_archs), (archs, cuda_archs)
    assert (80 in archs) == any(a.startswith("8") for a in cuda_archs), (archs, cuda_archs)


def test_build_backend_requires_cutlass_only_when_cuda_builds(monkeypatch):
    backend = load_build_backend()
    for var in ("MOE_KERNELS_CUDA", "MOE_CUTLASS", "MOE_CUTLASS_DIR", "MOE_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backend, "nvcc_found", lambda: True)
    monkeypatch.setattr(backend, "cuda_driver_found", lambda: True)
    # setuptools' own hooks would run setup.py egg_info here; stand in for them.
    setuptools_hooks = types.SimpleNamespace(
        get_requires_for_build_wheel=lambda config_settings=None: ["wheel"],
        get_requires_for_build_editable=lambda config_settings=None: ["wheel"],
    )
    monkeypatch.setattr(backend, "_setuptools", setuptools_hooks)
    assert backend.CUTLASS_REQUIREMENT.startswith("nvidia-cutlass")
    assert backend.cuda_requirements() == [backend.CUTLASS_REQUIREMENT]
    assert backend.get_requires_for_build_wheel() == ["wheel", backend.CUTLASS_REQUIREMENT]
    assert backend.get_requires_for_build_editable() == ["wheel", backend.CUTLASS_REQUIREMENT]
    monkeypatch.setenv("MOE_KERNELS_CUDA", "0")  # CPU-only build
    assert backend.cuda_requirements() == []
    monkeypatch.setenv("MOE_KERNELS_CUDA", "auto")
    monkeypatch.setenv("MOE_CUTLASS", "OFF")  # CUDA kernels without the grouped GEMM
    assert backend.cuda_requirements() == []
    monkeypatch.delenv("MOE_CUTLASS")
    monkeypatch.setattr(backend, "cuda_driver_found", lambda: False)  # toolkit, no driver
    assert backend.cuda_requirements() == []
    monkeypatch.setenv("MOE_KERNELS_CUDA", "1")  # forced, as in CI
    assert backend.cuda_requirements() == [backend.CUTLASS_REQUIREMENT]
    monkeypatch.setenv("MOE_KERNELS_CUDA", "auto")
    monkeypatch.setattr(backend, "nvcc_found", lambda: False)  # no nvcc: nothing CUDA builds
    assert backend.cuda_requirements() == []
    assert backend.get_requires_for_build_wheel() == ["wheel"]


@pytest.mark.parametrize(
    "mode, nvcc, driver, archs, expected",
    [
        ("0", True, True, "90a", False),  # forced off wins over everything
        ("1", False, False, None, True),  # forced on (CMake then fails loudly without nvcc)
        ("auto", False, True, "90a", False),  # no compiler, nothing to build with
        ("auto", True, False, None, False),  # toolkit only (this CPU machine): CPU build
        ("auto", True, True, None, True),  # a GPU machine
        ("auto", True, False, "80", True),  # cross-compiling for a named GPU
        ("AUTO", True, True, None, True),  # case-insensitive
    ],
)
def test_cuda_build_rule(monkeypatch, mode, nvcc, driver, archs, expected):
    backend = load_build_backend()
    monkeypatch.setenv("MOE_KERNELS_CUDA", mode)
    if archs is None:
        monkeypatch.delenv("MOE_CUDA_ARCHS", raising=False)
    else:
        monkeypatch.setenv("MOE_CUDA_ARCHS", archs)
    monkeypatch.setattr(backend, "nvcc_found", lambda: nvcc)
    monkeypatch.setattr(backend, "cuda_driver_found", lambda: driver)
    built, why = backend.cuda_build()
    assert built is expected, why
    assert why  # the build log says why


def test_cuda_build_rejects_unknown_mode(monkeypatch):
    backend = load_build_backend()
    monkeypatch.setenv("MOE_KERNELS_CUDA", "maybe")
    with pytest.raises(ValueError, match="MOE_KERNELS_CUDA: expected auto, 0 or 1, got 'maybe'"):
        backend.cuda_build()


def test_cuda_driver_detection_ignores_toolkit_stubs(monkeypatch, tmp_path):
    backend = load_build_backend()
    stub = "/usr/local/cuda/lib64/stubs/libcuda.so"
    monkeypatch.setattr(backend.ctypes.util, "find_library", lambda name: stub)
    monkeypatch.setattr(backend, "DRIVER_FILES", (str(tmp_path / "absent"),))
    assert backend.cuda_driver_found() is False
    node = tmp_path / "nvidiactl"
    node.write_text("")
    monkeypatch.setattr(backend, "DRIVER_FILES", (str(node),))
    assert backend.cuda_driver_found() is True
    monkeypatch.setattr(backend, "DRIVER_FILES", ())
    monkeypatch.setattr(backend.ctypes.util, "find_library", lambda name: "libcuda.so.1")
    assert backend.cuda_driver_found() is True


def test_sync_tree_rewrites_only_what_changed(tmp_path):
    backend = load_build_backend()
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "inc").mkdir(parents=True)
    (src / "inc" / "a.h").write_text("a")
    (src / "b.h").write_text("b")
    backend.sync_tree(src, dst)
    assert (dst / "inc" / "a.h").read_text() == "a" and (dst / "b.h").read_text() == "b"
    os.utime(dst / "inc" / "a.h", (1_000_000, 1_000_000))  # an old, recognisable time
    (src / "b.h").write_text("b2")
    (dst / "stale.h").write_text("gone")
    backend.sync_tree(src, dst)
    assert (dst / "inc" / "a.h").stat().st_mtime == 1_000_000  # unchanged: not rewritten
    assert (dst / "b.h").read_text() == "b2"
    assert not (dst / "stale.h").exists()


def test_ci_build_compiled_the_cuda_kernels():
    # CI forces MOE_KERNELS_CUDA=1 so every CUDA source compiles on every run, GPU or not.
    in_ci = os.environ.get("CI", "").lower() in ("1", "true")
    if not in_ci or os.environ.get("MOE_KERNELS_CUDA") != "1":
        pytest.skip("only under CI, which builds with MOE_KERNELS_CUDA=1")
    assert moe_kernels.build_info()["cuda"] is True


def test_build_backend_finds_nvcc_like_cmake(monkeypatch, tmp_path):
    backend = load_build_backend()
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on PATH
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    found_by_default_path = Path("/usr/local/cuda/bin/nvcc").is_file()
    assert backend.nvcc_found() == found_by_default_path
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert backend.nvcc_found()
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDACXX", str(fake))
    assert backend.nvcc_found()
