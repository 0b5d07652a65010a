// Device-side storage types and their conversions to the fp32 accumulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/hd.h"

namespace rk {

template <>
struct Cvt<__half, float> {
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Cvt<__nv_bfloat16, float> {
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace rk
