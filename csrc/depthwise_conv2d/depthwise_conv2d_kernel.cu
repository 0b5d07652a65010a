// CUDA kernels of the depthwise conv2d op. The per-tile work lives in depthwise_conv2d_regtile.h,
// depthwise_conv2d_fwd_tile.h and depthwise_conv2d_bwd_tile.h, shared with the CPU emulation that the
// test suite runs.
#include "common/cuda_types.cuh"
#include "depthwise_conv2d/depthwise_conv2d_bwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_cl_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_fwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_launch.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_smallmap.h"
#include "common/gemm_kernel.cuh"

namespace rk::dw {
namespace {

// One forward block of a register tile (RtTile or SmTile): stage / compute over the phases and chunks of taps.
template <typename T, typename Tile>
__device__ __forceinline__ void forward_block(const RtParams& q, const T* __restrict__ input,
                                              const T* __restrict__ weight, const T* __restrict__ bias,
                                              T* __restrict__ output, float* smem) {
  const auto b = Tile::coord(q, blockIdx.x);
  const int tid = threadIdx.x;
  float acc[Tile::kRH * Tile::kRW];
#pragma unroll
  for (int k = 0; k < Tile::kRH * Tile::kRW; ++k) acc[k] = 0.f;
  for_each_tap_chunk(q, [&](int sigma, int i0, int kc, int m0, int mt) {
    Tile::stage(q, b, sigma, i0, kc, m0, mt, tid, input, weight, smem);
    __syncthreads();
    Tile::compute(q, b, kc, mt, tid, smem, acc);
    __syncthreads();
  });
  if constexpr (Tile::kChannelVectors) {
    if (Tile::stores_channel_vectors(q)) {  // the same for the whole block
      Tile::park(q, b, tid, acc, smem);
      __syncthreads();
      Tile::store_parked(q, b, tid, smem, bias, output);
      return;
    }
  }
  Tile::store(q, b, tid, acc, bias, output);
}

template <typename T, int KW>
__global__ void __launch_bounds__(RtShapeFor<KW>::type::kThreads, RtShapeFor<KW>::type::kMinBlocks)
    forward_kernel(const RtParams q, const T* __restrict__ input, const T* __restrict__ weight,
                   const T* __restrict__ bias, T* __restrict__ output) {
  extern __shared__ float4 smem4[];
  forward_block<T, RtTile<T, float, KW>>(q, input, weight, bias, output, reinterpret_cast<float*>(smem4));
}

template <typename T, int KW>
__global__ void __launch_bounds__(SmShape<KW>::kThreads, SmShape<KW>::kMinBlocks)
    forward_small_kernel(const RtParams q, const T* __restrict__ input, const T* __restrict__ weight,
                         const T* __restrict__ bias, T* __restrict__ output) {
  extern __shared__ float4 smem4[];
  forward_block<T, SmTile<T, float, KW>>(q, input, weight, bias, output, reinterpret_cast<float*>(smem4));
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

template <typename T, int KW>
cudaError_t launch_rt(const Params& p, const RtParams& q, const void* input, const void* weight, const void* bias,
                      void* output, cudaStream_t stream) {
  using Shape = typename RtShapeFor<KW>::type;
  const size_t smem = sizeof(float) * rt_smem_elems<Shape>(q);
  forward_kernel<T, KW><<<num_rt_blocks(p, q), Shape::kThreads, smem, stream>>>(
      q, static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<const T*>(bias),
      static_cast<T*>(output));
  return cudaGetLastError();
}

template <typename T, int KW>
cudaError_t launch_small(const RtParams& q, const void* input, const void* weight, const void* bias, void* output,
                         cudaStream_t stream) {
  const size_t smem = sizeof(float) * small_smem_elems<KW>(q);
  forward_small_kernel<T, KW><<<num_small_blocks(q), SmShape<KW>::kThreads, smem, stream>>>(
      q, static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<const T*>(bias),
      static_cast<T*>(output));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params& p, const RtParams& q, int kernel, const void* input, const void* weight,
                         const void* bias, void* output, cudaStream_t stream) {
  switch (kernel) {
    case -1:
      forward_direct_kernel<T, WideTile><<<num_blocks(p), WideTile::kThreads, 0, stream>>>(
          p, static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<const T*>(bias),
          static_cast<T*>(output));
      return cudaGetLastError();
    case 0: return launch_rt<T, 0>(p, q, input, weight, bias, output, stream);
    case 3: return launch_rt<T, 3>(p, q, input, weight, bias, output, stream);
    case 5: return launch_rt<T, 5>(p, q, input, weight, bias, output, stream);
    case 7: return launch_rt<T, 7>(p, q, input, weight, bias, output, stream);
    case 13: return launch_rt<T, 13>(p, q, input, weight, bias, output, stream);
    case 27: return launch_rt<T, 27>(p, q, input, weight, bias, output, stream);
    case 31: return launch_rt<T, 31>(p, q, input, weight, bias, output, stream);
    case kSmallKernel: return launch_small<T, 0>(q, input, weight, bias, output, stream);
    case kSmallKernel + 7: return launch_small<T, 7>(q, input, weight, bias, output, stream);
    case kSmallKernel + 13: return launch_small<T, 13>(q, input, weight, bias, output, stream);
    case kSmallKernel + 27: return launch_small<T, 27>(q, input, weight, bias, output, stream);
    case kSmallKernel + 31: return launch_small<T, 31>(q, input, weight, bias, output, stream);
    case kClKernel: return launch_small<T, 0>(q, input, weight, bias, output, stream);
    case kClKernel + 7: return launch_small<T, 7>(q, input, weight, bias, output, stream);
    case kClKernel + 13: return launch_small<T, 13>(q, input, weight, bias, output, stream);
    case kClKernel + 27: return launch_small<T, 27>(q, input, weight, bias, output, stream);
    case kClKernel + 31: return launch_small<T, 31>(q, input, weight, bias, output, stream);
  }
  return cudaErrorInvalidValue;
}

// kDirect weight gradient (no staging: huge strides or dilations).
template <typename T>
__global__ void __launch_bounds__(WgradShape::kThreads)
    backward_weight_kernel(const Params p, const T* __restrict__ input, const T* __restrict__ grad_output,
                           float* __restrict__ ws) {
  using Tile = WgradTile<T, float>;
  const auto b = Tile::coord(p, blockIdx.x);
  const int tid = threadIdx.x;
  const int64_t t0 = Tile::first_tile(p, b), t1 = Tile::end_tile(p, b);
  for (int64_t kh0 = 0; kh0 < p.kh; kh0 += p.kh_chunk) {
    for (int64_t kw0 = 0; kw0 < p.kw; kw0 += p.kw_chunk) {
      float acc[WgradShape::kTaps];
#pragma unroll
      for (int k = 0; k < WgradShape::kTaps; ++k) acc[k] = 0.f;
      for (int64_t tile = t0; tile < t1; ++tile) Tile::direct(p, b, tile, kh0, kw0, tid, input, grad_output, acc);
      Tile::write(p, b, kh0, kw0, tid, acc, ws);
    }
  }
}

// The register-tiled weight gradient: Tile = RtWgradTile<T, float, Shape> (a channel of a split) or
// RtWgradClTile<T, float> (channels_last: a channel vector of a split).
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::Shape::kThreads, Tile::Shape::kMinBlocks)
    backward_weight_rt_kernel(const RtWgradParams w, const T* __restrict__ input, const T* __restrict__ grad_output,
                              float* __restrict__ ws) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  using Shape = typename Tile::Shape;
  const RtParams& q = w.g;
  const auto b = Tile::coord(w, blockIdx.x);
  const int tid = threadIdx.x;
  const int t0 = Tile::first_tile(w, b), t1 = Tile::end_tile(w, b);
  for_each_tap_chunk(q, [&](int sigma, int i0, int kc, int m0, int mt) {
    float acc[Shape::kAcc];
#pragma unroll
    for (int k = 0; k < Shape::kAcc; ++k) acc[k] = 0.f;
    for (int tile = t0; tile < t1; ++tile) {
      Tile::stage(w, b, tile, sigma, i0, kc, m0, mt, tid, input, grad_output, smem);
      __syncthreads();
      Tile::compute(q, b, kc, mt, tid, smem, acc);
      __syncthreads();
    }
    Tile::spill(tid, acc, smem);
    __syncthreads();
    Tile::reduce(w, b, sigma, i0, kc, m0, mt, tid, smem, ws);
    __syncthreads();
  });
}

template <typename T, typename Tile>
void launch_rt_wgrad(const Params& p, const RtWgradParams& w, const void* input, const void* grad_output, float* ws,
                     cudaStream_t stream) {
  using Shape = typename Tile::Shape;
  const size_t smem = sizeof(float) * Shape::smem_elems(w.g.sh, w.g.dh, w.g.kc, w.g.mc);
  backward_weight_rt_kernel<T, Tile><<<num_rt_wgrad_blocks(p, w), Shape::kThreads, smem, stream>>>(
      w, static_cast<const T*>(input), static_cast<const T*>(grad_output), ws);
}

template <typename T>
cudaError_t toeplitz_conv_typed(const ToeplitzParams& t, bool trans, const void* src, const void* weight,
                                const void* bias, void* dst, cudaStream_t stream) {
  ToeplitzConv<T, float> pr{t, trans, static_cast<const T*>(src), static_cast<const T*>(weight),
                            static_cast<const T*>(bias), static_cast<T*>(dst)};
  return gemm::run_gemm(pr, stream);
}

template <typename T>
cudaError_t toeplitz_wgrad_typed(const ToeplitzParams& t, const void* grad, const void* input, float* ws,
                                 void* grad_weight, cudaStream_t stream) {
  ToeplitzCross<T, float> cross{t, static_cast<const T*>(grad), static_cast<const T*>(input), ws};
  const cudaError_t err = gemm::run_gemm(cross, stream);
  if (err != cudaSuccess) return err;
  ToeplitzDiagonal<T, float> diag{t, ws, static_cast<T*>(grad_weight)};
  return gemm::run_gemm(diag, stream);
}

template <typename T>
cudaError_t launch_backward_weight_typed(const Params& p, const RtWgradParams* w, const void* input,
                                         const void* grad_output, float* ws, cudaStream_t stream) {
  if (w != nullptr && is_cl_wgrad(*w)) {
    launch_rt_wgrad<T, RtWgradClTile<T, float>>(p, *w, input, grad_output, ws, stream);
  } else if (w != nullptr && w->small) {
    launch_rt_wgrad<T, RtWgradTile<T, float, RtWgradSmall>>(p, *w, input, grad_output, ws, stream);
  } else if (w != nullptr) {
    launch_rt_wgrad<T, RtWgradTile<T, float, RtWgradShape>>(p, *w, input, grad_output, ws, stream);
  } else {
    backward_weight_kernel<T><<<num_wgrad_blocks(p), WgradShape::kThreads, 0, stream>>>(
        p, static_cast<const T*>(input), static_cast<const T*>(grad_output), ws);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_backward_weight(const Params& p, const RtWgradParams* w, DType dtype, const void* input,
                                   const void* grad_output, float* ws, cudaStream_t stream) {
  if ((w != nullptr ? num_rt_wgrad_blocks(p, *w) : num_wgrad_blocks(p)) == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_backward_weight_typed<float>(p, w, input, grad_output, ws, stream);
    case DType::kFloat16: return launch_backward_weight_typed<__half>(p, w, input, grad_output, ws, stream);
    case DType::kBFloat16:
      return launch_backward_weight_typed<__nv_bfloat16>(p, w, input, grad_output, ws, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_toeplitz_conv(const ToeplitzParams& t, bool trans, DType dtype, const void* src, const void* weight,
                                 const void* bias, void* dst, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return toeplitz_conv_typed<float>(t, trans, src, weight, bias, dst, stream);
    case DType::kFloat16: return toeplitz_conv_typed<__half>(t, trans, src, weight, bias, dst, stream);
    case DType::kBFloat16: return toeplitz_conv_typed<__nv_bfloat16>(t, trans, src, weight, bias, dst, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_toeplitz_wgrad(const ToeplitzParams& t, DType dtype, const void* grad_output, const void* input,
                                  float* ws, void* grad_weight, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return toeplitz_wgrad_typed<float>(t, grad_output, input, ws, grad_weight, stream);
    case DType::kFloat16: return toeplitz_wgrad_typed<__half>(t, grad_output, input, ws, grad_weight, stream);
    case DType::kBFloat16:
      return toeplitz_wgrad_typed<__nv_bfloat16>(t, grad_output, input, ws, grad_weight, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_forward(const Params& p, const RtParams& q, int kernel, DType dtype, const void* input,
                           const void* weight, const void* bias, void* output, cudaStream_t stream) {
  if (num_forward_blocks(p, q, kernel) == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, q, kernel, input, weight, bias, output, stream);
    case DType::kFloat16: return launch_typed<__half>(p, q, kernel, input, weight, bias, output, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, q, kernel, input, weight, bias, output, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rk::dw
