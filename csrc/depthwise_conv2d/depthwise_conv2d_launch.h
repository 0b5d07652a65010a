// Host entry points of the depthwise conv2d CUDA kernels (defined in depthwise_conv2d_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "depthwise_conv2d/depthwise_conv2d_params.h"

namespace rk::dw {

// Forward. `p` must have been planned (plan() returned true). Pointers are device pointers of the
// storage type named by `dtype`; `bias` may be null. Returns the launch status.
cudaError_t launch_forward(const Params& p, DType dtype, const void* input, const void* weight,
                           const void* bias, void* output, cudaStream_t stream);

// Input gradient for strides > 1 (DgradTile), planned by plan_dgrad(); `p` describes the forward
// problem with in_stride = grad_input strides, out_stride = grad_output strides. (Stride 1 runs
// launch_forward on grad_output with the flipped filter.)
cudaError_t launch_backward_input(const Params& p, DType dtype, const void* grad_output, const void* weight,
                                  void* grad_input, cudaStream_t stream);

// Weight gradient (WgradTile), planned by plan_wgrad(): writes the per-split tap sums into the fp32
// workspace `ws` (C, splits, KH * KW); the caller sums over the splits.
cudaError_t launch_backward_weight(const Params& p, DType dtype, const void* input, const void* grad_output,
                                   float* ws, cudaStream_t stream);

}  // namespace rk::dw
