// Host-side helpers for the CUDA binding files: turn a launcher's cudaError_t code into a
// Python RuntimeError naming the op.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace moe::cuda {

// The message of a cudaError_t code (check.cu: only CUDA sources include the runtime headers).
const char* error_string(int code);

inline void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": " + error_string(code));
}

template <typename T> inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace moe::cuda
