// Helpers shared by CUDA kernels and their CPU emulation.
//
// Kernel bodies are written once as __host__ __device__ code (see e.g.
// depthwise_conv2d/depthwise_conv2d_fwd_tile.h) and compiled twice: by nvcc into the CUDA kernel, and
// by the host compiler into a CPU emulation that runs the same tiles, loads and index arithmetic
// block by block, thread by thread, phase by phase. The emulation is what the CPU test suite
// checks against the reference, so the GPU code path is exercised on machines without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rk {

// Conversion between a storage type and its accumulation type. Each translation unit specializes
// it for the types it knows (c10::Half on the host, __half on the device, ...).
template <typename T, typename Acc>
struct Cvt;

template <>
struct Cvt<float, float> {
  RK_HD static float load(float v) { return v; }
  RK_HD static float store(float v) { return v; }
};

template <>
struct Cvt<double, double> {
  RK_HD static double load(double v) { return v; }
  RK_HD static double store(double v) { return v; }
};

RK_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
RK_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
RK_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace rk
