// Python bindings of the CUDA routing histogram.
#include <cstdint>

#include "cuda/check.h"
#include "cuda/routing_histogram.h"
#include "registry.h"

using moe::cuda::as_ptr;
using ptr = std::uintptr_t;

MOE_BINDINGS(cuda_routing_histogram) {
  m.def("routing_histogram_cuda", [](ptr experts, ptr labels, ptr weights, int64_t T, int64_t K,
                                     int64_t G, int64_t E, ptr counts, ptr wsum, intptr_t stream) {
    moe::cuda::check(
        moe::cuda::routing_histogram(as_ptr<const int32_t>(experts), as_ptr<const int64_t>(labels),
                                     as_ptr<const float>(weights), T, K, G, E,
                                     as_ptr<int64_t>(counts), as_ptr<float>(wsum), stream),
        "routing_histogram_cuda");
  });
}
