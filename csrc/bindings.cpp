// pybind11 module moe_kernels._C: thin bindings. Arguments are data pointers (ints from
// tensor.data_ptr()), sizes, dtype codes and, for CUDA, the stream handle. Python validates
// shapes, dtypes and devices; kernels check the data they read (NaN logits, id ranges).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/ops.h"
#include "registry.h"

namespace py = pybind11;
using ptr = std::uintptr_t;

template <typename T> static T* P(ptr p) { return reinterpret_cast<T*>(p); }

static py::dict build_info() {
  py::dict d;
  d["cpu"] = true;
  d["cxx_compiler"] = MOE_CXX_COMPILER;
  d["openmp"] = MOE_OPENMP_VERSION;
#ifdef MOE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = MOE_CUDA_ARCHS_STR;
  d["cuda_compiler"] = "nvcc " MOE_CUDA_VERSION;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_compiler"] = "";
#endif
#ifdef MOE_WITH_CUTLASS
  d["cutlass"] = true;
#else
  d["cutlass"] = false;
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_kernels compiled core (torch-free CPU and CUDA kernels)";
  m.def("build_info", &build_info);

  m.def("topk_gating_cpu", [](ptr logits, int dtype, int64_t T, int64_t E, int64_t K, int score,
                              ptr bias, bool normalize, ptr weights, ptr experts) {
    py::gil_scoped_release nogil;
    moe::cpu::topk_gating(P<const void>(logits), dtype, T, E, K, score, P<const float>(bias),
                          normalize, P<void>(weights), P<int32_t>(experts));
  });
  m.def("route_cpu", [](ptr experts, int64_t T, int64_t K, int64_t E, int64_t capacity, int drop,
                        ptr weights, int wdtype, int64_t N, ptr counts, ptr kept, ptr offsets,
                        ptr row_slot, ptr slot_row) {
    py::gil_scoped_release nogil;
    moe::cpu::route(P<const int32_t>(experts), T, K, E, capacity, drop, P<const void>(weights),
                    wdtype, N, P<int32_t>(counts), P<int32_t>(kept), P<int32_t>(offsets),
                    P<int32_t>(row_slot), P<int32_t>(slot_row));
  });
  m.def("dispatch_cpu", [](ptr x, int dtype, int64_t T, int64_t D, int64_t K, ptr row_slot,
                           int64_t N, ptr weights, int wdtype, ptr out) {
    py::gil_scoped_release nogil;
    moe::cpu::dispatch(P<const void>(x), dtype, T, D, K, P<const int32_t>(row_slot), N,
                       P<const void>(weights), wdtype, P<void>(out));
  });
  m.def("combine_cpu", [](ptr y, int dtype, int64_t N, int64_t D, ptr slot_row, int64_t T,
                          int64_t K, ptr weights, int wdtype, ptr out) {
    py::gil_scoped_release nogil;
    moe::cpu::combine(P<const void>(y), dtype, N, D, P<const int32_t>(slot_row), T, K,
                      P<const void>(weights), wdtype, P<void>(out));
  });
  m.def("weight_grad_cpu", [](ptr a, ptr b, int dtype, int64_t T, int64_t D, int64_t K,
                              ptr slot_row, ptr grad_w, int wdtype) {
    py::gil_scoped_release nogil;
    moe::cpu::weight_grad(P<const void>(a), P<const void>(b), dtype, T, D, K,
                          P<const int32_t>(slot_row), P<void>(grad_w), wdtype);
  });
  m.def("routing_histogram_cpu", [](ptr experts, ptr labels, ptr weights, int64_t T, int64_t K,
                                    int64_t G, int64_t E, ptr counts, ptr wsum) {
    py::gil_scoped_release nogil;
    moe::cpu::routing_histogram(P<const int32_t>(experts), P<const int64_t>(labels),
                                P<const float>(weights), T, K, G, E, P<int64_t>(counts),
                                P<float>(wsum));
  });
  // CUDA ops (csrc/cuda/*_bind.cpp, compiled when CUDA is on) register themselves.
  for (auto fn : moe::binders()) fn(m);
}
