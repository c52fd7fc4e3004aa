// Ampere-class (sm_80 and later without a Hopper build) grouped GEMM: CUTLASS 2 grouped kernel
// (cp.async multistage mainloop, mma.sync tensor cores) with the device-only group schedule, so
// the problem sizes stay on device. One configuration per (dtype, operand layouts):
// 128 x 128 x 32 threadblock tiles, 64 x 64 warp tiles, 4 stages (64 KiB of shared memory, so it
// also fits the 99 KiB per-block limit of sm_86/sm_89), fp32 accumulation.
#pragma once
#include <cuda_runtime.h>

#include <atomic>

#include "cuda/gemm/grouped_mm.h"
#include "cuda/gemm/prepare.cuh"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/gemm/kernel/grouped_problem_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace moe::cuda::gemm::sm80 {

// LayoutA tags the M x K operand, LayoutB the K x N operand; C/D are row-major.
template <class T, class LayoutA, class LayoutB>
struct Config {
  using Element = T;
  static constexpr int kAlignment = 16 / sizeof(T);  // 16-byte cp.async and stores
  // D = accumulator converted to T: no alpha, no beta, C never read.
  using Output = cutlass::epilogue::thread::LinearCombination<
      T, kAlignment, float, float, cutlass::epilogue::thread::ScaleType::Nothing>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      T, LayoutA, cutlass::ComplexTransform::kNone, kAlignment,  //
      T, LayoutB, cutlass::ComplexTransform::kNone, kAlignment,  //
      T, cutlass::layout::RowMajor, float,                       //
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,       //
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Output,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

// The per-group arrays the kernel reads, carved out of the workspace; also the prepare Writer.
// C and D share the pointer and leading-dimension arrays (C is never read).
template <class T>
struct Arrays {
  cutlass::gemm::GemmCoord* shapes;
  T** a;
  T** b;
  T** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;

  static Arrays carve(Carver& c, int64_t E) {
    Arrays r;
    r.shapes = c.take<cutlass::gemm::GemmCoord>(E);
    r.a = c.take<T*>(E);
    r.b = c.take<T*>(E);
    r.d = c.take<T*>(E);
    r.lda = c.take<int64_t>(E);
    r.ldb = c.take<int64_t>(E);
    r.ldd = c.take<int64_t>(E);
    return r;
  }

  // Same problems as the Hopper path (see sm90_grouped.cuh); leading dimensions per layout:
  // A row-major x rows (ld D) or column-major x^T (ld D), B as given, D row-major (ld F).
  __device__ void operator()(const Problem& p, int64_t e, int64_t lo, int64_t hi) const {
    T* x = const_cast<T*>(static_cast<const T*>(p.x));
    T* bp = const_cast<T*>(static_cast<const T*>(p.b));
    T* out = static_cast<T*>(p.out);
    const int m = static_cast<int>(hi - lo);
    a[e] = x + lo * p.D;
    lda[e] = p.D;
    ldd[e] = p.F;
    if (p.kind == kWeightGrad) {
      shapes[e] = cutlass::gemm::GemmCoord(m > 0 ? static_cast<int>(p.D) : 0,
                                           static_cast<int>(p.F), m);
      b[e] = bp + lo * p.F;
      ldb[e] = p.F;
      d[e] = out + e * p.D * p.F;
    } else {
      shapes[e] = cutlass::gemm::GemmCoord(m, static_cast<int>(p.F), static_cast<int>(p.D));
      b[e] = bp + e * p.b_group_stride;
      ldb[e] = p.ldb;
      d[e] = out + lo * p.F;
    }
  }
};

// Resident CTAs per SM for the kernel on the current device (an occupancy query, no device
// work), remembered per device.
template <class Gemm>
int blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  if (device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int blocks = Gemm::maximum_active_blocks();
  if (blocks > 0 && device < kMaxDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <class Cfg>
size_t workspace_bytes(const Problem& p) {
  Carver c(nullptr);
  Arrays<typename Cfg::Element>::carve(c, p.E);
  return c.bytes();  // the device-only schedule needs no CUTLASS workspace
}

template <class Cfg>
Error run(const Problem& p, void* workspace, size_t workspace_bytes_given, cudaStream_t stream) {
  using T = typename Cfg::Element;
  if (workspace_bytes<Cfg>(p) > workspace_bytes_given) return "workspace smaller than required";
  Carver c(workspace);
  const Arrays<T> arr = Arrays<T>::carve(c, p.E);
  const cudaError_t prepared = launch_prepare<T>(p, arr, stream);
  if (prepared != cudaSuccess) return cudaGetErrorString(prepared);
  const int per_sm = blocks_per_sm<typename Cfg::Gemm>();
  if (per_sm <= 0) return "CUTLASS sm80 grouped GEMM does not fit on this device";
  typename Cfg::Gemm::Arguments args(arr.shapes, static_cast<int>(p.E), p.sm_count * per_sm,
                                     typename Cfg::Output::Params(), arr.a, arr.b, arr.d, arr.d,
                                     arr.lda, arr.ldb, arr.ldd, arr.ldd);
  typename Cfg::Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess)
    return "CUTLASS sm80 grouped GEMM initialization failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? cudaGetErrorString(err) : "CUTLASS sm80 grouped GEMM launch failed";
  }
  return nullptr;
}

template <class T>
size_t workspace_bytes_for(const Problem& p) {
  return workspace_bytes<Config<T, cutlass::layout::RowMajor, cutlass::layout::RowMajor>>(p);
}

template <class T>
Error run_for(const Problem& p, void* workspace, size_t workspace_bytes_given, intptr_t stream) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.kind) {
    case kForwardBRow: return run<Config<T, Row, Row>>(p, workspace, workspace_bytes_given, s);
    case kForwardBCol: return run<Config<T, Row, Col>>(p, workspace, workspace_bytes_given, s);
    case kWeightGrad: return run<Config<T, Col, Row>>(p, workspace, workspace_bytes_given, s);
    default: return "unknown grouped GEMM kind";
  }
}

}  // namespace moe::cuda::gemm::sm80
