// Routing histogram on CPU: label x expert counts (int64) and gate-weight sums (fp32),
// accumulated in place. Tokens are split into fixed-size chunks, each chunk counts into a
// private buffer, and chunks are reduced in order: deterministic whatever the thread count.
#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/ops.h"

namespace moe::cpu {

void routing_histogram(const int32_t* experts, const int64_t* labels, const float* weights,
                       int64_t T, int64_t K, int64_t G, int64_t E, int64_t* counts,
                       float* wsum) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const int64_t GE = G * E;
  std::vector<int64_t> c(chunks * GE, 0);
  std::vector<float> w(weights ? chunks * GE : 0, 0.f);
  int64_t bad_label = -1, bad_expert = -1;
#pragma omp parallel for schedule(static) reduction(max : bad_label, bad_expert)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    int64_t* cc = c.data() + ch * GE;
    float* ww = weights ? w.data() + ch * GE : nullptr;
    for (int64_t t = ch * kChunk; t < std::min(T, (ch + 1) * kChunk); ++t) {
      const int64_t g = labels[t];
      if (g < -1 || g >= G) bad_label = std::max(bad_label, t);
      const bool skip = g < 0 || g >= G;  // ids of skipped tokens are checked all the same
      for (int64_t k = 0; k < K; ++k) {
        const int32_t e = experts[t * K + k];
        if (e < -1 || e >= E) bad_expert = std::max(bad_expert, t * K + k);
        if (skip || e < 0 || e >= E) continue;
        ++cc[g * E + e];
        if (ww) ww[g * E + e] += weights[t * K + k];
      }
    }
  }
  // Reported: the last bad entry (a max-reduction keeps the result independent of threads).
  if (bad_label >= 0)
    throw std::invalid_argument("labels_T: expected labels in [-1, " + std::to_string(G) +
                                ") (-1 = skip; rows of out_GE), got labels_T[" +
                                std::to_string(bad_label) + "] = " +
                                std::to_string(labels[bad_label]));
  if (bad_expert >= 0)
    throw std::invalid_argument("experts_TK: expected expert ids in [-1, " + std::to_string(E) +
                                ") (-1 = skip; columns of out_GE), got experts_TK[" +
                                std::to_string(bad_expert / K) + ", " +
                                std::to_string(bad_expert % K) + "] = " +
                                std::to_string(experts[bad_expert]));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < GE; ++i) {
    int64_t ci = 0;
    float wi = 0.f;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      ci += c[ch * GE + i];
      if (weights) wi += w[ch * GE + i];
    }
    counts[i] += ci;
    if (wsum) wsum[i] += wi;
  }
}

}  // namespace moe::cpu
