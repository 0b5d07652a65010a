// repkernels::depthwise_conv2d, depthwise_conv2d_backward_input, depthwise_conv2d_backward_weight —
// schemas, argument checks, CUDA implementations and their CPU emulation.
//
// The CPU implementations run the CUDA kernels' tile code (depthwise_conv2d_fwd_tile.h,
// depthwise_conv2d_bwd_tile.h) block by block and thread by thread, so the test suite checks the GPU algorithm on machines without a GPU.
// It is a test vehicle, not a fast CPU kernel: repkernels.ops sends CPU tensors to the reference.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/check.h"
#include "common/cpu_types.h"
#include "common/gemm_emulation.h"
#include "depthwise_conv2d/depthwise_conv2d_bwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_cl_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_fwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_launch.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_smallmap.h"

namespace rk {
namespace dw {
namespace {

void check_pair(c10::IntArrayRef v, const char* name, int64_t min_value) {
  RK_CHECK(v.size() == 2, "depthwise_conv2d: `", name, "` must have 2 elements, got ", v.size());
  RK_CHECK(v[0] >= min_value && v[1] >= min_value, "depthwise_conv2d: `", name, "` must be >= ", min_value,
           ", got ", v);
}

// Validates the arguments and returns the problem description (plan not yet made).
Params make_params(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  RK_CHECK(input.dim() == 4, "depthwise_conv2d: `input` must be 4-D (N, C, H, W), got shape ", input.sizes());
  RK_CHECK(weight.dim() == 4 && weight.size(0) == input.size(1) && weight.size(1) == 1,
           "depthwise_conv2d: `weight` must have shape (C, 1, kh, kw) with C = input channels (",
           input.size(1), "), got ", weight.sizes());
  RK_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, "depthwise_conv2d: `weight` kernel size must be >= 1");
  RK_CHECK(weight.scalar_type() == input.scalar_type(), "depthwise_conv2d: `weight` dtype ",
           weight.scalar_type(), " does not match `input` dtype ", input.scalar_type());
  RK_CHECK(weight.device() == input.device(), "depthwise_conv2d: `weight` is on ", weight.device(),
           " but `input` is on ", input.device());
  if (bias.has_value()) {
    RK_CHECK(bias->dim() == 1 && bias->size(0) == input.size(1), "depthwise_conv2d: `bias` must have shape (",
             input.size(1), ",), got ", bias->sizes());
    RK_CHECK(bias->scalar_type() == input.scalar_type(), "depthwise_conv2d: `bias` dtype ", bias->scalar_type(),
             " does not match `input` dtype ", input.scalar_type());
    RK_CHECK(bias->device() == input.device(), "depthwise_conv2d: `bias` is on ", bias->device(),
             " but `input` is on ", input.device());
  }
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  Params p{};
  p.n = input.size(0);
  p.c = input.size(1);
  p.h = input.size(2);
  p.w = input.size(3);
  p.kh = weight.size(2);
  p.kw = weight.size(3);
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  p.oh = (p.h + 2 * p.ph - p.dh * (p.kh - 1) - 1) / p.sh + 1;
  p.ow = (p.w + 2 * p.pw - p.dw * (p.kw - 1) - 1) / p.sw + 1;
  RK_CHECK(p.h + 2 * p.ph >= p.dh * (p.kh - 1) + 1 && p.w + 2 * p.pw >= p.dw * (p.kw - 1) + 1,
           "depthwise_conv2d: padded `input` (", p.h + 2 * p.ph, " x ", p.w + 2 * p.pw,
           ") is smaller than the dilated kernel (", p.dh * (p.kh - 1) + 1, " x ", p.dw * (p.kw - 1) + 1, ")");
  for (int i = 0; i < 4; ++i) p.in_stride[i] = input.stride(i);
  p.elem_bytes = input.element_size();
  return p;
}

at::Tensor make_output(const at::Tensor& input, Params& p) {
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  at::Tensor out = at::empty({p.n, p.c, p.oh, p.ow}, input.options().memory_format(
                                                          channels_last ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous));
  for (int i = 0; i < 4; ++i) p.out_stride[i] = out.stride(i);
  return out;
}

// ---------------------------------------------------------------- Toeplitz GEMMs

// REPKERNELS_DW_TOEPLITZ=0 turns the Toeplitz path off (the tests use it to reach the direct tiles).
bool toeplitz_enabled() {
  const char* v = std::getenv("REPKERNELS_DW_TOEPLITZ");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Plans the Toeplitz formulation of problem `p`; `x` is input-shaped, `y` output-shaped.
bool make_toeplitz(const Params& p, const at::Tensor& x, const at::Tensor& y, ToeplitzParams& t) {
  if (!toeplitz_enabled()) return false;
  const int64_t s[2] = {p.sh, p.sw}, pad[2] = {p.ph, p.pw}, d[2] = {p.dh, p.dw};
  if (!plan_toeplitz(p.n, p.c, p.h, p.w, p.kh, p.kw, s, pad, d, t)) return false;
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  toeplitz_strides(t, xs, t.x_s);
  toeplitz_strides(t, ys, t.y_s);
  return true;
}

template <typename T, typename Acc>
void emulate_toeplitz_conv(const ToeplitzParams& t, bool trans, const T* src, const T* weight, const T* bias, T* dst) {
  gemm::emulate_gemm(ToeplitzConv<T, Acc>{t, trans, src, weight, bias, dst});
}

template <typename T, typename Acc>
void emulate_toeplitz_wgrad(const ToeplitzParams& t, const T* grad, const T* input, Acc* ws, T* grad_weight) {
  gemm::emulate_gemm(ToeplitzCross<T, Acc>{t, grad, input, ws});
  gemm::emulate_gemm(ToeplitzDiagonal<T, Acc>{t, ws, grad_weight});
}

// REPKERNELS_DW_TILE (the tests use it to reach each forward kernel): "generic" (the generic register tile),
// "direct" (kDirect), a tap count ("7": the compile-time register tile for 7 taps), "small" (a small-map tile:
// compile-time if one fits, else generic), "small:generic" or "small:<taps>" (that small-map tile), "cl",
// "cl:generic", "cl:<taps>" (the channel-group tiles of channels_last inputs, alike) — an error when the problem
// cannot run that kernel. Unset: the planner's choice.
constexpr int kAnyKernel = -2;
constexpr int kAnySmallKernel = -3;
constexpr int kBadKernel = -4;
constexpr int kAnyClKernel = -5;

int requested_kernel() {
  const char* v = std::getenv("REPKERNELS_DW_TILE");
  if (v == nullptr || *v == 0) return kAnyKernel;
  if (std::strcmp(v, "generic") == 0) return 0;
  if (std::strcmp(v, "direct") == 0) return -1;
  if (std::strcmp(v, "small") == 0) return kAnySmallKernel;
  if (std::strcmp(v, "small:generic") == 0) return kSmallKernel;
  if (std::strncmp(v, "small:", 6) == 0) {
    const int k = std::atoi(v + 6);
    return k > 0 ? kSmallKernel + k : kBadKernel;
  }
  if (std::strcmp(v, "cl") == 0) return kAnyClKernel;
  if (std::strcmp(v, "cl:generic") == 0) return kClKernel;
  if (std::strncmp(v, "cl:", 3) == 0) {
    const int k = std::atoi(v + 3);
    return k > 0 ? kClKernel + k : kBadKernel;
  }
  const int k = std::atoi(v);
  return k > 0 ? k : kBadKernel;
}

// REPKERNELS_DW_SM_STAGE (the tests use it to reach each staging of the small-map tiles): "planes" (every tap chunk
// of every block stages its planes in one pass, SmTile::stage_planes: an error when the problem does not allow it),
// "plane" (plane by plane). Unset: in one pass wherever it applies.
enum class SmStage { kAuto, kPlanes, kPlane, kBad };

SmStage requested_sm_stage() {
  const char* v = std::getenv("REPKERNELS_DW_SM_STAGE");
  if (v == nullptr || *v == 0) return SmStage::kAuto;
  if (std::strcmp(v, "planes") == 0) return SmStage::kPlanes;
  if (std::strcmp(v, "plane") == 0) return SmStage::kPlane;
  return SmStage::kBad;
}

// Whether every tap chunk's window of small-map `kernel` holds the whole plane.
bool sm_windows_hold_planes(const RtParams& q, int kernel) {
  switch (kernel) {
    case kSmallKernel: return small_windows_hold_planes<0>(q);
    case kSmallKernel + 7: return small_windows_hold_planes<7>(q);
    case kSmallKernel + 13: return small_windows_hold_planes<13>(q);
    case kSmallKernel + 27: return small_windows_hold_planes<27>(q);
    case kSmallKernel + 31: return small_windows_hold_planes<31>(q);
  }
  return false;
}

// How the small-map `kernel` stages its planes (q.sm_runs), honouring REPKERNELS_DW_SM_STAGE.
void plan_sm_stage(const Params& p, RtParams& q, int kernel) {
  const int V = vec_elems(p);
  const SmStage want = requested_sm_stage();
  RK_CHECK(want != SmStage::kBad, "depthwise_conv2d: REPKERNELS_DW_SM_STAGE=", std::getenv("REPKERNELS_DW_SM_STAGE"),
           " names no staging of the small-map tiles (planes, plane)");
  const bool small = kernel >= kSmallKernel && kernel < kClKernel;  // whole planes (not channel-group tiles)
  q.sm_runs = small && want != SmStage::kPlane ? plan_stage_planes(q, V) : kSmRunsNone;
  if (want != SmStage::kPlanes) return;
  RK_CHECK(small, "depthwise_conv2d: REPKERNELS_DW_SM_STAGE=planes asks for a small-map tile but the problem (", p.oh,
           "x", p.ow, " outputs, ", p.kh, "x", p.kw, " taps) plans kernel ", kernel);
  RK_CHECK(q.sm_runs != kSmRunsNone, "depthwise_conv2d: REPKERNELS_DW_SM_STAGE=planes asks for one-pass staging but ",
           "the input planes (", q.h, "x", q.w, ", strides ", q.in_n, ", ", q.in_c, ", ", q.in_h, ", ", q.in_w,
           ", columns every ", q.L, ", ", q.R, " W phases) are not NCHW planes back to back, read whole, with rows of ",
           "at least ", V - 1, " elements");
  RK_CHECK(sm_windows_hold_planes(q, kernel), "depthwise_conv2d: REPKERNELS_DW_SM_STAGE=planes asks for one-pass ",
           "staging but a tap chunk's window does not hold the whole ", q.h, "x", q.w, " plane (", q.kc, " of ", q.kh,
           " tap rows per chunk, padding ", q.ph, ", ", q.pw, ")");
}

// plan_forward() honouring REPKERNELS_DW_TILE and REPKERNELS_DW_SM_STAGE; returns the kernel (see plan_forward).
int plan_forward_checked(Params& p, RtParams& q) {
  const int want = requested_kernel();
  RK_CHECK(want != kBadKernel, "depthwise_conv2d: REPKERNELS_DW_TILE=", std::getenv("REPKERNELS_DW_TILE"),
           " names no forward kernel (generic, direct, <taps>, small, small:generic, small:<taps>, cl, cl:generic, "
           "cl:<taps>)");
  FwdChoice choice = FwdChoice::kAuto;
  if (want == 0) choice = FwdChoice::kGeneric;
  else if (want == -1) choice = FwdChoice::kDirect;
  else if (want == kAnySmallKernel) choice = FwdChoice::kSmall;
  else if (want == kSmallKernel) choice = FwdChoice::kSmallGeneric;
  else if (want == kAnyClKernel) choice = FwdChoice::kCl;
  else if (want == kClKernel) choice = FwdChoice::kClGeneric;
  else if (want > kClKernel) choice = FwdChoice::kCl;
  else if (want > kSmallKernel) choice = FwdChoice::kSmall;
  else if (want > 0) choice = FwdChoice::kRegTile;
  const int kernel = plan_forward(p, q, choice);
  const bool ok = want == kAnyKernel || kernel == want ||
                  (want == kAnySmallKernel && kernel >= kSmallKernel && kernel < kClKernel) ||
                  (want == kAnyClKernel && kernel >= kClKernel);
  if (!ok) {
    Params pa = p;
    RtParams qa{};
    const int planner = plan_forward(pa, qa);
    RK_CHECK(false, "depthwise_conv2d: REPKERNELS_DW_TILE asks for forward kernel ", want, " but the problem (", p.oh,
             "x", p.ow, " outputs, ", p.kh, "x", p.kw, " taps) plans kernel ", kernel, " (the planner's choice: ",
             planner, ")");
  }
  plan_sm_stage(p, q, kernel);
  return kernel;
}

template <typename T, typename Acc>
void emulate_direct_forward(const Params& p, const T* input, const T* weight, const T* bias, T* output) {
  using Shape = WideTile;
  using Tile = FwdTile<T, Acc, Shape>;
  at::parallel_for(0, num_blocks(p), 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(Shape::kThreads * Shape::kRows);
    for (int64_t block = begin; block < end; ++block) {
      const BlockCoord b = Tile::coord(p, block);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int tid = 0; tid < Shape::kThreads; ++tid) {
        Tile::direct(p, b, tid, input, weight, acc.data() + tid * Shape::kRows);
        Tile::store(p, b, tid, acc.data() + tid * Shape::kRows, bias, output);
      }
    }
  });
}

// The forward blocks of a register tile (RtTile or SmTile), block by block and thread by thread.
template <typename T, typename Acc, typename Tile>
void emulate_forward_blocks(const RtParams& q, int64_t blocks, int64_t smem_elems, const T* input, const T* weight,
                            const T* bias, T* output) {
  using Shape = typename Tile::Shape;
  constexpr int kAcc = Tile::kRH * Tile::kRW;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf(smem_elems + 64 / sizeof(Acc));
    Acc* smem = buf.data();  // 64-byte aligned, as the kernel's 16-byte loads need
    while (reinterpret_cast<uintptr_t>(smem) % 64 != 0) ++smem;
    std::vector<Acc> acc(Shape::kThreads * kAcc);
    for (int64_t block = begin; block < end; ++block) {
      const auto b = Tile::coord(q, block);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for_each_tap_chunk(q, [&](int sigma, int i0, int kc, int m0, int mt) {
        // Poison shared memory so that a read of anything the stage phase did not write shows.
        std::fill(buf.begin(), buf.end(), std::numeric_limits<Acc>::quiet_NaN());
        for (int tid = 0; tid < Shape::kThreads; ++tid)
          Tile::stage(q, b, sigma, i0, kc, m0, mt, tid, input, weight, smem);
        for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::compute(q, b, kc, mt, tid, smem, acc.data() + tid * kAcc);
      });
      if constexpr (Tile::kChannelVectors) {
        if (Tile::stores_channel_vectors(q)) {
          std::fill(buf.begin(), buf.end(), std::numeric_limits<Acc>::quiet_NaN());
          for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::park(q, b, tid, acc.data() + tid * kAcc, smem);
          for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::store_parked(q, b, tid, smem, bias, output);
          continue;
        }
      }
      for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::store(q, b, tid, acc.data() + tid * kAcc, bias, output);
    }
  });
}

