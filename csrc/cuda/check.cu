// The message of a launcher's cudaError_t code (cuda/check.h).
#include <cuda_runtime.h>

#include "cuda/check.h"

namespace moe::cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace moe::cuda
