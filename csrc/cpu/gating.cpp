// Top-k gating on CPU: fp32 (fp64 for fp64 input) scores, selection with an optional bias,
// ties to the lower expert index, optional renormalisation. OpenMP over tokens.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ops.h"

namespace moe::cpu {
namespace {

template <typename T>
int64_t gating_impl(const T* logits, int64_t T_, int64_t E, int64_t K, int score,
                    const float* bias, bool normalize, typename Acc<T>::type* weights,
                    int32_t* experts) {
  using A = typename Acc<T>::type;
  int64_t first_bad = T_;
#pragma omp parallel
  {
    std::vector<A> s(E), sel(E);
    std::vector<int32_t> idx(E);
#pragma omp for schedule(static) reduction(min : first_bad)
    for (int64_t t = 0; t < T_; ++t) {
      const T* z = logits + t * E;
      A zmax = -std::numeric_limits<A>::infinity();
      bool finite = true;
      for (int64_t e = 0; e < E; ++e) {
        sel[e] = s[e] = load(z + e);
        finite = finite && std::isfinite(s[e]);
        zmax = std::max(zmax, s[e]);
      }
      if (!finite) {
        first_bad = std::min(first_bad, t);
        continue;
      }
      if (score == 0) {
        A sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(s[e] - zmax));
        for (int64_t e = 0; e < E; ++e) s[e] /= sum;
      } else {
        for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-s[e]));
      }
      // Without a bias, select on the logits themselves (the scores are monotonic in them), so
      // exact ties resolve the same way in every backend.
      for (int64_t e = 0; e < E; ++e) sel[e] = bias ? s[e] + A(bias[e]) : sel[e];
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), [&](int32_t a, int32_t b) {
        return sel[a] > sel[b] || (sel[a] == sel[b] && a < b);
      });
      A denom = 0;
      if (normalize)
        for (int64_t k = 0; k < K; ++k) denom += s[idx[k]];
      for (int64_t k = 0; k < K; ++k) {
        experts[t * K + k] = idx[k];
        weights[t * K + k] = normalize ? s[idx[k]] / denom : s[idx[k]];
      }
    }
  }
  return first_bad;
}

}  // namespace

void topk_gating(const void* logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                 const float* bias, bool normalize, void* weights, int32_t* experts) {
  int64_t bad = T;
  dispatch_float(dtype, "logits_TE", [&](auto tag) {
    using S = decltype(tag);
    bad = gating_impl<S>(static_cast<const S*>(logits), T, E, K, score, bias, normalize,
                         static_cast<typename Acc<S>::type*>(weights), experts);
  });
  if (bad < T)
    throw std::invalid_argument("logits_TE: expected finite values, found NaN or inf in token " +
                                std::to_string(bad));
}

}  // namespace moe::cpu
