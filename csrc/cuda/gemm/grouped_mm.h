// Grouped GEMM on CUDA (CUTLASS): host-side interface shared by the bindings and the per-arch,
// per-dtype translation units. Torch-free and CUTLASS-free so the binding file compiles with the
// host compiler.
//
// Group e covers rows [offsets[e], offsets[e+1]) of x. Two kinds of launch:
//   forward      out_NF[rows of e] = x_ND[rows of e] @ b_e, b_e a D x F matrix (row- or
//                column-major, one weight matrix per group); rows past offsets[E] are zeroed.
//   weight grad  out_EDF[e] = x_ND[rows of e]^T @ b_NF[rows of e]; zero for empty groups.
// The backward dx = grouped_mm(dy, w^T) is a forward launch whose b is column-major.
//
// Everything per group (problem shapes, pointers, strides) is computed on device from the offsets
// by a prepare kernel, so nothing is read back to the host and the launch is graph-capturable.
// The caller allocates one workspace (sized by workspace_bytes) that holds those arrays and
// CUTLASS's own scratch.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe::cuda::gemm {

enum Kind : int {
  kForwardBRow = 0,  // b_e[d][f] at b + e * b_group_stride + d * ldb + f
  kForwardBCol = 1,  // b_e[d][f] at b + e * b_group_stride + d + f * ldb
  kWeightGrad = 2,   // b is (N, F) row-major, out is (E, D, F) row-major
};

struct Problem {
  int kind = kForwardBRow;
  const void* x = nullptr;        // (N, D) row-major, 16-byte aligned
  const void* b = nullptr;        // forward: E weight matrices; weight grad: (N, F) row-major
  void* out = nullptr;            // forward: (N, F); weight grad: (E, D, F)
  const void* offsets = nullptr;  // (E + 1,) int32 or int64, on device
  bool offsets_int64 = false;
  int64_t E = 0, N = 0, D = 0, F = 0;
  int64_t ldb = 0, b_group_stride = 0;  // forward only, in elements
  int sm_count = 0;                     // multiprocessors of the device (sizes persistent grids)
};

// Error text of a failed launch, or nullptr on success. Static strings only.
using Error = const char*;

// Per-arch, per-dtype entry points (dtype is the storage type: bf16 or fp16). Each one exists
// only when its translation unit is compiled (MOE_GEMM_SM90 / MOE_GEMM_SM80).
size_t sm90_workspace_bytes_bf16(const Problem& p);
size_t sm90_workspace_bytes_f16(const Problem& p);
Error sm90_run_bf16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream);
Error sm90_run_f16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream);

size_t sm80_workspace_bytes_bf16(const Problem& p);
size_t sm80_workspace_bytes_f16(const Problem& p);
Error sm80_run_bf16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream);
Error sm80_run_f16(const Problem& p, void* workspace, size_t workspace_bytes, intptr_t stream);

}  // namespace moe::cuda::gemm
