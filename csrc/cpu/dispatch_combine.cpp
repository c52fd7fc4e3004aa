// Dispatch and combine on CPU: the adjoint pair of the routing plan. Dispatch gathers token rows
// into expert-contiguous rows (optionally scaled by the slot's gate weight); combine is the
// weighted un-permute back to tokens, and weight_grad the gate-weight gradient of both. Dispatch
// writes each output row from one thread; combine sums each token's K slots in slot order in fp32
// (fp64 for fp64). Both are deterministic, with no atomics.
#include <algorithm>
#include <cstring>
#include <vector>

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

template <typename T, typename W>
void combine_impl(const T* y, int64_t D, const int32_t* slot_row, int64_t T_, int64_t K,
                  const W* weights, T* out) {
  using A = typename Acc<T>::type;
#pragma omp parallel
  {
    std::vector<A> acc(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T_; ++t) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k = 0; k < K; ++k) {
        const int32_t row = slot_row[t * K + k];
        if (row < 0) continue;
        const A w = weights ? static_cast<A>(weights[t * K + k]) : A(1);
        const T* src = y + static_cast<int64_t>(row) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * load(src + d);
      }
      T* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) store(o + d, acc[d]);
    }
  }
}

template <typename T, typename W>
void weight_grad_impl(const T* a, const T* b, int64_t T_, int64_t D, int64_t K,
                      const int32_t* slot_row, W* grad_w) {
  using A = typename Acc<T>::type;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t row = slot_row[t * K + k];
      A dot = 0;
      if (row >= 0) {
        const T* pa = a + t * D;
        const T* pb = b + static_cast<int64_t>(row) * D;
        for (int64_t d = 0; d < D; ++d) dot += load(pa + d) * load(pb + d);
      }
      grad_w[t * K + k] = static_cast<W>(dot);
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

void combine(const void* y, int dtype, int64_t /*N*/, int64_t D, const int32_t* slot_row,
             int64_t T, int64_t K, const void* weights, int wdtype, void* out) {
  dispatch_float(dtype, "y_ND", [&](auto tag) {
    using S = decltype(tag);
    if (wdtype == kFloat64)
      combine_impl<S, double>(static_cast<const S*>(y), D, slot_row, T, K,
                              static_cast<const double*>(weights), static_cast<S*>(out));
    else
      combine_impl<S, float>(static_cast<const S*>(y), D, slot_row, T, K,
                             static_cast<const float*>(weights), static_cast<S*>(out));
  });
}

void weight_grad(const void* a, const void* b, int dtype, int64_t T, int64_t D, int64_t K,
                 const int32_t* slot_row, void* grad_w, int wdtype) {
  dispatch_float(dtype, "grad", [&](auto tag) {
    using S = decltype(tag);
    if (wdtype == kFloat64)
      weight_grad_impl<S, double>(static_cast<const S*>(a), static_cast<const S*>(b), T, D, K,
                                  slot_row, static_cast<double*>(grad_w));
    else
      weight_grad_impl<S, float>(static_cast<const S*>(a), static_cast<const S*>(b), T, D, K,
                                 slot_row, static_cast<float*>(grad_w));
  });
}

}  // namespace moe::cpu
