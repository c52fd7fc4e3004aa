// Python bindings of the CUDA top-k gating (forward and backward). Python has checked shapes,
// dtypes and devices; the limits of the kernels are checked here, before any CUDA call, so bad
// sizes raise a ValueError naming the argument.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "cuda/topk_gating.h"
#include "registry.h"

using moe::cuda::as_ptr;
using ptr = std::uintptr_t;

namespace {

void check_sizes(const char* op, int dtype, int64_t T, int64_t E, int64_t K, int score) {
  const std::string p = std::string(op) + ": ";
  if (T < 0) throw std::invalid_argument(p + "T: expected >= 0, got " + std::to_string(T));
  if (E < 1 || E > moe::cuda::kGatingMaxExperts)
    throw std::invalid_argument(p + "E: expected 1 <= E <= " +
                                std::to_string(moe::cuda::kGatingMaxExperts) + ", got " +
                                std::to_string(E));
  if (K < 1 || K > moe::cuda::kGatingMaxTopK || K > E)
    throw std::invalid_argument(p + "K: expected 1 <= K <= min(E, " +
                                std::to_string(moe::cuda::kGatingMaxTopK) + "), got " +
                                std::to_string(K) + " with E = " + std::to_string(E));
  if (score != 0 && score != 1)
    throw std::invalid_argument(p + "score: expected 0 (softmax) or 1 (sigmoid), got " +
                                std::to_string(score));
  if (dtype < 0 || dtype > 3)
    throw std::invalid_argument(p + "dtype: unsupported dtype code " + std::to_string(dtype));
}

}  // namespace

MOE_BINDINGS(cuda_topk_gating) {
  m.def("topk_gating_cuda", [](ptr logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                               ptr bias, bool normalize, ptr weights, ptr experts,
                               intptr_t stream) {
    check_sizes("topk_gating_cuda", dtype, T, E, K, score);
    moe::cuda::check(moe::cuda::topk_gating(as_ptr<const void>(logits), dtype, T, E, K, score,
                                            as_ptr<const float>(bias), normalize,
                                            as_ptr<void>(weights), as_ptr<int32_t>(experts),
                                            stream),
                     "topk_gating_cuda");
  });
  m.def("topk_gating_backward_cuda",
        [](ptr grad_weights, ptr logits, int dtype, ptr experts, int64_t T, int64_t E, int64_t K,
           int score, bool normalize, ptr dlogits, intptr_t stream) {
          check_sizes("topk_gating_backward_cuda", dtype, T, E, K, score);
          moe::cuda::check(
              moe::cuda::topk_gating_backward(as_ptr<const void>(grad_weights),
                                              as_ptr<const void>(logits), dtype,
                                              as_ptr<const int32_t>(experts), T, E, K, score,
                                              normalize, as_ptr<void>(dlogits), stream),
              "topk_gating_backward_cuda");
        });
  m.attr("topk_gating_cuda_max_experts") = moe::cuda::kGatingMaxExperts;
  m.attr("topk_gating_cuda_max_top_k") = moe::cuda::kGatingMaxTopK;
}
