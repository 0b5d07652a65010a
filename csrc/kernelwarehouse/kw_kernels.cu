// CUDA kernels of the KernelWarehouse ops: one batched tiled GEMM kernel (common/gemm_tile.h) instantiated for
// the six problems of kw_problems.h. The per-block work is shared with the CPU emulation in
// kernelwarehouse.cpp.
#include <type_traits>

#include "common/cuda_types.cuh"
#include "common/gemm_kernel.cuh"
#include "kernelwarehouse/kw_launch.h"
#include "kernelwarehouse/kw_problems.h"

namespace rk::kw {
namespace {

template <template <typename, typename> class Prob, typename Fill>
cudaError_t dispatch(DType dtype, Fill fill, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: { Prob<float, float> pr{}; fill(pr); return gemm::run_gemm(pr, stream); }
    case DType::kFloat16: { Prob<__half, float> pr{}; fill(pr); return gemm::run_gemm(pr, stream); }
    case DType::kBFloat16: { Prob<__nv_bfloat16, float> pr{}; fill(pr); return gemm::run_gemm(pr, stream); }
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
