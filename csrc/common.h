// Shared definitions of the torch-free compiled core: dtype codes and scalar load/store.
// Kernels take raw pointers, sizes and a dtype code; Python allocates every buffer.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moe {

// Must match moe_kernels/ops/_backend.py::DTYPE_CODES.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2, kFloat16 = 3 };

struct bf16 {
  uint16_t bits;
};

inline float bf16_to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN kept quiet: the same rounding torch uses for .to(bfloat16).
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Accumulation type: fp32 for fp32/bf16 storage, fp64 for fp64 storage.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> inline typename Acc<T>::type load(const T* p) { return *p; }
template <> inline float load<bf16>(const bf16* p) { return bf16_to_float(*p); }
template <typename T> inline void store(T* p, typename Acc<T>::type v) { *p = static_cast<T>(v); }
template <> inline void store<bf16>(bf16* p, float v) { *p = float_to_bf16(v); }

[[noreturn]] inline void bad_dtype(const char* arg, int code) {
  throw std::invalid_argument(std::string(arg) + ": unsupported dtype code " + std::to_string(code));
}

// Calls f(T{}) with T the storage type of `code` (fp32, bf16 or fp64).
template <typename F> void dispatch_float(int code, const char* arg, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(bf16{}); break;
    case kFloat64: f(double{}); break;
    default: bad_dtype(arg, code);
  }
}

}  // namespace moe