template <typename T, typename Acc, int KW>
void emulate_rt_forward(const Params& p, const RtParams& q, const T* input, const T* weight, const T* bias,
                        T* output) {
  using Tile = RtTile<T, Acc, KW>;
  emulate_forward_blocks<T, Acc, Tile>(q, num_rt_blocks(p, q), rt_smem_elems<typename Tile::Shape>(q), input, weight,
                                       bias, output);
}

template <typename T, typename Acc, int KW>
void emulate_small_forward(const RtParams& q, const T* input, const T* weight, const T* bias, T* output) {
  emulate_forward_blocks<T, Acc, SmTile<T, Acc, KW>>(q, num_small_blocks(q), small_smem_elems<KW>(q), input, weight,
                                                     bias, output);
}

// CPU emulation of launch_forward (depthwise_conv2d_kernel.cu).
template <typename T, typename Acc>
void emulate_forward(const Params& p, const RtParams& q, int kernel, const T* input, const T* weight, const T* bias,
                     T* output) {
  switch (kernel) {
    case -1: return emulate_direct_forward<T, Acc>(p, input, weight, bias, output);
    case 0: return emulate_rt_forward<T, Acc, 0>(p, q, input, weight, bias, output);
    case 3: return emulate_rt_forward<T, Acc, 3>(p, q, input, weight, bias, output);
    case 5: return emulate_rt_forward<T, Acc, 5>(p, q, input, weight, bias, output);
    case 7: return emulate_rt_forward<T, Acc, 7>(p, q, input, weight, bias, output);
    case 13: return emulate_rt_forward<T, Acc, 13>(p, q, input, weight, bias, output);
    case 27: return emulate_rt_forward<T, Acc, 27>(p, q, input, weight, bias, output);
    case 31: return emulate_rt_forward<T, Acc, 31>(p, q, input, weight, bias, output);
    case kSmallKernel: return emulate_small_forward<T, Acc, 0>(q, input, weight, bias, output);
    case kSmallKernel + 7: return emulate_small_forward<T, Acc, 7>(q, input, weight, bias, output);
    case kSmallKernel + 13: return emulate_small_forward<T, Acc, 13>(q, input, weight, bias, output);
    case kSmallKernel + 27: return emulate_small_forward<T, Acc, 27>(q, input, weight, bias, output);
    case kSmallKernel + 31: return emulate_small_forward<T, Acc, 31>(q, input, weight, bias, output);
    case kClKernel: return emulate_small_forward<T, Acc, 0>(q, input, weight, bias, output);
    case kClKernel + 7: return emulate_small_forward<T, Acc, 7>(q, input, weight, bias, output);
    case kClKernel + 13: return emulate_small_forward<T, Acc, 13>(q, input, weight, bias, output);
    case kClKernel + 27: return emulate_small_forward<T, Acc, 27>(q, input, weight, bias, output);
    case kClKernel + 31: return emulate_small_forward<T, Acc, 31>(q, input, weight, bias, output);
  }
  RK_CHECK(false, "depthwise_conv2d: no forward kernel ", kernel);
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_params(input, weight, bias, stride, padding, dilation);
  at::Tensor out = make_output(input, p);
  RtParams q{};
  const int kernel = plan_forward_checked(p, q);
  at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  ToeplitzParams t;
  const bool toeplitz = make_toeplitz(p, input, out, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_conv2d_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* bias_ptr = b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr;
    if (toeplitz) {
      emulate_toeplitz_conv<scalar_t, Acc>(t, false, input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                           bias_ptr, out.mutable_data_ptr<scalar_t>());
    } else {
      emulate_forward<scalar_t, Acc>(p, q, kernel, input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                     bias_ptr, out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

at::Tensor depthwise_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_params(input, weight, bias, stride, padding, dilation);
  DType dtype;
  switch (input.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default: RK_CHECK(false, "depthwise_conv2d (cuda): `input` dtype must be float32, float16 or bfloat16, got ",
                      input.scalar_type());
  }
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = make_output(input, p);
  at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  ToeplitzParams t;
  if (make_toeplitz(p, input, out, t)) {
    if (out.numel() > 0)
      RK_CUDA_CHECK(launch_toeplitz_conv(t, false, dtype, input.const_data_ptr(), w.const_data_ptr(),
                                          b.has_value() ? b->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                          c10::cuda::getCurrentCUDAStream()));
    return out;
  }
  RtParams q{};
  const int kernel = plan_forward_checked(p, q);
  RK_CUDA_CHECK(launch_forward(p, q, kernel, dtype, input.const_data_ptr(), w.const_data_ptr(),
                                b.has_value() ? b->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                c10::cuda::getCurrentCUDAStream()));
  return out;
}


// ---------------------------------------------------------------- backward

// Checks `grad_output` against the forward problem and returns it (any strides).
Params make_backward_params(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_params(input, weight, std::nullopt, stride, padding, dilation);
  RK_CHECK(grad.dim() == 4 && grad.size(0) == p.n && grad.size(1) == p.c && grad.size(2) == p.oh &&
               grad.size(3) == p.ow,
           "depthwise_conv2d backward: `grad` must have the output shape (", p.n, ", ", p.c, ", ", p.oh, ", ",
           p.ow, "), got ", grad.sizes());
  RK_CHECK(grad.scalar_type() == input.scalar_type(), "depthwise_conv2d backward: `grad` dtype ",
           grad.scalar_type(), " does not match `input` dtype ", input.scalar_type());
  RK_CHECK(grad.device() == input.device(), "depthwise_conv2d backward: `grad` is on ", grad.device(),
           " but `input` is on ", input.device());
  return p;
}

at::Tensor make_grad_input(const at::Tensor& input) {
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  return at::empty(input.sizes(), input.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous));
}

// Input gradient along one axis (stride s, dilation d, padding p, k taps, x_size input positions):
// grad_input position x = ξ + s·t receives the taps j with x + p − j·d = o·s, i.e. j = j0 + s'·m
// (g = gcd(s, d), s' = s / g, j0 the first such tap), reading grad_output o = t + β − m·d'
// (d' = d / g, β = (ξ + p − j0·d) / s): over t, a stride-1 conv of grad_output with dilation d',
// the flipped sub-kernel w[j0 + s'·(M − 1 − m')] and padding (M − 1)·d' − β.
struct AxisClass {
  int64_t j0, step, taps, dil, pad, out;  // taps = 0: no tap reaches the class
};

AxisClass axis_class(int64_t s, int64_t d, int64_t p, int64_t k, int64_t x_size, int64_t xi) {
  AxisClass a{};
  const int64_t g = gcd64(s, d);
  a.step = s / g;
  a.dil = d / g;
  a.out = (x_size - xi + s - 1) / s;
  for (int64_t j = 0; j < std::min(k, a.step); ++j) {
    if (((xi + p - j * d) % s + s) % s != 0) continue;
    a.j0 = j;
    a.taps = (k - 1 - j) / a.step + 1;
    a.pad = (a.taps - 1) * a.dil - (xi + p - j * d) / s;
    return a;
  }
  return a;
}

// The input gradient of forward problem `p` as sh·sw forward problems (one per class of grad_input
// positions ξ + s·t along each axis; stride 1: one class, the flipped filter). For each class calls
// run(f, sub_weight, grad_input_view) with f planned by the caller from the returned Params (in_stride =
// grad's, out_stride = the view's); classes no tap reaches are zeroed.
template <typename Run>
void for_each_dgrad_class(const Params& p, const at::Tensor& grad, const at::Tensor& weight, at::Tensor& grad_input,
                          Run run) {
  for (int64_t xh = 0; xh < std::min(p.sh, p.h); ++xh) {
    const AxisClass ah = axis_class(p.sh, p.dh, p.ph, p.kh, p.h, xh);
    for (int64_t xw = 0; xw < std::min(p.sw, p.w); ++xw) {
      const AxisClass aw = axis_class(p.sw, p.dw, p.pw, p.kw, p.w, xw);
      at::Tensor view = grad_input.slice(2, xh, p.h, p.sh).slice(3, xw, p.w, p.sw);
      if (ah.taps == 0 || aw.taps == 0) {
        view.zero_();
        continue;
      }
      Params f = p;
      f.h = p.oh;
      f.w = p.ow;
      f.kh = ah.taps;
      f.kw = aw.taps;
      f.sh = f.sw = 1;
      f.dh = ah.dil;
      f.dw = aw.dil;
      f.ph = ah.pad;
      f.pw = aw.pad;
      f.oh = ah.out;
      f.ow = aw.out;
      for (int i = 0; i < 4; ++i) {
        f.in_stride[i] = grad.stride(i);
        f.out_stride[i] = view.stride(i);
      }
      at::Tensor sub = weight.slice(2, ah.j0, p.kh, ah.step).slice(3, aw.j0, p.kw, aw.step).flip({2, 3}).contiguous();
      run(f, sub, view);
    }
  }
}

template <typename T, typename Acc>
void emulate_backward_weight(const Params& p, const T* input, const T* grad, Acc* ws) {
  using Tile = WgradTile<T, Acc>;
  using S = WgradShape;
  at::parallel_for(0, num_wgrad_blocks(p), 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(S::kThreads * S::kTaps);
    for (int64_t block = begin; block < end; ++block) {
      const auto b = Tile::coord(p, block);
      const int64_t t0 = Tile::first_tile(p, b), t1 = Tile::end_tile(p, b);
      for (int64_t kh0 = 0; kh0 < p.kh; kh0 += p.kh_chunk) {
        for (int64_t kw0 = 0; kw0 < p.kw; kw0 += p.kw_chunk) {
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (int64_t tile = t0; tile < t1; ++tile) {
            for (int tid = 0; tid < S::kThreads; ++tid)
              Tile::direct(p, b, tile, kh0, kw0, tid, input, grad, acc.data() + tid * S::kTaps);
          }
          for (int tid = 0; tid < S::kThreads; ++tid) Tile::write(p, b, kh0, kw0, tid, acc.data() + tid * S::kTaps, ws);
        }
      }
    }
  });
}

// CPU emulation of backward_weight_rt_kernel (depthwise_conv2d_kernel.cu) with Tile (RtWgradTile or RtWgradClTile),
// block by block and thread by thread, shared memory poisoned before each stage and before the reduction.
template <typename T, typename Acc, typename Tile>
void emulate_rt_backward_weight(const Params& p, const RtWgradParams& w, const T* input, const T* grad, Acc* ws) {
  using S = typename Tile::Shape;
  const RtParams& q = w.g;
  const int64_t smem_elems = S::smem_elems(q.sh, q.dh, q.kc, q.mc);
  at::parallel_for(0, num_rt_wgrad_blocks(p, w), 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf(smem_elems + 64 / sizeof(Acc));
    Acc* smem = buf.data();  // 64-byte aligned, as the kernel's 16-byte loads need
    while (reinterpret_cast<uintptr_t>(smem) % 64 != 0) ++smem;
    std::vector<Acc> acc(S::kThreads * S::kAcc);
    for (int64_t block = begin; block < end; ++block) {
      const auto b = Tile::coord(w, block);
      const int t0 = Tile::first_tile(w, b), t1 = Tile::end_tile(w, b);
      for_each_tap_chunk(q, [&](int sigma, int i0, int kc, int m0, int mt) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int tile = t0; tile < t1; ++tile) {
          // Poison shared memory so that a read of anything the stage phase did not write shows.
          std::fill(buf.begin(), buf.end(), std::numeric_limits<Acc>::quiet_NaN());
          for (int tid = 0; tid < S::kThreads; ++tid)
            Tile::stage(w, b, tile, sigma, i0, kc, m0, mt, tid, input, grad, smem);
          for (int tid = 0; tid < S::kThreads; ++tid) Tile::compute(q, b, kc, mt, tid, smem, acc.data() + tid * S::kAcc);
        }
        std::fill(buf.begin(), buf.end(), std::numeric_limits<Acc>::quiet_NaN());
        for (int tid = 0; tid < S::kThreads; ++tid) Tile::spill(tid, acc.data() + tid * S::kAcc, smem);
        for (int tid = 0; tid < S::kThreads; ++tid) Tile::reduce(w, b, sigma, i0, kc, m0, mt, tid, smem, ws);
      });
    }
  });
}

