// Top-k gating on CUDA: one warp per token, the token's E <= 256 logits spread over the lanes
// (lane l holds experts l, l + 32, ...; kV values per lane, kV * 32 >= E) and kept in registers.
// Scores in fp32 (fp64 for fp64 logits) with warp-shuffle max/sum, then K rounds of a warp
// argmax over the not-yet-selected experts, ties to the lower expert id. Lane r keeps the r-th
// winner and writes it at the end. No shared memory, no atomics, no host synchronisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda/topk_gating.h"

namespace moe::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxBlocks = 65536;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Round to nearest even, as torch's .to(dtype).
__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store_as(double* p, double v) { *p = v; }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ bool finite_acc(float v) { return isfinite(v); }
__device__ __forceinline__ bool finite_acc(double v) { return isfinite(v); }
__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_of(double) {
  return __longlong_as_double(0x7ff8000000000000ll);
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Loads the token's logits into z (zero past E); returns whether the whole row is finite
// (warp-uniform).
template <typename T, int kV, typename A>
__device__ __forceinline__ bool load_row(const T* __restrict__ row, int E, int lane, A (&z)[kV]) {
  bool finite = true;
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const int e = lane + 32 * j;
    z[j] = A(0);
    if (e < E) {
      z[j] = to_acc(row[e]);
      finite = finite && finite_acc(z[j]);
    }
  }
  return __all_sync(kFull, finite);
}

// Scores s = softmax(z) over the row (score 0) or sigmoid(z) (score 1); zero past E.
template <int kV, typename A>
__device__ __forceinline__ void row_scores(const A (&z)[kV], int E, int lane, int score,
                                           A (&s)[kV]) {
  if (score == 0) {
    A zmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < kV; ++j)
      if (lane + 32 * j < E) zmax = fmax(zmax, z[j]);
    zmax = warp_max(zmax);
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      s[j] = lane + 32 * j < E ? exp_acc(z[j] - zmax) : A(0);
      sum += s[j];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kV; ++j) s[j] = s[j] / sum;
  } else {
#pragma unroll
    for (int j = 0; j < kV; ++j)
      s[j] = lane + 32 * j < E ? A(1) / (A(1) + exp_acc(-z[j])) : A(0);
  }
}

// Whether candidate (v, i) beats the current best (bv, bi): a higher value, or an equal value
// with a lower expert id. Id -1 means "no candidate". A NaN value never beats a real candidate
// and is never beaten, so every round still picks some unselected expert.
template <typename A>
__device__ __forceinline__ bool beats(A v, int i, A bv, int bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

template <typename T, int kV>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_kernel(const T* __restrict__ logits, int64_t T_, int E, int K, int score,
                       const float* __restrict__ bias, bool normalize,
                       typename AccOf<T>::type* __restrict__ weights,
                       int32_t* __restrict__ experts) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t first = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = first; t < T_; t += stride) {  // warp-uniform loop
    A z[kV];
    if (!load_row<T, kV>(logits + t * E, E, lane, z)) {
      // Non-finite logits: flag the token (weights NaN, ids -1) instead of raising.
      if (lane < K) {
        weights[t * K + lane] = nan_of(A(0));
        experts[t * K + lane] = -1;
      }
      continue;
    }
    A s[kV];
    row_scores<kV>(z, E, lane, score, s);
    // Selection value: the logits themselves without a bias (monotonic in the scores, so exact
    // ties resolve as in the reference), score + bias with one.
    A key[kV];
    unsigned taken = 0;  // bit j: element lane + 32 j is selected already or past E
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int e = lane + 32 * j;
      key[j] = z[j];
      if (e >= E)
        taken |= 1u << j;
      else if (bias != nullptr)
        key[j] = s[j] + A(bias[e]);
    }
    A denom = A(0), my_w = A(0);
    int32_t my_id = -1;
    for (int r = 0; r < K; ++r) {
      A bv = A(0), bs = A(0);
      int bi = -1;
#pragma unroll
      for (int j = 0; j < kV; ++j) {  // increasing expert id: strict '>' keeps the lower id
        if (!((taken >> j) & 1u) && beats(key[j], lane + 32 * j, bv, bi)) {
          bv = key[j];
          bs = s[j];
          bi = lane + 32 * j;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const A ov = __shfl_xor_sync(kFull, bv, off);
        const A os = __shfl_xor_sync(kFull, bs, off);
        const int oi = __shfl_xor_sync(kFull, bi, off);
        if (beats(ov, oi, bv, bi)) {
          bv = ov;
          bs = os;
          bi = oi;
        }
      }
      // Every lane holds the same winner already (a total order); take lane 0's so that the
      // lanes agree even with NaN in the bias.
      bi = __shfl_sync(kFull, bi, 0);
      bs = __shfl_sync(kFull, bs, 0);
      if (bi >= 0 && (bi & 31) == lane) taken |= 1u << (bi >> 5);
      denom += bs;
      if (lane == r) {
        my_w = bs;
        my_id = bi;
      }
    }
    if (lane < K) {
      weights[t * K + lane] = normalize ? my_w / denom : my_w;
      experts[t * K + lane] = my_id;
    }
  }
}

