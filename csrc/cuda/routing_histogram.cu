// Routing histogram on CUDA: label x expert counts (int64) and gate-weight sums (fp32),
// accumulated in place. Each block counts a grid-strided share of the (token, slot) pairs into
// shared-memory privatised bins, then adds its bins to global memory once, so global atomics
// scale with blocks x bins rather than with tokens. Falls back to global atomics when G x E
// bins do not fit in shared memory.
#include <cuda_runtime.h>

#include "cuda/routing_histogram.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedBins = 4096;  // 4096 x (8 + 4) bytes = 48 KiB

template <bool kShared>
__global__ void routing_histogram_kernel(const int32_t* __restrict__ experts,
                                         const int64_t* __restrict__ labels,
                                         const float* __restrict__ weights, int64_t T, int64_t K,
                                         int64_t G, int64_t E,
                                         unsigned long long* __restrict__ counts,
                                         float* __restrict__ wsum) {
  extern __shared__ unsigned char smem[];
  const int64_t bins = G * E;
  unsigned long long* s_counts = reinterpret_cast<unsigned long long*>(smem);
  float* s_w = reinterpret_cast<float*>(s_counts + (kShared ? bins : 0));
  if (kShared) {
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) {
      s_counts[i] = 0ull;
      if (weights) s_w[i] = 0.f;
    }
    __syncthreads();
  }
  const int64_t pairs = T * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pairs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = labels[i / K];
    const int32_t e = experts[i];
    if (g < 0 || g >= G || e < 0 || e >= E) continue;
    const int64_t bin = g * E + e;
    if (kShared) {
      atomicAdd(s_counts + bin, 1ull);
      if (weights) atomicAdd(s_w + bin, weights[i]);
    } else {
      atomicAdd(counts + bin, 1ull);
      if (weights) atomicAdd(wsum + bin, weights[i]);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) {
      if (s_counts[i]) atomicAdd(counts + i, s_counts[i]);
      if (weights && s_w[i] != 0.f) atomicAdd(wsum + i, s_w[i]);
    }
  }
}

}  // namespace

int routing_histogram(const int32_t* experts, const int64_t* labels, const float* weights,
                      int64_t T, int64_t K, int64_t G, int64_t E, int64_t* counts, float* wsum,
                      intptr_t stream) {
  const int64_t pairs = T * K;
  if (pairs == 0 || G * E == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t want = (pairs + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 1024 ? want : 1024);
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  if (G * E <= kMaxSharedBins) {
    const size_t shmem = G * E * (sizeof(unsigned long long) + (weights ? sizeof(float) : 0));
    routing_histogram_kernel<true>
        <<<blocks, kThreads, shmem, s>>>(experts, labels, weights, T, K, G, E, c, wsum);
  } else {
    routing_histogram_kernel<false>
        <<<blocks, kThreads, 0, s>>>(experts, labels, weights, T, K, G, E, c, wsum);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moe::cuda