// REPKERNELS_DW_WGRAD (the tests use it to reach each weight-gradient tile): "cl" (the channels_last tile: an error
// naming why when it cannot apply), "plane" (never it: the per-channel tiles). Unset: the planner's choice (the
// channels_last tile for a channels_last input and grad_out with one W phase).
enum class WgradChoice { kAuto, kCl, kPlane, kBad };

WgradChoice requested_wgrad() {
  const char* v = std::getenv("REPKERNELS_DW_WGRAD");
  if (v == nullptr || *v == 0) return WgradChoice::kAuto;
  if (std::strcmp(v, "cl") == 0) return WgradChoice::kCl;
  if (std::strcmp(v, "plane") == 0) return WgradChoice::kPlane;
  return WgradChoice::kBad;
}

// The weight-gradient plan: the register tile (true, `w` filled: the small-map tile when the grad_out plane
// fits in one of its tiles) unless REPKERNELS_DW_TILE=direct or no chunk of it fits (then kDirect, `p`
// planned by plan_wgrad()). REPKERNELS_DW_TILE=small... asks for the small-map tile, a large-map forward tile
// (generic, <taps>) for the large-map one. A channels_last input and grad_out with one W phase plan the channels_last
// tile (RtWgradClTile) first, unless REPKERNELS_DW_WGRAD=plane or REPKERNELS_DW_TILE names a tile other than the
// channel-group ones (cl...); REPKERNELS_DW_WGRAD=cl insists on it.
bool plan_wgrad_checked(Params& p, RtWgradParams& w, int64_t target_blocks) {
  const int want = requested_kernel();
  const WgradChoice cl = requested_wgrad();
  RK_CHECK(cl != WgradChoice::kBad, "depthwise_conv2d: REPKERNELS_DW_WGRAD=", std::getenv("REPKERNELS_DW_WGRAD"),
           " names no weight-gradient tile (cl, plane)");
  // the channels_last tile unless a forward tile other than the channel-group ones is asked for
  const bool cl_allowed = cl != WgradChoice::kPlane && (want == kAnyKernel || want == kAnyClKernel || want >= kClKernel);
  if (cl == WgradChoice::kCl) {
    RK_CHECK(cl_allowed, "depthwise_conv2d: REPKERNELS_DW_WGRAD=cl asks for the channels_last weight-gradient tile but ",
             "REPKERNELS_DW_TILE=", std::getenv("REPKERNELS_DW_TILE"), " asks for another tile");
    const char* why = cl_wgrad_rejection(p);
    RK_CHECK(why == nullptr, "depthwise_conv2d: REPKERNELS_DW_WGRAD=cl asks for the channels_last weight-gradient ",
             "tile but ", why == nullptr ? "" : why);
  }
  if (cl_allowed) {
    RtWgradParams c{};
    if (plan_cl_wgrad(p, c, target_blocks)) {
      w = c;
      return true;
    }
    RK_CHECK(cl != WgradChoice::kCl, "depthwise_conv2d: REPKERNELS_DW_WGRAD=cl asks for the channels_last ",
             "weight-gradient tile but no tap chunk of it fits (", p.kh, "x", p.kw, " taps, stride ", p.sh, ", dilation ",
             p.dh, ")");
  }
  const bool want_small = want == kAnySmallKernel || (want >= kSmallKernel && want < kClKernel);
  const bool rt = want != -1 && plan_rt_wgrad(p, w, target_blocks, want == kAnyKernel || want_small);
  RK_CHECK(rt || want == kAnyKernel || want == -1, "depthwise_conv2d: REPKERNELS_DW_TILE asks for a register tile ",
           "but the weight gradient (", p.kh, "x", p.kw, " taps) plans kDirect");
  RK_CHECK(!want_small || (rt && w.small), "depthwise_conv2d: REPKERNELS_DW_TILE asks for the small-map tiles but the ",
           "weight gradient (", p.oh, "x", p.ow, " grad_out, ", p.kh, "x", p.kw, " taps) plans the large-map tile");
  if (!rt) {
    plan_wgrad(p, target_blocks);
    p.config = TileConfig::kDirect;
  }
  return rt;
}

