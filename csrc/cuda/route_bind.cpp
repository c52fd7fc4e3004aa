// Python bindings of the CUDA routing plan. Python has checked shapes, dtypes and devices and
// allocates every output and the workspace (route_cuda_workspace_size bytes); the limits of the
// kernels are checked here, before any CUDA call, so bad sizes raise a ValueError naming the
// argument.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "cuda/route.h"
#include "registry.h"

using moe::cuda::as_ptr;
using ptr = std::uintptr_t;

namespace {

void check_sizes(const char* op, int64_t T, int64_t K, int64_t E, int drop, int wdtype) {
  const std::string p = std::string(op) + ": ";
  if (T < 0) throw std::invalid_argument(p + "T: expected >= 0, got " + std::to_string(T));
  if (K < 1) throw std::invalid_argument(p + "K: expected >= 1, got " + std::to_string(K));
  if (E < 1 || E > moe::cuda::kRouteMaxExperts)
    throw std::invalid_argument(p + "E: expected 1 <= E <= " +
                                std::to_string(moe::cuda::kRouteMaxExperts) + ", got " +
                                std::to_string(E));
  if (T * K > moe::cuda::kRouteMaxSlots)
    throw std::invalid_argument(p + "T * K: expected <= " +
                                std::to_string(moe::cuda::kRouteMaxSlots) + ", got " +
                                std::to_string(T * K));
  if (drop != 0 && drop != 1)
    throw std::invalid_argument(p + "drop: expected 0 (position) or 1 (score), got " +
                                std::to_string(drop));
  if (wdtype != 0 && wdtype != 2)
    throw std::invalid_argument(p + "wdtype: expected 0 (float32) or 2 (float64), got " +
                                std::to_string(wdtype));
}

}  // namespace

MOE_BINDINGS(cuda_route) {
  m.def("route_cuda_workspace_size",
        [](int64_t T, int64_t K, int64_t E, int64_t capacity, int drop, int wdtype) {
          check_sizes("route_cuda_workspace_size", T, K, E, drop, wdtype);
          size_t bytes = 0;
          moe::cuda::check(moe::cuda::route_workspace_size(T, K, E, capacity, drop, wdtype, &bytes),
                           "route_cuda_workspace_size");
          return static_cast<int64_t>(bytes);
        });
  m.def("route_cuda", [](ptr experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
                         ptr weights, int wdtype, int64_t N, ptr counts, ptr kept, ptr offsets,
                         ptr row_slot, ptr slot_row, ptr workspace, int64_t workspace_bytes,
                         intptr_t stream) {
    check_sizes("route_cuda", T, K, E, drop, wdtype);
    if (N < 0) throw std::invalid_argument("route_cuda: N: expected >= 0, got " + std::to_string(N));
    if (drop == 1 && capacity >= 0 && weights == 0)
      throw std::invalid_argument("route_cuda: weights: required for score dropping, got null");
    if (workspace_bytes < 0)
      throw std::invalid_argument("route_cuda: workspace_bytes: expected >= 0, got " +
                                  std::to_string(workspace_bytes));
    size_t need = 0;
    moe::cuda::check(moe::cuda::route_workspace_size(T, K, E, capacity, drop, wdtype, &need),
                     "route_cuda");
    if (static_cast<size_t>(workspace_bytes) < need)
      throw std::invalid_argument("route_cuda: workspace_bytes: expected >= " +
                                  std::to_string(need) + " (route_cuda_workspace_size), got " +
                                  std::to_string(workspace_bytes));
    moe::cuda::check(
        moe::cuda::route(as_ptr<const int32_t>(experts), T, K, E, capacity, drop,
                         as_ptr<const void>(weights), wdtype, N, as_ptr<int32_t>(counts),
                         as_ptr<int32_t>(kept), as_ptr<int32_t>(offsets), as_ptr<int32_t>(row_slot),
                         as_ptr<int32_t>(slot_row), as_ptr<void>(workspace),
                         static_cast<size_t>(workspace_bytes), stream),
        "route_cuda");
  });
  m.attr("route_cuda_max_experts") = moe::cuda::kRouteMaxExperts;
}
