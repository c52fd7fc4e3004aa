// Binding registry: each source file registers its own pybind11 definitions with
// MOE_BINDINGS(name) { m.def(...); }, and the module init in bindings.cpp runs them all. Op
// families (and their CUDA halves, compiled only when CUDA is on) stay in their own files.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace moe {

using BindFn = void (*)(pybind11::module_&);

inline std::vector<BindFn>& binders() {
  static std::vector<BindFn> fns;
  return fns;
}

struct RegisterBindings {
  explicit RegisterBindings(BindFn fn) { binders().push_back(fn); }
};

}  // namespace moe

#define MOE_BINDINGS(name)                                                     \
  static void moe_bind_##name(pybind11::module_& m);                           \
  static const ::moe::RegisterBindings moe_register_##name(&moe_bind_##name); \
  static void moe_bind_##name(pybind11::module_& m)
