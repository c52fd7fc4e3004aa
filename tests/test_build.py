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
