// Dispatch, combine and the gate-weight gradient on CUDA (see cuda/dispatch_combine.h).
//
// Dispatch and combine map a 2-D thread block onto rows: threadIdx.x walks the row's elements in
// packs, threadIdx.y picks the row, and blocks stride over rows (grid-stride), so any number of
// rows works with a capped grid. A pack is 16 bytes (4 fp32, 8 bf16/fp16, 2 fp64) when the row
// length in bytes is a multiple of 16 and the pointers are 16-byte aligned, one element
// otherwise. Every output element is written by exactly one thread: no atomics, deterministic.
//
// Rounding: the fp32 products and sums use __fmul_rn / __fadd_rn (fp64: __dmul_rn / __dadd_rn)
// so the compiler cannot contract them into FMAs; combine then performs exactly the operations
// of the plain-torch reference (acc = 0; acc = acc + w_k * y_k for k = 0..K-1; round once), and
// its results agree with the reference bit for bit in every dtype.
//
// weight_grad gives one warp to each (token, slot) pair: the lanes stride over the row in packs,
// each accumulating its own partial dot product, then a fixed xor-shuffle tree sums the lanes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "common.h"
#include "cuda/dispatch_combine.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// Storage type -> accumulation type and conversions (round to nearest even on the way back).
template <typename S> struct Num;
template <> struct Num<float> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <> struct Num<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <> struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};
template <> struct Num<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

// Uncontracted multiply and add (no FMA), so results match torch's separate elementwise ops.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }

// kW consecutive elements moved as one memory access of kW * sizeof(S) bytes.
template <typename S, int kW> struct alignas(sizeof(S) * kW) Pack {
  S v[kW];
};

template <typename S, typename W, int kW, bool kWeighted>
__global__ void dispatch_kernel(const S* __restrict__ x, int64_t V, int64_t K,
                                const int32_t* __restrict__ row_slot, int64_t N,
                                const W* __restrict__ weights, S* __restrict__ out) {
  using A = typename Num<S>::Acc;
  using P = Pack<S, kW>;
  const P* xp = reinterpret_cast<const P*>(x);
  P* op = reinterpret_cast<P*>(out);
  const int64_t row_stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; n < N; n += row_stride) {
    const int32_t slot = row_slot[n];
    P* dst = op + n * V;
    if (slot < 0) {  // padding row
      P zero;
#pragma unroll
      for (int i = 0; i < kW; ++i) zero.v[i] = Num<S>::from_acc(A(0));
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dst[v] = zero;
      continue;
    }
    const P* src = xp + (int64_t(slot) / K) * V;
    if constexpr (kWeighted) {
      const A w = static_cast<A>(weights[slot]);
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        P p = src[v];
#pragma unroll
        for (int i = 0; i < kW; ++i) p.v[i] = Num<S>::from_acc(mul(Num<S>::to_acc(p.v[i]), w));
        dst[v] = p;
      }
    } else {
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dst[v] = src[v];
    }
  }
}

template <typename S, typename W, int kW, bool kWeighted>
__global__ void combine_kernel(const S* __restrict__ y, int64_t V,
                               const int32_t* __restrict__ slot_row, int64_t T, int64_t K,
                               const W* __restrict__ weights, S* __restrict__ out) {
  using A = typename Num<S>::Acc;
  using P = Pack<S, kW>;
  const P* yp = reinterpret_cast<const P*>(y);
  P* op = reinterpret_cast<P*>(out);
  const int64_t row_stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < T; t += row_stride) {
    const int32_t* rows = slot_row + t * K;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      A acc[kW];
#pragma unroll
      for (int i = 0; i < kW; ++i) acc[i] = A(0);
      for (int64_t k = 0; k < K; ++k) {  // slot order: the reference's summation order
        const int32_t r = rows[k];
        if (r < 0) continue;  // dropped slot adds 0
        const P p = yp[int64_t(r) * V + v];
        if constexpr (kWeighted) {
          const A w = static_cast<A>(weights[t * K + k]);
#pragma unroll
          for (int i = 0; i < kW; ++i) acc[i] = add(acc[i], mul(Num<S>::to_acc(p.v[i]), w));
        } else {
#pragma unroll
          for (int i = 0; i < kW; ++i) acc[i] = add(acc[i], Num<S>::to_acc(p.v[i]));
        }
      }
      P o;
#pragma unroll
      for (int i = 0; i < kW; ++i) o.v[i] = Num<S>::from_acc(acc[i]);
      op[t * V + v] = o;
    }
  }
}

