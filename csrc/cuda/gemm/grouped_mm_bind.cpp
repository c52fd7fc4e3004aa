// Python bindings of the CUDA grouped GEMM (compiled when the CUTLASS kernels are built).
// Python checks dtypes, shapes, devices and alignment; these bindings check the few things whose
// violation would make a kernel read or write out of bounds, and name the argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/gemm/grouped_mm.h"
#include "registry.h"

namespace py = pybind11;
using ptr = std::uintptr_t;
using moe::cuda::gemm::Problem;

namespace {

// Kernel families compiled into this build (MOE_GEMM_SM90 / MOE_GEMM_SM80 come from CMake).
std::vector<int> compiled_archs() {
  std::vector<int> archs;
#ifdef MOE_GEMM_SM80
  archs.push_back(80);
#endif
#ifdef MOE_GEMM_SM90
  archs.push_back(90);
#endif
  return archs;
}

void check_arch(int arch) {
  for (int a : compiled_archs())
    if (a == arch) return;
  throw std::invalid_argument("arch: grouped_mm kernels for sm" + std::to_string(arch) +
                              " were not compiled in this build");
}

Problem make_problem(int kind, int dtype, int64_t E, int64_t N, int64_t D, int64_t F,
                     int sm_count) {
  if (kind < moe::cuda::gemm::kForwardBRow || kind > moe::cuda::gemm::kWeightGrad)
    throw std::invalid_argument("kind: expected 0 (forward, B row-major), 1 (forward, B "
                                "column-major) or 2 (weight grad), got " +
                                std::to_string(kind));
  if (dtype != moe::kBFloat16 && dtype != moe::kFloat16)
    throw std::invalid_argument("dtype: grouped_mm CUDA kernels take bf16 (1) or fp16 (3), got " +
                                std::to_string(dtype));
  if (E < 1 || E > 65535) throw std::invalid_argument("E: expected 1..65535 groups, got " +
                                                      std::to_string(E));
  if (N < 0 || N > INT32_MAX) throw std::invalid_argument("N: expected 0..2^31-1 rows, got " +
                                                          std::to_string(N));
  // 16-byte aligned rows of 2-byte elements, and sizes that fit CUTLASS's int problem shapes.
  if (D < 8 || D % 8 || D > INT32_MAX)
    throw std::invalid_argument("D: expected a positive multiple of 8, got " + std::to_string(D));
  if (F < 8 || F % 8 || F > INT32_MAX)
    throw std::invalid_argument("F: expected a positive multiple of 8, got " + std::to_string(F));
  if (sm_count < 1)
    throw std::invalid_argument("sm_count: expected >= 1, got " + std::to_string(sm_count));
  Problem p;
  p.kind = kind;
  p.E = E;
  p.N = N;
  p.D = D;
  p.F = F;
  p.sm_count = sm_count;
  return p;
}

size_t workspace_bytes(int arch, const Problem& p, int dtype) {
  check_arch(arch);
#ifdef MOE_GEMM_SM90
  if (arch == 90)
    return dtype == moe::kBFloat16 ? moe::cuda::gemm::sm90_workspace_bytes_bf16(p)
                                   : moe::cuda::gemm::sm90_workspace_bytes_f16(p);
#endif
#ifdef MOE_GEMM_SM80
  if (arch == 80)
    return dtype == moe::kBFloat16 ? moe::cuda::gemm::sm80_workspace_bytes_bf16(p)
                                   : moe::cuda::gemm::sm80_workspace_bytes_f16(p);
#endif
  return 0;
}

moe::cuda::gemm::Error run(int arch, const Problem& p, int dtype, void* ws, size_t ws_bytes,
                           intptr_t stream) {
#ifdef MOE_GEMM_SM90
  if (arch == 90)
    return dtype == moe::kBFloat16 ? moe::cuda::gemm::sm90_run_bf16(p, ws, ws_bytes, stream)
                                   : moe::cuda::gemm::sm90_run_f16(p, ws, ws_bytes, stream);
#endif
#ifdef MOE_GEMM_SM80
  if (arch == 80)
    return dtype == moe::kBFloat16 ? moe::cuda::gemm::sm80_run_bf16(p, ws, ws_bytes, stream)
                                   : moe::cuda::gemm::sm80_run_f16(p, ws, ws_bytes, stream);
#endif
  return "no kernels for this arch";
}

void check_aligned(const char* name, ptr p) {
  if (p == 0 || p % 16)
    throw std::invalid_argument(std::string(name) + ": expected a 16-byte aligned device pointer");
}

}  // namespace

MOE_BINDINGS(cuda_grouped_mm) {
  m.def("grouped_mm_cuda_archs", &compiled_archs,
        "Kernel families of the CUDA grouped GEMM in this build (80: CUTLASS 2 for sm_80 and "
        "later, 90: CUTLASS 3 for sm_90a).");
  m.def(
      "grouped_mm_workspace_bytes",
      [](int arch, int kind, int dtype, int64_t E, int64_t D, int64_t F, int sm_count) {
        // Depends on the group count and the SM count only (N = 0 stands in for any N).
        return workspace_bytes(arch, make_problem(kind, dtype, E, 0, D, F, sm_count), dtype);
      },
      "Bytes of device workspace grouped_mm_cuda needs for these sizes.");
  m.def(
      "grouped_mm_cuda",
      [](int arch, int kind, int dtype, ptr x, ptr b, ptr out, ptr offsets, bool offsets_int64,
         int64_t E, int64_t N, int64_t D, int64_t F, int64_t ldb, int64_t b_group_stride,
         int sm_count, ptr workspace, size_t workspace_bytes_given, intptr_t stream) {
        check_arch(arch);
        Problem p = make_problem(kind, dtype, E, N, D, F, sm_count);
        check_aligned("x", x);
        check_aligned("b", b);
        check_aligned("out", out);
        check_aligned("workspace", workspace);
        if (offsets == 0) throw std::invalid_argument("offsets: expected a device pointer");
        if (kind != moe::cuda::gemm::kWeightGrad && (ldb < 8 || ldb % 8 || b_group_stride % 8))
          throw std::invalid_argument(
              "ldb, b_group_stride: expected multiples of 8 elements (16-byte aligned), got " +
              std::to_string(ldb) + ", " + std::to_string(b_group_stride));
        p.x = reinterpret_cast<const void*>(x);
        p.b = reinterpret_cast<const void*>(b);
        p.out = reinterpret_cast<void*>(out);
        p.offsets = reinterpret_cast<const void*>(offsets);
        p.offsets_int64 = offsets_int64;
        p.ldb = ldb;
        p.b_group_stride = b_group_stride;
        moe::cuda::gemm::Error err;
        {
          py::gil_scoped_release nogil;
          err = run(arch, p, dtype, reinterpret_cast<void*>(workspace), workspace_bytes_given,
                    stream);
        }
        if (err) throw std::runtime_error(std::string("grouped_mm_cuda: ") + err);
      },
      "Grouped GEMM on `stream` (see csrc/cuda/gemm/grouped_mm.h); raises on launch errors.");
}
