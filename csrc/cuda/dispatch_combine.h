// CUDA dispatch / combine / weight_grad launchers (host side). Torch-free: raw device pointers,
// sizes, dtype codes (common.h) and the stream as an integer handle. Each returns the
// cudaError_t of its launch as an int (0 = success). Semantics match csrc/cpu/ops.h:
//
//   dispatch:    out_ND[n] = w[s] * x_TD[s / K] for s = row_slot_N[n] (w = 1 when weights is
//                null), 0 for padding rows (s = -1).
//   combine:     out_TD[t] = sum_{k = 0..K-1} w[t, k] * y_ND[slot_row_TK[t, k]], summed in slot
//                order in fp32 (fp64 for fp64), dropped slots (-1) skipped; no atomics.
//   weight_grad: grad_w_TK[t, k] = <a_TD[t], b_ND[slot_row_TK[t, k]]> in fp32 (fp64 for fp64),
//                0 for dropped slots.
//
// Storage dtypes: fp32, bf16, fp16, fp64. Weights (and grad_w) are fp32 or fp64 (wdtype). An
// unsupported dtype code gives cudaErrorInvalidValue without launching anything.
#pragma once
#include <cstdint>

namespace moe::cuda {

int dispatch(const void* x, int dtype, int64_t T, int64_t D, int64_t K, const int32_t* row_slot,
             int64_t N, const void* weights, int wdtype, void* out, intptr_t stream);

int combine(const void* y, int dtype, int64_t N, int64_t D, const int32_t* slot_row, int64_t T,
            int64_t K, const void* weights, int wdtype, void* out, intptr_t stream);

int weight_grad(const void* a, const void* b, int dtype, int64_t T, int64_t D, int64_t K,
                const int32_t* slot_row, void* grad_w, int wdtype, intptr_t stream);

}  // namespace moe::cuda