// Blocks the CPU emulation plans the weight gradient for: few, so that the tests see several splits.
constexpr int64_t kEmulationWgradBlocks = 8;

at::Tensor depthwise_conv2d_backward_input_cpu(const at::Tensor& grad, const at::Tensor& input,
                                               const at::Tensor& weight, c10::IntArrayRef stride,
                                               c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_backward_params(grad, input, weight, stride, padding, dilation);
  at::Tensor grad_input = make_grad_input(input);
  ToeplitzParams t;
  const bool toeplitz = make_toeplitz(p, grad_input, grad, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_conv2d_bwd_input_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (toeplitz) {
      at::Tensor w = weight.contiguous();
      emulate_toeplitz_conv<scalar_t, Acc>(t, true, grad.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                           nullptr, grad_input.mutable_data_ptr<scalar_t>());
    } else {
      for_each_dgrad_class(p, grad, weight, grad_input, [&](Params& f, const at::Tensor& sub, at::Tensor& view) {
        RtParams q{};
        const int kernel = plan_forward_checked(f, q);
        emulate_forward<scalar_t, Acc>(f, q, kernel, grad.const_data_ptr<scalar_t>(), sub.const_data_ptr<scalar_t>(),
                                       nullptr, view.mutable_data_ptr<scalar_t>());
      });
    }
  });
  return grad_input;
}