template <typename T, int kV>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_backward_kernel(const typename AccOf<T>::type* __restrict__ grad_w,
                                const T* __restrict__ logits, const int32_t* __restrict__ experts,
                                int64_t T_, int E, int K, int score, bool normalize,
                                T* __restrict__ dlogits) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t first = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = first; t < T_; t += stride) {  // warp-uniform loop
    A z[kV];
    T* out = dlogits + t * E;
    if (!load_row<T, kV>(logits + t * E, E, lane, z)) {
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (lane + 32 * j < E) store_as(out + lane + 32 * j, nan_of(A(0)));
      continue;
    }
    A s[kV];
    row_scores<kV>(z, E, lane, score, s);
    // Lane r < K: selected expert id_r, its score g_r and incoming gradient dg_r.
    int id = -1;
    A g = A(0), dg = A(0);
    if (lane < K) {
      id = experts[t * K + lane];
      if (id < 0 || id >= E) id = -1;  // contributes nothing
      dg = grad_w[t * K + lane];
    }
    for (int r = 0; r < K; ++r) {
      const int idr = __shfl_sync(kFull, id, r);
      A mine = A(0);
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (lane + 32 * j == idr) mine = s[j];
      const A gr = __shfl_sync(kFull, mine, idr < 0 ? 0 : (idr & 31));
      if (lane == r && idr >= 0) g = gr;
    }
    if (id < 0) dg = A(0);
    if (normalize) {
      // w_r = g_r / sum(g): dg_r <- (dg_r - sum_q dg_q g_q / sum(g)) / sum(g)
      const A denom = warp_sum(g);
      const A c = warp_sum(dg * (g / denom));
      dg = (dg - c) / denom;
      if (id < 0) dg = A(0);
    }
    // ds_e = sum of dg_r over the slots r that selected e.
    A ds[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) ds[j] = A(0);
    for (int r = 0; r < K; ++r) {
      const int idr = __shfl_sync(kFull, id, r);
      const A dgr = __shfl_sync(kFull, dg, r);
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (lane + 32 * j == idr) ds[j] += dgr;
    }
    if (score == 0) {
      A dot = A(0);
#pragma unroll
      for (int j = 0; j < kV; ++j) dot += ds[j] * s[j];
      dot = warp_sum(dot);
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (lane + 32 * j < E) store_as(out + lane + 32 * j, s[j] * (ds[j] - dot));
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (lane + 32 * j < E) store_as(out + lane + 32 * j, ds[j] * s[j] * (A(1) - s[j]));
    }
  }
}

int grid_for(int64_t T) {
  const int64_t want = (T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(want < kMaxBlocks ? want : kMaxBlocks);
}

// Calls f(T{}, std::integral_constant<int, kV>{}) for the storage type of `dtype` and the
// smallest register width kV in {1, 2, 4, 8} with 32 kV >= E. Returns false for an unknown
// dtype or E out of range.
template <typename F> bool dispatch_topk_gating(int dtype, int64_t E, F&& f) {
  auto by_width = [&](auto tag) {
    using T = decltype(tag);
    if (E <= 32)
      f(T{}, std::integral_constant<int, 1>{});
    else if (E <= 64)
      f(T{}, std::integral_constant<int, 2>{});
    else if (E <= 128)
      f(T{}, std::integral_constant<int, 4>{});
    else
      f(T{}, std::integral_constant<int, 8>{});
  };
  if (E < 1 || E > kGatingMaxExperts) return false;
  switch (dtype) {
    case kFloat32: by_width(float{}); return true;
    case kBFloat16: by_width(__nv_bfloat16{}); return true;
    case kFloat64: by_width(double{}); return true;
    case kFloat16: by_width(__half{}); return true;
    default: return false;
  }
}

}  // namespace

int topk_gating(const void* logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                const float* bias, bool normalize, void* weights, int32_t* experts,
                intptr_t stream) {
  if (K < 1 || K > kGatingMaxTopK || K > E || (score != 0 && score != 1))
    return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_topk_gating(dtype, E, [&](auto tag, auto width) {
    using T_ = decltype(tag);
    using A = typename AccOf<T_>::type;
    topk_gating_kernel<T_, decltype(width)::value>
        <<<grid_for(T), kWarpsPerBlock * 32, 0, s>>>(
            static_cast<const T_*>(logits), T, static_cast<int>(E), static_cast<int>(K), score,
            bias, normalize, static_cast<A*>(weights), experts);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int topk_gating_backward(const void* grad_weights, const void* logits, int dtype,
                         const int32_t* experts, int64_t T, int64_t E, int64_t K, int score,
                         bool normalize, void* dlogits, intptr_t stream) {
  if (K < 1 || K > kGatingMaxTopK || K > E || (score != 0 && score != 1))
    return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_topk_gating(dtype, E, [&](auto tag, auto width) {
    using T_ = decltype(tag);
    using A = typename AccOf<T_>::type;
    topk_gating_backward_kernel<T_, decltype(width)::value>
        <<<grid_for(T), kWarpsPerBlock * 32, 0, s>>>(
            static_cast<const A*>(grad_weights), static_cast<const T_*>(logits), experts, T,
            static_cast<int>(E), static_cast<int>(K), score, normalize, static_cast<T_*>(dlogits));
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moe::cuda
