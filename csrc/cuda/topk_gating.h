// Top-k gating on CUDA (host-side launchers). Torch-free: raw device pointers, sizes, a dtype
// code (common.h) and the stream as an integer handle. Launchers return the cudaError_t of the
// launch as an int; they never synchronise and never allocate.
#pragma once
#include <cstdint>

namespace moe::cuda {

// Limits of the one-warp-per-token kernels: each lane keeps E / 32 scores in registers.
constexpr int64_t kGatingMaxExperts = 256;
constexpr int64_t kGatingMaxTopK = 16;

// Forward, same semantics as cpu::topk_gating for finite logits: scores (softmax or sigmoid of
// logits) in fp32 (fp64 for fp64 logits), selection on the logits (no bias) or on score + bias,
// ties to the lower expert id, output ordered by decreasing selection value, weights are the
// (optionally renormalised) scores. logits_TE: dtype code f32/bf16/f64/f16; bias_E: fp32 or
// null; weights_TK: fp32 (fp64 for fp64 logits); experts_TK: int32.
// A token with any NaN or inf logit cannot raise without a host sync, so its row is flagged
// instead: weights NaN and expert ids -1.
int topk_gating(const void* logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                const float* bias, bool normalize, void* weights, int32_t* experts,
                intptr_t stream);

// Backward: dlogits_TE (logits dtype) from grad_weights_TK (fp32, fp64 for fp64 logits), the
// logits and the selected experts_TK. Ids outside [0, E) contribute nothing; a token with any
// NaN or inf logit gets NaN gradients.
int topk_gating_backward(const void* grad_weights, const void* logits, int dtype,
                         const int32_t* experts, int64_t T, int64_t E, int64_t K, int score,
                         bool normalize, void* dlogits, intptr_t stream);

}  // namespace moe::cuda