at::Tensor depthwise_conv2d_backward_weight_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                const at::Tensor& weight, c10::IntArrayRef stride,
                                                c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_backward_params(grad, input, weight, stride, padding, dilation);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  ToeplitzParams t;
  if (make_toeplitz(p, input, grad, t)) {
    at::Tensor gw = at::empty({p.c, 1, p.kh, p.kw}, input.options());
    at::Tensor ws = at::empty({p.c * t.kf, t.out_plane(), t.in_plane()}, input.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dw_toeplitz_wgrad_cpu", [&] {
      using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      emulate_toeplitz_wgrad<scalar_t, Acc>(t, grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                            ws.mutable_data_ptr<Acc>(), gw.mutable_data_ptr<scalar_t>());
    });
    return gw;
  }
  for (int i = 0; i < 4; ++i) p.out_stride[i] = grad.stride(i);
  RtWgradParams w{};
  const bool rt = plan_wgrad_checked(p, w, kEmulationWgradBlocks);
  at::Tensor ws = at::empty({p.c, rt ? w.splits : p.splits, p.kh * p.kw}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_conv2d_bwd_weight_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    Acc* out = ws.mutable_data_ptr<Acc>();
    if (rt && is_cl_wgrad(w)) {
      emulate_rt_backward_weight<scalar_t, Acc, RtWgradClTile<scalar_t, Acc>>(p, w, x, g, out);
    } else if (rt && w.small) {
      emulate_rt_backward_weight<scalar_t, Acc, RtWgradTile<scalar_t, Acc, RtWgradSmall>>(p, w, x, g, out);
    } else if (rt) {
      emulate_rt_backward_weight<scalar_t, Acc, RtWgradTile<scalar_t, Acc, RtWgradShape>>(p, w, x, g, out);
    } else {
      emulate_backward_weight<scalar_t, Acc>(p, x, g, out);
    }
  });
  return ws.sum(1).view({p.c, 1, p.kh, p.kw}).to(input.scalar_type());
}

