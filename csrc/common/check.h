// RK_CHECK(cond, parts...): TORCH_CHECK whose message is concatenated here with std::string operations and
// thrown by c10 (c10::detail::torchCheckFail). No iostream runs inside _C: on one GPU image (Ubuntu gcc 13.3,
// torch 2.11) streaming a number into TORCH_CHECK's ostringstream inside an extension crashed while the
// message was formatted, so every bad-argument error became a segfault. Parts: strings, integers, bools,
// IntArrayRef (printed as [a, b]), ScalarType, Device.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace rk {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

}  // namespace detail

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (detail::append(s, parts), ...);
  return s;
}

}  // namespace rk

#define RK_CHECK(cond, ...)                                                                                  \
  do {                                                                                                       \
    if (C10_UNLIKELY(!(cond))) {                                                                             \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),                     \
                                    ::rk::message(__VA_ARGS__));                                             \
    }                                                                                                        \
  } while (false)

// RK_CUDA_CHECK(expr): a CUDA runtime call or launcher returning cudaError_t; an error becomes a c10::Error
// built like RK_CHECK's (C10_CUDA_CHECK formats through an ostringstream). Include <cuda_runtime_api.h> first.
#define RK_CUDA_CHECK(expr)                                                                                  \
  do {                                                                                                       \
    const cudaError_t rk_cuda_status_ = (expr);                                                              \
    if (C10_UNLIKELY(rk_cuda_status_ != cudaSuccess)) {                                                      \
      (void)cudaGetLastError();                                                                              \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),                     \
                                    ::rk::message("CUDA error: ", cudaGetErrorString(rk_cuda_status_),       \
                                                  " (", cudaGetErrorName(rk_cuda_status_), ") from ", #expr)); \
    }                                                                                                        \
  } while (false)
