// The CUDA kernel of the batched tile engine (gemm_tile.h) and its launcher, shared by every op whose
// problem implements the engine's interface (the KernelWarehouse ops, the depthwise Toeplitz GEMMs).
// Device code only: include from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/gemm_tile.h"

namespace rk::gemm {

// Resident blocks per SM a problem asks ptxas to plan registers for (`Prob::kMinBlocksPerSm`, optional; 0: no
// request, ptxas's own heuristic). ptxas's heuristic may cap a kernel at 64 registers (4 blocks of 256 threads)
// and spill to get there; a problem whose kernels spilled that way asks for 3 blocks (85 registers) instead.
template <typename Prob, typename = void>
struct GemmMinBlocks : std::integral_constant<int, 0> {};
template <typename Prob>
struct GemmMinBlocks<Prob, std::void_t<decltype(Prob::kMinBlocksPerSm)>>
    : std::integral_constant<int, Prob::kMinBlocksPerSm> {};

template <typename Prob, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads, GemmMinBlocks<Prob>::value) gemm_kernel(const Prob pr) {
  using Acc = typename Prob::Acc;
  using Tile = GemmTile<Prob, Shape>;
  __shared__ Acc s_a[Shape::kSmemA];
  __shared__ Acc s_b[Shape::kSmemB];
  const TileCoord c = Tile::coord(pr, blockIdx.x);
  Acc acc[Shape::kAccPerThread];
#pragma unroll
  for (int i = 0; i < Shape::kAccPerThread; ++i) acc[i] = Acc(0);
  for (int64_t k0 = c.k_begin; k0 < c.k_end; k0 += Shape::kTileK) {
    Tile::stage(pr, c, k0, threadIdx.x, s_a, s_b);
    __syncthreads();
    Tile::compute(threadIdx.x, s_a, s_b, acc);
    __syncthreads();
  }
  Tile::store(pr, c, threadIdx.x, acc);
}

template <typename Prob, typename Shape>
cudaError_t run_gemm_shape(const Prob& pr, cudaStream_t stream) {
  const int64_t blocks = GemmTile<Prob, Shape>::num_blocks(pr);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gemm_kernel<Prob, Shape><<<static_cast<unsigned>(blocks), Shape::kThreads, 0, stream>>>(pr);
  return cudaGetLastError();
}

template <typename Prob>
cudaError_t run_gemm(const Prob& pr, cudaStream_t stream) {
  return with_shape(pr, [&](auto shape) { return run_gemm_shape<Prob, typename decltype(shape)::type>(pr, stream); });
}

}  // namespace rk::gemm
