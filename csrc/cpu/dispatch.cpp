// Dispatch on CPU: gather token rows into expert-contiguous rows (optionally scaled by the
// slot's gate weight). Each output row is written by one thread: deterministic, no atomics.
#include <cstring>

#include "common.h"
#include "cpu/ops.h"

namespace moe::cpu {
namespace {

template <typename T, typename W>
void dispatch_impl(const T* x, int64_t D, int64_t K, const int32_t* row_slot, int64_t N,
                   const W* weights, T* out) {
  using A = typename Acc<T>::type;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * D;
    const int32_t slot = row_slot[n];
    if (slot < 0) {
      for (int64_t d = 0; d < D; ++d) store(o + d, A(0));
      continue;
    }
    const T* src = x + (slot / K) * D;
    if (weights) {
      const A w = static_cast<A>(weights[slot]);
      for (int64_t d = 0; d < D; ++d) store(o + d, w * load(src + d));
    } else {
      std::memcpy(o, src, D * sizeof(T));
    }
  }
}

}  // namespace

void dispatch(const void* x, int dtype, int64_t /*T*/, int64_t D, int64_t K,
              const int32_t* row_slot, int64_t N, const void* weights, int wdtype, void* out) {
  dispatch_float(dtype, "x_TD", [&](auto tag) {
    using S = decltype(tag);
    if (wdtype == kFloat64)
      dispatch_impl<S, double>(static_cast<const S*>(x), D, K, row_slot, N,
                               static_cast<const double*>(weights), static_cast<S*>(out));
    else
      dispatch_impl<S, float>(static_cast<const S*>(x), D, K, row_slot, N,
                              static_cast<const float*>(weights), static_cast<S*>(out));
  });
}

}  // namespace moe::cpu
