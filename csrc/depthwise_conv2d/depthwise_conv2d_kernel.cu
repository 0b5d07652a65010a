// CUDA kernels of the depthwise conv2d op. The per-tile work lives in depthwise_conv2d_fwd_tile.h,
// shared with the CPU emulation that the test suite runs.
#include "common/cuda_types.cuh"
#include "depthwise_conv2d/depthwise_conv2d_fwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_launch.h"

namespace rk::dw {
namespace {

template <typename T, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads)
    forward_kernel(const Params p, const T* __restrict__ input, const T* __restrict__ weight,
                   const T* __restrict__ bias, T* __restrict__ output) {
  extern __shared__ float smem[];
  using Tile = FwdTile<T, float, Shape>;
  const BlockCoord b = Tile::coord(p, blockIdx.x);
  const int tid = threadIdx.x;
  float acc[Shape::kRows];
#pragma unroll
  for (int r = 0; r < Shape::kRows; ++r) acc[r] = 0.f;
  for (int64_t kh0 = 0; kh0 < p.kh; kh0 += p.kh_chunk) {
    for (int64_t kw0 = 0; kw0 < p.kw; kw0 += p.kw_chunk) {
      Tile::stage(p, b, kh0, kw0, tid, input, weight, smem);
      __syncthreads();
      Tile::compute(p, kh0, kw0, tid, smem, acc);
      __syncthreads();
    }
  }
  Tile::store(p, b, tid, acc, bias, output);
}

template <typename T, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads)
    forward_direct_kernel(const Params p, const T* __restrict__ input, const T* __restrict__ weight,
                          const T* __restrict__ bias, T* __restrict__ output) {
  using Tile = FwdTile<T, float, Shape>;
  const BlockCoord b = Tile::coord(p, blockIdx.x);
  float acc[Shape::kRows];
#pragma unroll
  for (int r = 0; r < Shape::kRows; ++r) acc[r] = 0.f;
  Tile::direct(p, b, threadIdx.x, input, weight, acc);
  Tile::store(p, b, threadIdx.x, acc, bias, output);
}

template <typename T, typename Shape>
cudaError_t launch(const Params& p, const void* input, const void* weight, const void* bias, void* output,
                   cudaStream_t stream) {
  const size_t smem = sizeof(float) * Shape::smem_elems(p, p.kh_chunk, p.kw_chunk);
  forward_kernel<T, Shape><<<num_blocks(p), Shape::kThreads, smem, stream>>>(
      p, static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<const T*>(bias),
      static_cast<T*>(output));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params& p, const void* input, const void* weight, const void* bias, void* output,
                         cudaStream_t stream) {
  switch (p.config) {
    case TileConfig::kNarrow: return launch<T, NarrowTile>(p, input, weight, bias, output, stream);
    case TileConfig::kWide: return launch<T, WideTile>(p, input, weight, bias, output, stream);
    case TileConfig::kDirect:
      forward_direct_kernel<T, WideTile><<<num_blocks(p), WideTile::kThreads, 0, stream>>>(
          p, static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<const T*>(bias),
          static_cast<T*>(output));
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_forward(const Params& p, DType dtype, const void* input, const void* weight, const void* bias,
                           void* output, cudaStream_t stream) {
  if (num_blocks(p) == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, input, weight, bias, output, stream);
    case DType::kFloat16: return launch_typed<__half>(p, input, weight, bias, output, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, input, weight, bias, output, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rk::dw
