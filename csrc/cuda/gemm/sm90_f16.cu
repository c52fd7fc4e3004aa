// Hopper grouped GEMM kernels for fp16 (three operand layouts); see sm90_grouped.cuh.
#include "cuda/gemm/sm90_grouped.cuh"

namespace moe::cuda::gemm {

size_t sm90_workspace_bytes_f16(const Problem& p) {
  return sm90::workspace_bytes_for<cutlass::half_t>(p);
}

Error sm90_run_f16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream) {
  return sm90::run_for<cutlass::half_t>(p, workspace, workspace_bytes, stream);
}

}  // namespace moe::cuda::gemm
