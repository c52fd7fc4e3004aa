// Hopper (sm_90a) grouped GEMM: CUTLASS 3 pointer-array kernel with a grouped problem shape
// (TMA loads and stores, WGMMA, warp-specialized cooperative schedule, persistent CTAs walking the
// groups' tiles). Problem shapes, pointers and strides live only on device (host problem shapes
// are null); the kernel rewrites its TMA descriptors per group. One configuration per
// (dtype, operand layouts): 128 x 128 x 64 tiles, 1 x 1 x 1 clusters, fp32 accumulation, no C.
#pragma once
#include <cuda_runtime.h>

#include "cuda/gemm/grouped_mm.h"
#include "cuda/gemm/prepare.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace moe::cuda::gemm::sm90 {

// LayoutA tags the M x K operand, LayoutB the K x N operand (CUTLASS convention); D is row-major.
template <class T, class LayoutA, class LayoutB>
struct Config {
  using Element = T;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 16 / sizeof(T);  // TMA: 16-byte aligned rows

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,  //
      void, LayoutD*, kAlignment,                                     // no C operand
      T, LayoutD*, kAlignment,                                        //
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,  //
      T, LayoutA*, kAlignment, T, LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// A grouped operand stride has one run-time leading dimension; the other modes are _1 and _0.
template <class Stride>
CUTE_HOST_DEVICE Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>>) {
    static_assert(!cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(s))>>);
    cute::get<1>(s) = ld;
  } else {
    static_assert(cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(s))>>);
    cute::get<0>(s) = ld;
  }
  return s;
}

// The per-group arrays the kernel reads, carved out of the workspace; also the prepare Writer.
template <class Cfg>
struct Arrays {
  using T = typename Cfg::Element;
  typename Cfg::Shape3* shapes;
  const T** a;
  const T** b;
  T** d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;

  static Arrays carve(Carver& c, int64_t E) {
    Arrays r;
    r.shapes = c.take<typename Cfg::Shape3>(E);
    r.a = c.take<const T*>(E);
    r.b = c.take<const T*>(E);
    r.d = c.take<T*>(E);
    r.stride_a = c.take<typename Cfg::StrideA>(E);
    r.stride_b = c.take<typename Cfg::StrideB>(E);
    r.stride_d = c.take<typename Cfg::StrideD>(E);
    return r;
  }

  // Group e = rows [lo, hi) of x. Forward: (hi - lo) x F x D against the e-th weight matrix.
  // Weight grad: D x F x (hi - lo), A = x^T (column-major view of x's rows), B = dy's rows; an
  // empty group gets M = 0 (no tiles) and the prepare kernel zeroes its output instead.
  __device__ void operator()(const Problem& p, int64_t e, int64_t lo, int64_t hi) const {
    const T* x = static_cast<const T*>(p.x);
    const T* bp = static_cast<const T*>(p.b);
    T* out = static_cast<T*>(p.out);
    const int m = static_cast<int>(hi - lo);
    a[e] = x + lo * p.D;
    stride_a[e] = leading_stride<typename Cfg::StrideA>(p.D);
    stride_d[e] = leading_stride<typename Cfg::StrideD>(p.F);
    if (p.kind == kWeightGrad) {
      shapes[e] = cute::make_shape(m > 0 ? static_cast<int>(p.D) : 0, static_cast<int>(p.F), m);
      b[e] = bp + lo * p.F;
      stride_b[e] = leading_stride<typename Cfg::StrideB>(p.F);
      d[e] = out + e * p.D * p.F;
    } else {
      shapes[e] = cute::make_shape(m, static_cast<int>(p.F), static_cast<int>(p.D));
      b[e] = bp + e * p.b_group_stride;
      stride_b[e] = leading_stride<typename Cfg::StrideB>(p.ldb);
      d[e] = out + lo * p.F;
    }
  }
};

template <class Cfg>
typename Cfg::Gemm::Arguments make_arguments(const Problem& p, const Arrays<Cfg>& arr) {
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = p.sm_count;  // persistent grid: one CTA per SM
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {static_cast<int>(p.E), arr.shapes, nullptr},  // problem shapes on device only
      {arr.a, arr.stride_a, arr.b, arr.stride_b},
      {{}, nullptr, nullptr, arr.d, arr.stride_d},  // no C: D = 1 * accumulator
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

template <class Cfg>
size_t workspace_bytes(const Problem& p) {
  Carver c(nullptr);
  const Arrays<Cfg> arr = Arrays<Cfg>::carve(c, p.E);
  return c.bytes() + Cfg::Gemm::get_workspace_size(make_arguments<Cfg>(p, arr));
}

template <class Cfg>
Error run(const Problem& p, void* workspace, size_t workspace_bytes_given, cudaStream_t stream) {
  if (workspace_bytes<Cfg>(p) > workspace_bytes_given) return "workspace smaller than required";
  Carver c(workspace);
  const Arrays<Cfg> arr = Arrays<Cfg>::carve(c, p.E);
  const cudaError_t prepared = launch_prepare<typename Cfg::Element>(p, arr, stream);
  if (prepared != cudaSuccess) return cudaGetErrorString(prepared);
  typename Cfg::Gemm gemm;
  const auto args = make_arguments<Cfg>(p, arr);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return "CUTLASS sm90 grouped GEMM cannot implement these arguments";
  if (gemm.initialize(args, c.rest(), stream) != cutlass::Status::kSuccess)
    return "CUTLASS sm90 grouped GEMM initialization failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? cudaGetErrorString(err) : "CUTLASS sm90 grouped GEMM launch failed";
  }
  return nullptr;
}

// Entry points of one dtype: dispatch on the operand layouts.
template <class T>
size_t workspace_bytes_for(const Problem& p) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  switch (p.kind) {
    case kForwardBRow: return workspace_bytes<Config<T, Row, Row>>(p);
    case kForwardBCol: return workspace_bytes<Config<T, Row, Col>>(p);
    default: return workspace_bytes<Config<T, Col, Row>>(p);
  }
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

}  // namespace moe::cuda::gemm::sm90
