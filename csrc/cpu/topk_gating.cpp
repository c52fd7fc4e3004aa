// Top-k gating on CPU: fp32 (fp64 for fp64 input) scores, selection with an optional bias,
// ties to the lower expert index, optional renormalisation. OpenMP over tokens.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ops.h"

namespace moe::cpu {
namespace {

// Inserts expert e with selection value v into the descending top-k list (vals, idx) of
// current length n <= K. Strict '>' keeps the lower index first among equal values.
template <typename A>
inline void topk_insert(A v, int32_t e, A* vals, int32_t* idx, int64_t& n, int64_t K) {
  if (n == K && !(v > vals[K - 1])) return;
  int64_t j = n < K ? n++ : K - 1;
  while (j > 0 && v > vals[j - 1]) {
    vals[j] = vals[j - 1];
    idx[j] = idx[j - 1];
    --j;
  }
  vals[j] = v;
  idx[j] = e;
}

template <typename T>
int64_t topk_gating_impl(const T* logits, int64_t T_, int64_t E, int64_t K, int score,
                    const float* bias, bool normalize, typename Acc<T>::type* weights,
                    int32_t* experts) {
  using A = typename Acc<T>::type;
  int64_t first_bad = T_;
  // Without a bias the scores are monotonic in the logits, so selection runs on the logits and
  // only the selected scores are needed, except for the softmax denominator when the weights
  // are not renormalised. Exact ties resolve the same way in every backend.
  const bool full_scores = bias != nullptr || (score == 0 && !normalize);
#pragma omp parallel
  {
    std::vector<A> z(E), s(full_scores ? E : 0), top(K);
    std::vector<int32_t> idx(K);
#pragma omp for schedule(static) reduction(min : first_bad)
    for (int64_t t = 0; t < T_; ++t) {
      A zmax = -std::numeric_limits<A>::infinity();
      bool finite = true;
      for (int64_t e = 0; e < E; ++e) {
        z[e] = load(logits + t * E + e);
        finite = finite && std::isfinite(z[e]);
        zmax = std::max(zmax, z[e]);
      }
      if (!finite) {
        first_bad = std::min(first_bad, t);
        continue;
      }
      A denom = 0;
      if (full_scores) {
        if (score == 0) {
          A sum = 0;
          for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(z[e] - zmax));
          for (int64_t e = 0; e < E; ++e) s[e] /= sum;
        } else {
          for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-z[e]));
        }
      }
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e) {
        const A v = bias ? s[e] + A(bias[e]) : z[e];
        topk_insert(v, static_cast<int32_t>(e), top.data(), idx.data(), n, K);
      }
      for (int64_t k = 0; k < K; ++k) {
        const int32_t e = idx[k];
        A w;
        if (full_scores)
          w = s[e];
        else if (score == 0)
          w = std::exp(z[e] - zmax);  // unnormalised; renormalised below
        else
          w = A(1) / (A(1) + std::exp(-z[e]));
        top[k] = w;
        denom += w;
      }
      for (int64_t k = 0; k < K; ++k) {
        experts[t * K + k] = idx[k];
        weights[t * K + k] = normalize ? top[k] / denom : top[k];
      }
    }
  }
  return first_bad;
}

}  // namespace

void topk_gating(const void* logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                 const float* bias, bool normalize, void* weights, int32_t* experts) {
  for (int64_t e = 0; bias != nullptr && e < E; ++e)
    if (!std::isfinite(bias[e]))
      throw std::invalid_argument("bias_E: expected finite values, got bias_E[" +
                                  std::to_string(e) + "] = " + std::to_string(bias[e]));
  int64_t bad = T;
  dispatch_float(dtype, "logits_TE", [&](auto tag) {
    using S = decltype(tag);
    bad = topk_gating_impl<S>(static_cast<const S*>(logits), T, E, K, score, bias, normalize,
                         static_cast<typename Acc<S>::type*>(weights), experts);
  });
  if (bad < T)
    throw std::invalid_argument("logits_TE: expected finite values, found NaN or inf in token " +
                                std::to_string(bad));
}

}  // namespace moe::cpu
