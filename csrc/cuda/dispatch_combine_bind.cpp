// Python bindings of the CUDA dispatch, combine and gate-weight gradient (cuda/dispatch_combine.h).
// Python validates shapes, devices and contiguity; the dtype codes are checked here so a bad
// code is a ValueError naming the argument rather than a CUDA error.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "cuda/check.h"
#include "cuda/dispatch_combine.h"
#include "registry.h"

using moe::cuda::as_ptr;
using ptr = std::uintptr_t;

namespace {

void check_storage(int code, const char* arg) {
  if (code != moe::kFloat32 && code != moe::kBFloat16 && code != moe::kFloat16 &&
      code != moe::kFloat64)
    moe::bad_dtype(arg, code);
}

void check_weight(int code, const char* arg) {
  if (code != moe::kFloat32 && code != moe::kFloat64) moe::bad_dtype(arg, code);
}

}  // namespace

MOE_BINDINGS(cuda_dispatch_combine) {
  m.def("dispatch_cuda", [](ptr x, int dtype, int64_t T, int64_t D, int64_t K, ptr row_slot,
                            int64_t N, ptr weights, int wdtype, ptr out, intptr_t stream) {
    check_storage(dtype, "x_TD");
    if (weights) check_weight(wdtype, "weights_TK");
    moe::cuda::check(moe::cuda::dispatch(as_ptr<const void>(x), dtype, T, D, K,
                                         as_ptr<const int32_t>(row_slot), N,
                                         as_ptr<const void>(weights), wdtype, as_ptr<void>(out),
                                         stream),
                     "dispatch_cuda");
  });
  m.def("combine_cuda", [](ptr y, int dtype, int64_t N, int64_t D, ptr slot_row, int64_t T,
                           int64_t K, ptr weights, int wdtype, ptr out, intptr_t stream) {
    check_storage(dtype, "y_ND");
    if (weights) check_weight(wdtype, "weights_TK");
    moe::cuda::check(moe::cuda::combine(as_ptr<const void>(y), dtype, N, D,
                                        as_ptr<const int32_t>(slot_row), T, K,
                                        as_ptr<const void>(weights), wdtype, as_ptr<void>(out),
                                        stream),
                     "combine_cuda");
  });
  m.def("weight_grad_cuda", [](ptr a, ptr b, int dtype, int64_t T, int64_t D, int64_t K,
                               ptr slot_row, ptr grad_w, int wdtype, intptr_t stream) {
    check_storage(dtype, "a_TD");
    check_weight(wdtype, "grad_w_TK");
    moe::cuda::check(moe::cuda::weight_grad(as_ptr<const void>(a), as_ptr<const void>(b), dtype,
                                            T, D, K, as_ptr<const int32_t>(slot_row),
                                            as_ptr<void>(grad_w), wdtype, stream),
                     "weight_grad_cuda");
  });
}
