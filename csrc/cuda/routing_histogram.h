// Routing histogram on CUDA (host-side launcher). Torch-free: raw device pointers, sizes and the
// stream as an integer handle. Returns the cudaError_t of the launch as an int (0 = success); it
// never synchronises and never allocates.
#pragma once
#include <cstdint>

namespace moe::cuda {

// Accumulated in place on device (see cpu/ops.h for the semantics): counts_GE int64, wsum_GE
// fp32 (null together with weights_TK). Pairs with a label or expert id outside [0, G) / [0, E)
// are skipped.
int routing_histogram(const int32_t* experts, const int64_t* labels, const float* weights,
                      int64_t T, int64_t K, int64_t G, int64_t E, int64_t* counts, float* wsum,
                      intptr_t stream);

}  // namespace moe::cuda
