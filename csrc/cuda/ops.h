// CUDA kernels of moe_kernels._C (host-side launchers). Torch-free: raw device pointers, sizes
// and the stream as an integer handle. Return the cudaError_t of the launch as an int.
#pragma once
#include <cstdint>

namespace moe::cuda {

// Routing histogram, accumulated in place on device (see cpu/ops.h for semantics).
int routing_histogram(const int32_t* experts, const int64_t* labels, const float* weights,
                      int64_t T, int64_t K, int64_t G, int64_t E, int64_t* counts, float* wsum,
                      intptr_t stream);

const char* error_string(int code);

}  // namespace moe::cuda
