// KernelWarehouse ops — schemas, argument checks, CUDA implementations and their CPU emulation:
//
//   repkernels::kw_assemble(attention, warehouse, layout)
//   repkernels::kw_assemble_backward_attention(grad, warehouse, layout)
//   repkernels::kw_assemble_backward_warehouse(grad, attention, warehouse, layout)
//   repkernels::per_sample_conv2d(input, weight, bias, stride, padding, dilation, groups)
//   repkernels::per_sample_conv2d_backward_input(grad, input, weight, stride, padding, dilation, groups)
//   repkernels::per_sample_conv2d_backward_weight(grad, input, weight, stride, padding, dilation, groups)
//
// The CPU implementations run the CUDA kernels' tile code (common/gemm_tile.h + kw_problems.h) block by block,
// thread by thread, phase by phase, with shared memory poisoned before each stage, so the test suite checks
// the GPU algorithm on machines without a GPU. They are test vehicles, not fast CPU kernels
// (repkernels.ops sends CPU tensors to the reference).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cpu_types.h"
#include "common/gemm_emulation.h"
#include "common/gemm_tile.h"
#include "kernelwarehouse/kw_launch.h"
#include "kernelwarehouse/kw_problems.h"

namespace rk::kw {
namespace {

// Splits of the warehouse-gradient reduction that the emulation uses (as if on a GPU with this many SMs), so
// that the tests exercise the split reduction.
constexpr int64_t kEmulatedSMs = 4;

template <typename scalar_t>
using AccOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: RK_CHECK(false, op, " (cuda): dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// One op on `t`'s device: CUDA tensors run `launch(dtype, stream)` under a device guard; CPU tensors run
// `emulate_as(T{})`, T the storage type (float64 included: the emulation's reference precision).
template <typename Launch, typename Emulate>
void run_on_device(const at::Tensor& t, const char* op, Launch launch, Emulate emulate_as) {
  if (t.is_cuda()) {
    c10::cuda::CUDAGuard guard(t.device());
    RK_CUDA_CHECK(launch(dtype_of(t, op), c10::cuda::getCurrentCUDAStream()));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kernelwarehouse_cpu",
                                  [&] { emulate_as(scalar_t{}); });
}

void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name, const char* op) {
  RK_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` dtype ", t.scalar_type(), " does not match `",
           ref_name, "` dtype ", ref.scalar_type());
  RK_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name, "` is on ",
           ref.device());
}

// ---------------------------------------------------------------------------------------------- kw_assemble
AsmParams make_asm_params(const at::Tensor& warehouse, c10::IntArrayRef layout, int64_t batch, const char* op) {
  RK_CHECK(warehouse.dim() >= 3, op, ": `warehouse` must be (n, co, ci, *cell_kernel), got shape ",
           warehouse.sizes());
  RK_CHECK(layout.size() >= 2, op, ": `layout` must be (Cout, Cin/groups, *kernel), got ", layout);
  for (auto v : layout) RK_CHECK(v >= 1, op, ": `layout` must hold positive sizes, got ", layout);
  AsmParams p{};
  p.batch = batch;
  p.n = warehouse.size(0);
  p.co = warehouse.size(1);
  p.ci = warehouse.size(2);
  p.ce = 1;
  bool ones = true;
  for (int64_t d = 3; d < warehouse.dim(); ++d) {
    p.ce *= warehouse.size(d);
    ones = ones && warehouse.size(d) == 1;
  }
  p.ks = 1;
  for (size_t d = 2; d < layout.size(); ++d) p.ks *= layout[d];
  const bool whole = warehouse.dim() - 3 == static_cast<int64_t>(layout.size()) - 2 &&
                     warehouse.sizes().slice(3).equals(layout.slice(2));
  RK_CHECK(ones || whole, op, ": `warehouse` cells must span one tap (cell kernel all ones) or the whole kernel ",
           layout.slice(2), ", got cell kernel ", warehouse.sizes().slice(3));
  RK_CHECK(p.co >= 1 && p.ci >= 1 && layout[0] % p.co == 0 && layout[1] % p.ci == 0, op, ": `warehouse` cells (",
           p.co, " x ", p.ci, ") must divide the kernel's channels (`layout` ", layout, ")");
  p.cin_g = layout[1];
  p.gi = layout[1] / p.ci;
  p.ns = p.ks / p.ce;
  p.m = (layout[0] / p.co) * p.gi * p.ns;
  p.w_sample = layout[0] * layout[1] * p.ks;
  p.rows_per_split = std::max<int64_t>(p.rows(), 1);
  return p;
}