DType cuda_dtype(const at::Tensor& input) {
  switch (input.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: RK_CHECK(false, "depthwise_conv2d (cuda): `input` dtype must be float32, float16 or bfloat16, got ",
                      input.scalar_type());
  }
}

at::Tensor depthwise_conv2d_backward_input_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                const at::Tensor& weight, c10::IntArrayRef stride,
                                                c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_backward_params(grad, input, weight, stride, padding, dilation);
  const DType dtype = cuda_dtype(input);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = make_grad_input(input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ToeplitzParams t;
  if (make_toeplitz(p, grad_input, grad, t)) {
    at::Tensor w = weight.contiguous();
    if (grad_input.numel() > 0)
      RK_CUDA_CHECK(launch_toeplitz_conv(t, true, dtype, grad.const_data_ptr(), w.const_data_ptr(), nullptr,
                                          grad_input.mutable_data_ptr(), stream));
    return grad_input;
  }
  for_each_dgrad_class(p, grad, weight, grad_input, [&](Params& f, const at::Tensor& sub, at::Tensor& view) {
    RtParams q{};
    const int kernel = plan_forward_checked(f, q);
    RK_CUDA_CHECK(launch_forward(f, q, kernel, dtype, grad.const_data_ptr(), sub.const_data_ptr(), nullptr,
                                  view.mutable_data_ptr(), stream));
  });
  return grad_input;
}

