// Host entry points of the KernelWarehouse CUDA kernels (defined in kw_kernels.cu). Pointers are device
// pointers of the storage type named by `dtype` (partial: fp32); weights / kernels / attentions / warehouses
// contiguous, inputs and outputs of the convolutions with the strides given in ConvParams.
#pragma once

#include <cuda_runtime_api.h>

#include "kernelwarehouse/kw_params.h"

namespace rk::kw {

cudaError_t launch_assemble_forward(const AsmParams& p, DType dtype, const void* attention, const void* warehouse,
                                    void* out, cudaStream_t stream);
cudaError_t launch_assemble_backward_attention(const AsmParams& p, DType dtype, const void* grad,
                                               const void* warehouse, void* out, cudaStream_t stream);
// `partial` holds cdiv(rows, rows_per_split) x n x cell fp32 values, summed by the caller.
cudaError_t launch_assemble_backward_warehouse(const AsmParams& p, DType dtype, const void* attention,
                                               const void* grad, float* partial, cudaStream_t stream);
cudaError_t launch_conv_forward(const ConvParams& p, DType dtype, const void* input, const void* weight,
                                const void* bias, void* output, cudaStream_t stream);
cudaError_t launch_conv_backward_input(const ConvParams& p, DType dtype, const void* grad_out, const void* weight,
                                       void* grad_input, cudaStream_t stream);
cudaError_t launch_conv_backward_weight(const ConvParams& p, DType dtype, const void* input, const void* grad_out,
                                        void* grad_weight, cudaStream_t stream);

}  // namespace rk::kw