template <typename S, typename W, int kW>
__global__ void weight_grad_kernel(const S* __restrict__ a, const S* __restrict__ b, int64_t V,
                                   int64_t K, const int32_t* __restrict__ slot_row, int64_t TK,
                                   W* __restrict__ grad_w) {
  using A = typename Num<S>::Acc;
  using P = Pack<S, kW>;
  const P* ap = reinterpret_cast<const P*>(a);
  const P* bp = reinterpret_cast<const P*>(b);
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t warp_stride = int64_t(gridDim.x) * warps_per_block;
  // i is the same for every lane of a warp, so the branch below and the shuffles are uniform.
  for (int64_t i = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; i < TK;
       i += warp_stride) {
    const int32_t r = slot_row[i];
    A dot = A(0);
    if (r >= 0) {
      const P* pa = ap + (i / K) * V;
      const P* pb = bp + int64_t(r) * V;
      for (int64_t v = lane; v < V; v += 32) {
        const P x = pa[v];
        const P z = pb[v];
#pragma unroll
        for (int j = 0; j < kW; ++j) dot += Num<S>::to_acc(x.v[j]) * Num<S>::to_acc(z.v[j]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) grad_w[i] = static_cast<W>(dot);
  }
}

// ---- host side ------------------------------------------------------------------------------

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Elements per pack: 16 bytes when every pointer is 16-byte aligned and rows are whole packs.
template <typename S> int pack_width(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(S);
  if ((D * int64_t(sizeof(S))) % 16 != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return kVec;
}

// Block shape for row kernels: x = threads per row (a power of two up to kThreads, at least the
// number of packs when that fits), y = rows per block; grid capped, kernels stride over rows.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t rows, int64_t V) {
  int tx = 1;
  while (tx < V && tx < kThreads) tx <<= 1;
  const int ty = kThreads / tx;
  const int64_t want = (rows + ty - 1) / ty;
  return {dim3(tx, ty), static_cast<unsigned>(want < kMaxBlocks ? want : kMaxBlocks)};
}

template <typename S, typename W, int kW>
void launch_dispatch(const S* x, int64_t D, int64_t K, const int32_t* row_slot, int64_t N,
                     const W* weights, S* out, cudaStream_t s) {
  const int64_t V = D / kW;
  const RowLaunch l = row_launch(N, V);
  if (weights)
    dispatch_kernel<S, W, kW, true><<<l.grid, l.block, 0, s>>>(x, V, K, row_slot, N, weights, out);
  else
    dispatch_kernel<S, W, kW, false><<<l.grid, l.block, 0, s>>>(x, V, K, row_slot, N, weights,
                                                                out);
}

template <typename S, typename W, int kW>
void launch_combine(const S* y, int64_t D, const int32_t* slot_row, int64_t T, int64_t K,
                    const W* weights, S* out, cudaStream_t s) {
  const int64_t V = D / kW;
  const RowLaunch l = row_launch(T, V);
  if (weights)
    combine_kernel<S, W, kW, true><<<l.grid, l.block, 0, s>>>(y, V, slot_row, T, K, weights, out);
  else
    combine_kernel<S, W, kW, false><<<l.grid, l.block, 0, s>>>(y, V, slot_row, T, K, weights,
                                                               out);
}

template <typename S, typename W, int kW>
void launch_weight_grad(const S* a, const S* b, int64_t D, int64_t K, const int32_t* slot_row,
                        int64_t TK, W* grad_w, cudaStream_t s) {
  const int64_t V = D / kW;
  const int64_t warps_per_block = kThreads / 32;
  const int64_t want = (TK + warps_per_block - 1) / warps_per_block;
  const unsigned grid = static_cast<unsigned>(want < kMaxBlocks ? want : kMaxBlocks);
  weight_grad_kernel<S, W, kW><<<grid, kThreads, 0, s>>>(a, b, V, K, slot_row, TK, grad_w);
}

// Calls f(S{}, W{}) with S the device storage type of `dtype` and W the weight type of `wdtype`
// (fp32 or fp64); false when either code is unsupported.
template <typename F> bool with_types(int dtype, int wdtype, F&& f) {
  auto with_w = [&](auto s_tag) {
    if (wdtype == kFloat32) return f(s_tag, float{}), true;
    if (wdtype == kFloat64) return f(s_tag, double{}), true;
    return false;
  };
  switch (dtype) {
    case kFloat32: return with_w(float{});
    case kBFloat16: return with_w(__nv_bfloat16{});
    case kFloat16: return with_w(__half{});
    case kFloat64: return with_w(double{});
    default: return false;
  }
}

}  // namespace

int dispatch(const void* x, int dtype, int64_t /*T*/, int64_t D, int64_t K, const int32_t* row_slot,
             int64_t N, const void* weights, int wdtype, void* out, intptr_t stream) {
  if (!weights) wdtype = kFloat32;  // unused: any valid code picks the unweighted kernel
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = with_types(dtype, wdtype, [&](auto s_tag, auto w_tag) {
    using S = decltype(s_tag);
    using W = decltype(w_tag);
    if (N == 0 || D == 0) return;
    const auto* xs = static_cast<const S*>(x);
    const auto* ws = static_cast<const W*>(weights);
    auto* os = static_cast<S*>(out);
    if (pack_width<S>(D, {x, out}) > 1)
      launch_dispatch<S, W, 16 / sizeof(S)>(xs, D, K, row_slot, N, ws, os, s);
    else
      launch_dispatch<S, W, 1>(xs, D, K, row_slot, N, ws, os, s);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int combine(const void* y, int dtype, int64_t /*N*/, int64_t D, const int32_t* slot_row,
            int64_t T, int64_t K, const void* weights, int wdtype, void* out, intptr_t stream) {
  if (!weights) wdtype = kFloat32;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = with_types(dtype, wdtype, [&](auto s_tag, auto w_tag) {
    using S = decltype(s_tag);
    using W = decltype(w_tag);
    if (T == 0 || D == 0) return;
    const auto* ys = static_cast<const S*>(y);
    const auto* ws = static_cast<const W*>(weights);
    auto* os = static_cast<S*>(out);
    if (pack_width<S>(D, {y, out}) > 1)
      launch_combine<S, W, 16 / sizeof(S)>(ys, D, slot_row, T, K, ws, os, s);
    else
      launch_combine<S, W, 1>(ys, D, slot_row, T, K, ws, os, s);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int weight_grad(const void* a, const void* b, int dtype, int64_t T, int64_t D, int64_t K,
                const int32_t* slot_row, void* grad_w, int wdtype, intptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = with_types(dtype, wdtype, [&](auto s_tag, auto w_tag) {
    using S = decltype(s_tag);
    using W = decltype(w_tag);
    const int64_t TK = T * K;
    if (TK == 0) return;  // D == 0 still writes zeros (empty dot products)
    const auto* as = static_cast<const S*>(a);
    const auto* bs = static_cast<const S*>(b);
    auto* gw = static_cast<W*>(grad_w);
    if (pack_width<S>(D, {a, b}) > 1)
      launch_weight_grad<S, W, 16 / sizeof(S)>(as, bs, D, K, slot_row, TK, gw, s);
    else
      launch_weight_grad<S, W, 1>(as, bs, D, K, slot_row, TK, gw, s);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moe::cuda