void check_attention(const at::Tensor& attention, const AsmParams& p, const char* op) {
  RK_CHECK(attention.dim() == 3 && attention.size(1) == p.m && attention.size(2) == p.n, op,
           ": `attention` must have shape (B, ", p.m, ", ", p.n, ") for this warehouse and layout, got ",
           attention.sizes());
}

std::vector<int64_t> kernel_shape(int64_t batch, c10::IntArrayRef layout) {
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), layout.begin(), layout.end());
  return shape;
}

at::Tensor kw_assemble_impl(const at::Tensor& attention, const at::Tensor& warehouse, c10::IntArrayRef layout) {
  const char* op = "kw_assemble";
  check_same(warehouse, "warehouse", attention, "attention", op);
  RK_CHECK(attention.dim() == 3, op, ": `attention` must be 3-D (B, m, n), got shape ", attention.sizes());
  AsmParams p = make_asm_params(warehouse, layout, attention.size(0), op);
  check_attention(attention, p, op);
  at::Tensor att = attention.contiguous(), wh = warehouse.contiguous();
  at::Tensor out = at::empty(kernel_shape(p.batch, layout), warehouse.options());
  if (out.numel() == 0) return out;
  run_on_device(attention, op, [&](DType dt, cudaStream_t stream) {
    return launch_assemble_forward(p, dt, att.const_data_ptr(), wh.const_data_ptr(), out.mutable_data_ptr(), stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(AsmForward<T, AccOf<T>>{p, att.const_data_ptr<T>(), wh.const_data_ptr<T>(), out.mutable_data_ptr<T>()});
  });
  return out;
}

at::Tensor kw_assemble_backward_attention_impl(const at::Tensor& grad, const at::Tensor& warehouse,
                                               c10::IntArrayRef layout) {
  const char* op = "kw_assemble_backward_attention";
  check_same(warehouse, "warehouse", grad, "grad", op);
  AsmParams p = make_asm_params(warehouse, layout, grad.dim() > 0 ? grad.size(0) : 0, op);
  RK_CHECK(grad.sizes().equals(kernel_shape(p.batch, layout)), op, ": `grad` must have shape (B, ", layout,
           "), got ", grad.sizes());
  at::Tensor g = grad.contiguous(), wh = warehouse.contiguous();
  at::Tensor out = at::empty({p.batch, p.m, p.n}, warehouse.options());
  if (out.numel() == 0) return out;
  run_on_device(grad, op, [&](DType dt, cudaStream_t stream) {
    return launch_assemble_backward_attention(p, dt, g.const_data_ptr(), wh.const_data_ptr(), out.mutable_data_ptr(),
                                              stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(AsmBackwardAtt<T, AccOf<T>>{p, g.const_data_ptr<T>(), wh.const_data_ptr<T>(), out.mutable_data_ptr<T>()});
  });
  return out;
}

at::Tensor kw_assemble_backward_warehouse_impl(const at::Tensor& grad, const at::Tensor& attention,
                                               const at::Tensor& warehouse, c10::IntArrayRef layout) {
  const char* op = "kw_assemble_backward_warehouse";
  check_same(warehouse, "warehouse", grad, "grad", op);
  check_same(warehouse, "warehouse", attention, "attention", op);
  RK_CHECK(attention.dim() == 3, op, ": `attention` must be 3-D (B, m, n), got shape ", attention.sizes());
  AsmParams p = make_asm_params(warehouse, layout, attention.size(0), op);
  check_attention(attention, p, op);
  RK_CHECK(grad.sizes().equals(kernel_shape(p.batch, layout)), op, ": `grad` must have shape (B, ", layout,
           "), got ", grad.sizes());
  at::Tensor g = grad.contiguous(), att = attention.contiguous();
  if (warehouse.numel() == 0 || p.rows() == 0) return at::zeros_like(warehouse, at::MemoryFormat::Contiguous);
  // Split the long reduction over rows so that about two waves of blocks fill the device.
  const int64_t tiles = cdiv(p.n, gemm::WideShape::kTileM) * cdiv(p.cell(), gemm::WideShape::kTileN);
  int64_t sms = kEmulatedSMs;
  if (attention.is_cuda()) {
    int value = 0;
    RK_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, attention.get_device()));
    sms = value;
  }
  const int64_t splits = std::clamp<int64_t>(cdiv(2 * sms, tiles), 1, 64);
  p.rows_per_split = cdiv(cdiv(p.rows(), splits), gemm::WideShape::kTileK) * gemm::WideShape::kTileK;
  const int64_t used = cdiv(p.rows(), p.rows_per_split);
  const bool is_double = attention.scalar_type() == at::kDouble;
  at::Tensor partial = at::empty({used, p.n, p.cell()}, attention.options().dtype(is_double ? at::kDouble : at::kFloat));
  run_on_device(attention, op, [&](DType dt, cudaStream_t stream) {
    return launch_assemble_backward_warehouse(p, dt, att.const_data_ptr(), g.const_data_ptr(),
                                              partial.mutable_data_ptr<float>(), stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(AsmBackwardWh<T, AccOf<T>>{p, att.const_data_ptr<T>(), g.const_data_ptr<T>(),
                                       partial.mutable_data_ptr<AccOf<T>>()});
  });
  return at::sum(partial, {0}).to(warehouse.scalar_type()).view(warehouse.sizes());
}

// ---------------------------------------------------------------------------------------------- per-sample conv
void check_pair(c10::IntArrayRef v, const char* name, int64_t min_value, const char* op) {
  RK_CHECK(v.size() == 2, op, ": `", name, "` must have 2 elements, got ", v.size());
  RK_CHECK(v[0] >= min_value && v[1] >= min_value, op, ": `", name, "` must be >= ", min_value, ", got ", v);
}

ConvParams make_conv_params(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const char* op) {
  RK_CHECK(input.dim() == 4, op, ": `input` must be 4-D (B, C, H, W), got shape ", input.sizes());
  RK_CHECK(weight.dim() == 5, op, ": `weight` must be 5-D (B, Cout, C/groups, kh, kw), got shape ",
           weight.sizes());
  check_same(input, "input", weight, "weight", op);
  RK_CHECK(weight.size(0) == input.size(0), op, ": `weight` batch ", weight.size(0), " != `input` batch ",
           input.size(0));
  RK_CHECK(groups >= 1 && input.size(1) % groups == 0 && weight.size(1) % groups == 0, op, ": `groups` (", groups,
           ") must divide the input (", input.size(1), ") and output (", weight.size(1), ") channels");
  RK_CHECK(weight.size(2) * groups == input.size(1), op, ": `weight` must have shape (B, Cout, C/groups, kh, kw) "
           "with C/groups = ", input.size(1) / groups, ", got ", weight.sizes());
  RK_CHECK(weight.size(3) >= 1 && weight.size(4) >= 1, op, ": `weight` kernel size must be >= 1");
  check_pair(stride, "stride", 1, op);
  check_pair(padding, "padding", 0, op);
  check_pair(dilation, "dilation", 1, op);
  ConvParams p{};
  p.batch = input.size(0);
  p.c = input.size(1);
  p.h = input.size(2);
  p.w = input.size(3);
  p.cout = weight.size(1);
  p.groups = groups;
  p.cig = p.c / groups;
  p.cog = p.cout / groups;
  p.kh = weight.size(3);
  p.kw = weight.size(4);
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  RK_CHECK(p.h + 2 * p.ph >= p.dh * (p.kh - 1) + 1 && p.w + 2 * p.pw >= p.dw * (p.kw - 1) + 1, op,
           ": padded `input` (", p.h + 2 * p.ph, " x ", p.w + 2 * p.pw, ") is smaller than the dilated kernel (",
           p.dh * (p.kh - 1) + 1, " x ", p.dw * (p.kw - 1) + 1, ")");
  p.oh = (p.h + 2 * p.ph - p.dh * (p.kh - 1) - 1) / p.sh + 1;
  p.ow = (p.w + 2 * p.pw - p.dw * (p.kw - 1) - 1) / p.sw + 1;
  for (int i = 0; i < 4; ++i) p.x_stride[i] = input.stride(i);
  return p;
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

void check_grad(const at::Tensor& grad, const at::Tensor& input, const ConvParams& p, const char* op) {
  check_same(input, "input", grad, "grad", op);
  RK_CHECK(grad.dim() == 4 && grad.size(0) == p.batch && grad.size(1) == p.cout && grad.size(2) == p.oh &&
               grad.size(3) == p.ow,
           op, ": `grad` must have shape (", p.batch, ", ", p.cout, ", ", p.oh, ", ", p.ow, "), got ", grad.sizes());
}

at::Tensor per_sample_conv2d_impl(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "per_sample_conv2d";
  ConvParams p = make_conv_params(input, weight, stride, padding, dilation, groups, op);
  if (bias.has_value()) {
    check_same(input, "input", *bias, "bias", op);
    RK_CHECK(bias->dim() == 1 && bias->size(0) == p.cout, op, ": `bias` must have shape (", p.cout, ",), got ",
             bias->sizes());
  }
  at::Tensor out = at::empty({p.batch, p.cout, p.oh, p.ow}, input.options().memory_format(format_of(input)));
  for (int i = 0; i < 4; ++i) p.y_stride[i] = out.stride(i);
  if (out.numel() == 0) return out;
  at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  run_on_device(input, op, [&](DType dt, cudaStream_t stream) {
    return launch_conv_forward(p, dt, input.const_data_ptr(), w.const_data_ptr(),
                               b.has_value() ? b->const_data_ptr() : nullptr, out.mutable_data_ptr(), stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(ConvForward<T, AccOf<T>>{p, input.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                     b.has_value() ? b->const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>()});
  });
  return out;
}

at::Tensor per_sample_conv2d_backward_input_impl(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& weight, c10::IntArrayRef stride,
                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "per_sample_conv2d_backward_input";
  ConvParams p = make_conv_params(input, weight, stride, padding, dilation, groups, op);
  check_grad(grad, input, p, op);
  at::Tensor gx = at::empty(input.sizes(), input.options().memory_format(format_of(input)));
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = gx.stride(i);
    p.y_stride[i] = grad.stride(i);
  }
  if (gx.numel() == 0) return gx;
  at::Tensor w = weight.contiguous();
  run_on_device(input, op, [&](DType dt, cudaStream_t stream) {
    return launch_conv_backward_input(p, dt, grad.const_data_ptr(), w.const_data_ptr(), gx.mutable_data_ptr(), stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(ConvBackwardInput<T, AccOf<T>>{p, grad.const_data_ptr<T>(), w.const_data_ptr<T>(), gx.mutable_data_ptr<T>()});
  });
  return gx;
}

at::Tensor per_sample_conv2d_backward_weight_impl(const at::Tensor& grad, const at::Tensor& input,
                                                  const at::Tensor& weight, c10::IntArrayRef stride,
                                                  c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                                  int64_t groups) {
  const char* op = "per_sample_conv2d_backward_weight";
  ConvParams p = make_conv_params(input, weight, stride, padding, dilation, groups, op);
  check_grad(grad, input, p, op);
  for (int i = 0; i < 4; ++i) p.y_stride[i] = grad.stride(i);
  at::Tensor gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0) return gw;
  if (grad.numel() == 0) return gw.zero_();
  run_on_device(input, op, [&](DType dt, cudaStream_t stream) {
    return launch_conv_backward_weight(p, dt, input.const_data_ptr(), grad.const_data_ptr(), gw.mutable_data_ptr(),
                                       stream);
  }, [&](auto tag) {
    using T = decltype(tag);
    gemm::emulate_gemm(ConvBackwardWeight<T, AccOf<T>>{p, input.const_data_ptr<T>(), grad.const_data_ptr<T>(),
                                            gw.mutable_data_ptr<T>()});
  });
  return gw;
}

}  // namespace
}  // namespace rk::kw

