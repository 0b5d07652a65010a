// Host entry points of the depthwise conv2d CUDA kernels (defined in depthwise_conv2d_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "depthwise_conv2d/depthwise_conv2d_params.h"

namespace rk::dw {

// Forward. `p` must have been planned (plan() returned true). Pointers are device pointers of the
// storage type named by `dtype`; `bias` may be null. Returns the launch status.
cudaError_t launch_forward(const Params& p, DType dtype, const void* input, const void* weight,
                           const void* bias, void* output, cudaStream_t stream);

}  // namespace rk::dw
