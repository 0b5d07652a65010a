// CUDA kernels of the KernelWarehouse ops: one batched tiled GEMM kernel (kw_gemm_tile.h) instantiated for
// the six problems of kw_problems.h. The per-block work is shared with the CPU emulation in
// kernelwarehouse.cpp.
#include <type_traits>

#include "common/cuda_types.cuh"
#include "kernelwarehouse/kw_gemm_tile.h"
#include "kernelwarehouse/kw_launch.h"
#include "kernelwarehouse/kw_problems.h"

namespace rk::kw {
namespace {

template <typename Prob, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads) gemm_kernel(const Prob pr) {
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
cudaError_t run_shape(const Prob& pr, cudaStream_t stream) {
  const int64_t blocks = GemmTile<Prob, Shape>::num_blocks(pr);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gemm_kernel<Prob, Shape><<<static_cast<unsigned>(blocks), Shape::kThreads, 0, stream>>>(pr);
  return cudaGetLastError();
}

// Thin tiles for problems with at most 8 rows per batch (depthwise: one output channel per group).
template <typename Prob>
cudaError_t run(const Prob& pr, cudaStream_t stream) {
  return pr.M() <= 8 ? run_shape<Prob, ThinShape>(pr, stream) : run_shape<Prob, WideShape>(pr, stream);
}

template <template <typename, typename> class Prob, typename Fill>
cudaError_t dispatch(DType dtype, Fill fill, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: { Prob<float, float> pr{}; fill(pr); return run(pr, stream); }
    case DType::kFloat16: { Prob<__half, float> pr{}; fill(pr); return run(pr, stream); }
    case DType::kBFloat16: { Prob<__nv_bfloat16, float> pr{}; fill(pr); return run(pr, stream); }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_assemble_forward(const AsmParams& p, DType dtype, const void* attention, const void* warehouse,
                                    void* out, cudaStream_t stream) {
  return dispatch<AsmForward>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.att = static_cast<const T*>(attention);
    pr.wh = static_cast<const T*>(warehouse);
    pr.out = static_cast<T*>(out);
  }, stream);
}

cudaError_t launch_assemble_backward_attention(const AsmParams& p, DType dtype, const void* grad,
                                               const void* warehouse, void* out, cudaStream_t stream) {
  return dispatch<AsmBackwardAtt>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.grad = static_cast<const T*>(grad);
    pr.wh = static_cast<const T*>(warehouse);
    pr.out = static_cast<T*>(out);
  }, stream);
}

cudaError_t launch_assemble_backward_warehouse(const AsmParams& p, DType dtype, const void* attention,
                                               const void* grad, float* partial, cudaStream_t stream) {
  return dispatch<AsmBackwardWh>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.att = static_cast<const T*>(attention);
    pr.grad = static_cast<const T*>(grad);
    pr.partial = partial;
  }, stream);
}

cudaError_t launch_conv_forward(const ConvParams& p, DType dtype, const void* input, const void* weight,
                                const void* bias, void* output, cudaStream_t stream) {
  return dispatch<ConvForward>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.x = static_cast<const T*>(input);
    pr.w = static_cast<const T*>(weight);
    pr.bias = static_cast<const T*>(bias);
    pr.y = static_cast<T*>(output);
  }, stream);
}

cudaError_t launch_conv_backward_input(const ConvParams& p, DType dtype, const void* grad_out, const void* weight,
                                       void* grad_input, cudaStream_t stream) {
  return dispatch<ConvBackwardInput>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.gy = static_cast<const T*>(grad_out);
    pr.w = static_cast<const T*>(weight);
    pr.gx = static_cast<T*>(grad_input);
  }, stream);
}

cudaError_t launch_conv_backward_weight(const ConvParams& p, DType dtype, const void* input, const void* grad_out,
                                        void* grad_weight, cudaStream_t stream) {
  return dispatch<ConvBackwardWeight>(dtype, [&](auto& pr) {
    using T = typename std::remove_reference_t<decltype(pr)>::T;
    pr.p = p;
    pr.x = static_cast<const T*>(input);
    pr.gy = static_cast<const T*>(grad_out);
    pr.gw = static_cast<T*>(grad_weight);
  }, stream);
}

}  // namespace rk::kw