TORCH_LIBRARY_FRAGMENT(repkernels, m) {
  m.def("kw_assemble(Tensor attention, Tensor warehouse, int[] layout) -> Tensor");
  m.def("kw_assemble_backward_attention(Tensor grad, Tensor warehouse, int[] layout) -> Tensor");
  m.def("kw_assemble_backward_warehouse(Tensor grad, Tensor attention, Tensor warehouse, int[] layout) -> Tensor");
  m.def("per_sample_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("per_sample_conv2d_backward_input(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("per_sample_conv2d_backward_weight(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
}

// One implementation per op serves both devices: CUDA tensors launch the kernels, CPU tensors run the emulation.
TORCH_LIBRARY_IMPL(repkernels, CPU, m) {
  m.impl("kw_assemble", &rk::kw::kw_assemble_impl);
  m.impl("kw_assemble_backward_attention", &rk::kw::kw_assemble_backward_attention_impl);
  m.impl("kw_assemble_backward_warehouse", &rk::kw::kw_assemble_backward_warehouse_impl);
  m.impl("per_sample_conv2d", &rk::kw::per_sample_conv2d_impl);
  m.impl("per_sample_conv2d_backward_input", &rk::kw::per_sample_conv2d_backward_input_impl);
  m.impl("per_sample_conv2d_backward_weight", &rk::kw::per_sample_conv2d_backward_weight_impl);
}

TORCH_LIBRARY_IMPL(repkernels, CUDA, m) {
  m.impl("kw_assemble", &rk::kw::kw_assemble_impl);
  m.impl("kw_assemble_backward_attention", &rk::kw::kw_assemble_backward_attention_impl);
  m.impl("kw_assemble_backward_warehouse", &rk::kw::kw_assemble_backward_warehouse_impl);
  m.impl("per_sample_conv2d", &rk::kw::per_sample_conv2d_impl);
  m.impl("per_sample_conv2d_backward_input", &rk::kw::per_sample_conv2d_backward_input_impl);
  m.impl("per_sample_conv2d_backward_weight", &rk::kw::per_sample_conv2d_backward_weight_impl);
}
