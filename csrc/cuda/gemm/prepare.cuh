// Device-side setup shared by the grouped GEMM launchers of every arch: one small kernel reads the
// offsets on device and writes each group's problem shape, pointers and strides into the
// workspace (through an arch-specific Writer), and zeroes what no group covers: the capacity
// padding rows of a forward output, the weight gradient of empty groups. No host round trip.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/gemm/grouped_mm.h"

namespace moe::cuda::gemm {

constexpr int kPrepareThreads = 256;
constexpr size_t kWorkspaceAlign = 128;

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Hands out consecutive, 128-byte aligned arrays of one workspace. With a null base it hands out
// null pointers and only sums the sizes, so sizing and carving share one code path.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}

  template <class T> T* take(int64_t count) {
    const size_t at = offset_;
    offset_ = align_up(offset_ + sizeof(T) * static_cast<size_t>(count), kWorkspaceAlign);
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  void* rest() const { return base_ ? base_ + offset_ : nullptr; }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Offset i clamped into [0, N]: malformed offsets can then never send the GEMM outside x, b or
// out (groups with hi < lo are treated as empty).
template <class Off>
__device__ __forceinline__ int64_t clamped_offset(const Off* offsets, int64_t i, int64_t N) {
  const int64_t v = static_cast<int64_t>(offsets[i]);
  return v < 0 ? 0 : (v > N ? N : v);
}

// Forward: grid (x, 1); threads stride over groups, then over the padding rows' 16-byte chunks.
// Weight grad: grid (x, E); block (0, e) writes group e, blocks (*, e) zero out[e] when e is empty.
// Writer(p, e, lo, hi) writes group e's entries; it must give empty groups an M of 0 so that the
// GEMM schedules no tile for them (CUTLASS 3 leaves the accumulators of a K = 0 tile unset).
template <class T, class Off, class Writer>
__global__ void __launch_bounds__(kPrepareThreads)
    prepare_groups_kernel(Problem p, const Off* __restrict__ offsets, Writer writer) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if (p.kind != kWeightGrad) {
    const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t e = tid; e < p.E; e += stride) {
      const int64_t lo = clamped_offset(offsets, e, p.N);
      const int64_t hi = max(lo, clamped_offset(offsets, e + 1, p.N));
      writer(p, e, lo, hi);
    }
    const int64_t chunks_per_row = p.F * int64_t(sizeof(T)) / 16;
    const int64_t first = clamped_offset(offsets, p.E, p.N) * chunks_per_row;
    const int64_t last = p.N * chunks_per_row;
    uint4* out = static_cast<uint4*>(p.out);
    for (int64_t i = first + tid; i < last; i += stride) out[i] = zero;
  } else {
    const int64_t e = blockIdx.y;
    const int64_t lo = clamped_offset(offsets, e, p.N);
    const int64_t hi = max(lo, clamped_offset(offsets, e + 1, p.N));
    if (blockIdx.x == 0 && threadIdx.x == 0) writer(p, e, lo, hi);
    if (hi == lo) {
      const int64_t chunks = p.D * p.F * int64_t(sizeof(T)) / 16;
      uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + e * p.D * p.F);
      for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < chunks;
           i += int64_t(gridDim.x) * blockDim.x)
        out[i] = zero;
    }
  }
}

// Host: launches the prepare kernel on `stream`. Rows of x/out and the D x F blocks are multiples
// of 16 bytes (checked by the caller), so the zeroing works in 16-byte chunks.
template <class T, class Writer>
cudaError_t launch_prepare(const Problem& p, const Writer& writer, cudaStream_t stream) {
  const int64_t sms = p.sm_count > 0 ? p.sm_count : 1;
  dim3 grid;
  if (p.kind != kWeightGrad) {
    const int64_t chunk_blocks = ceil_div(p.N * p.F * int64_t(sizeof(T)) / 16, kPrepareThreads);
    const int64_t group_blocks = ceil_div(p.E, kPrepareThreads);
    int64_t blocks = chunk_blocks < 2 * sms ? chunk_blocks : 2 * sms;
    if (blocks < group_blocks) blocks = group_blocks;
    grid = dim3(static_cast<unsigned>(blocks > 0 ? blocks : 1), 1, 1);
  } else {
    // Enough blocks per group that one empty group of a large D x F is zeroed quickly, few
    // enough that the blocks of non-empty groups (which exit at once) stay cheap.
    const int64_t chunk_blocks = ceil_div(p.D * p.F * int64_t(sizeof(T)) / 16, kPrepareThreads);
    int64_t per_group = ceil_div(4 * sms, p.E);
    if (per_group > chunk_blocks) per_group = chunk_blocks;
    grid = dim3(static_cast<unsigned>(per_group > 0 ? per_group : 1), static_cast<unsigned>(p.E),
                1);
  }
  if (p.offsets_int64) {
    prepare_groups_kernel<T><<<grid, kPrepareThreads, 0, stream>>>(
        p, static_cast<const int64_t*>(p.offsets), writer);
  } else {
    prepare_groups_kernel<T><<<grid, kPrepareThreads, 0, stream>>>(
        p, static_cast<const int32_t*>(p.offsets), writer);
  }
  return cudaGetLastError();
}

}  // namespace moe::cuda::gemm
