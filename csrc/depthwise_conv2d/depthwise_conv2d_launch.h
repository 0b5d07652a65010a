// Host entry points of the depthwise conv2d CUDA kernels (defined in depthwise_conv2d_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "depthwise_conv2d/depthwise_conv2d_params.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_smallmap.h"
#include "depthwise_conv2d/depthwise_conv2d_toeplitz.h"

namespace rk::dw {

// Forward (also the input gradient: see dgrad_classes() in depthwise_conv2d.cpp). `kernel` and `q` as
// returned by plan_forward(p, q). Pointers are device pointers of the storage type named by `dtype`;
// `bias` may be null. Returns the launch status.
cudaError_t launch_forward(const Params& p, const RtParams& q, int kernel, DType dtype, const void* input,
                           const void* weight, const void* bias, void* output, cudaStream_t stream);

// Weight gradient: RtWgradTile planned by plan_rt_wgrad() (`w`), RtWgradClTile planned by plan_cl_wgrad() (`w`,
// is_cl_wgrad), or the kDirect WgradTile planned by plan_wgrad() (`w` null). Writes the per-split tap sums into the fp32 workspace `ws`
// (C, splits, KH * KW); the caller sums over the splits.
cudaError_t launch_backward_weight(const Params& p, const RtWgradParams* w, DType dtype, const void* input,
                                   const void* grad_output, float* ws, cudaStream_t stream);

// Toeplitz GEMMs (depthwise_conv2d_toeplitz.h), planned by plan_toeplitz(): forward (trans = false:
// src = input, dst = output, bias may be null) or input gradient (trans = true: src = grad_output,
// dst = grad_input, bias null).
cudaError_t launch_toeplitz_conv(const ToeplitzParams& t, bool trans, DType dtype, const void* src, const void* weight,
                                 const void* bias, void* dst, cudaStream_t stream);

// Toeplitz weight gradient: `ws` is an fp32 workspace of (C·kf) x out_plane x in_plane elements;
// `grad_weight` (C, 1, KH, KW) contiguous, of the storage type.
cudaError_t launch_toeplitz_wgrad(const ToeplitzParams& t, DType dtype, const void* grad_output, const void* input,
                                  float* ws, void* grad_weight, cudaStream_t stream);

}  // namespace rk::dw
