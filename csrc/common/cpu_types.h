// Host-side storage types (c10::Half, c10::BFloat16) and their conversions to the fp32 accumulator, for the
// CPU emulations of the CUDA kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/hd.h"

namespace rk {

template <>
struct Cvt<c10::Half, float> {
  static float load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(float v) { return static_cast<c10::Half>(v); }
};

template <>
struct Cvt<c10::BFloat16, float> {
  static float load(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 store(float v) { return static_cast<c10::BFloat16>(v); }
};

}  // namespace rk