at::Tensor depthwise_conv2d_backward_weight_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& weight, c10::IntArrayRef stride,
                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  Params p = make_backward_params(grad, input, weight, stride, padding, dilation);
  const DType dtype = cuda_dtype(input);
  c10::cuda::CUDAGuard guard(input.device());
  ToeplitzParams t;
  if (make_toeplitz(p, input, grad, t)) {
    at::Tensor gw = at::empty({p.c, 1, p.kh, p.kw}, input.options());
    at::Tensor ws = at::empty({p.c * t.kf, t.out_plane(), t.in_plane()}, input.options().dtype(at::kFloat));
    RK_CUDA_CHECK(launch_toeplitz_wgrad(t, dtype, grad.const_data_ptr(), input.const_data_ptr(),
                                         ws.mutable_data_ptr<float>(), gw.mutable_data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()));
    return gw;
  }
  for (int i = 0; i < 4; ++i) p.out_stride[i] = grad.stride(i);
  int sms = 0;
  RK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, input.device().index()));
  RtWgradParams w{};
  const bool rt = plan_wgrad_checked(p, w, 4 * int64_t(sms));
  at::Tensor ws = at::empty({p.c, rt ? w.splits : p.splits, p.kh * p.kw}, input.options().dtype(at::kFloat));
  RK_CUDA_CHECK(launch_backward_weight(p, rt ? &w : nullptr, dtype, input.const_data_ptr(), grad.const_data_ptr(),
                                        ws.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return ws.sum(1).view({p.c, 1, p.kh, p.kw}).to(input.scalar_type());
}

}  // namespace
}  // namespace dw
}  // namespace rk

TORCH_LIBRARY_FRAGMENT(repkernels, m) {
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward_input(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  m.def("depthwise_conv2d_backward_weight(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(repkernels, CPU, m) {
  m.impl("depthwise_conv2d", &rk::dw::depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward_input", &rk::dw::depthwise_conv2d_backward_input_cpu);
  m.impl("depthwise_conv2d_backward_weight", &rk::dw::depthwise_conv2d_backward_weight_cpu);
}

TORCH_LIBRARY_IMPL(repkernels, CUDA, m) {
  m.impl("depthwise_conv2d", &rk::dw::depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_backward_input", &rk::dw::depthwise_conv2d_backward_input_cuda);
  m.impl("depthwise_conv2d_backward_weight", &rk::dw::depthwise_conv2d_backward_weight_cuda);
}
