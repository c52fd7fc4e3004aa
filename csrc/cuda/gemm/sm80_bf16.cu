// Ampere-class grouped GEMM kernels for bf16 (three operand layouts); see sm80_grouped.cuh.
#include "cuda/gemm/sm80_grouped.cuh"

namespace moe::cuda::gemm {

size_t sm80_workspace_bytes_bf16(const Problem& p) { return sm80::workspace_bytes_for<cutlass::bfloat16_t>(p); }

Error sm80_run_bf16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream) {
  return sm80::run_for<cutlass::bfloat16_t>(p, workspace, workspace_bytes, stream);
}

}  // namespace moe::cuda::gemm
