// Problem descriptions of the KernelWarehouse ops (plain data: included by the .cu kernels, the host code
// and the CPU emulation alike). Layout and mixture order: python/repkernels/reference/kernelwarehouse.py.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace rk::kw {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// kw_assemble: attention (B, m, n) x warehouse (n, co, ci, E) -> kernels (B, Cout, Cin_g, KS).
// Mixture j = (o·gi + i)·ns + s; cell element t = (a·ci + c)·ce + e.
struct AsmParams {
  int64_t batch, m, n;           // attention (B, m, n)
  int64_t gi, ns, co, ci, ce;    // gi input-channel cells, ns cells along the taps; a cell is co x ci x ce
  int64_t cin_g, ks, w_sample;   // kernel: Cin/groups, taps, elements per sample
  int64_t rows_per_split;        // backward to the warehouse: rows (b, j) reduced per split
  RK_HD int64_t rows() const { return batch * m; }
  RK_HD int64_t cell() const { return co * ci * ce; }
  // Address of cell element t of row r = b·m + j in the conv layout.
  RK_HD int64_t row_offset(int64_t r) const {
    const int64_t b = r / m, j = r % m;
    const int64_t s = j % ns, oi = j / ns;
    return b * w_sample + (oi / gi) * co * cin_g * ks + (oi % gi) * ci * ks + s * ce;
  }
  RK_HD int64_t col_offset(int64_t t) const {
    const int64_t e = t % ce, ac = t / ce;
    return (ac / ci) * cin_g * ks + (ac % ci) * ks + e;
  }
};

// per_sample_conv2d: input (B, C, H, W) (any strides), weight (B, Cout, C/groups, kh, kw) contiguous,
// output (B, Cout, OH, OW) (any strides). For the backward passes `y_stride` are grad_out's strides and
// `x_stride` those of the input (dgrad: of grad_input).
struct ConvParams {
  int64_t batch, c, h, w, cout, oh, ow;
  int64_t groups, cig, cog;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t x_stride[4];
  int64_t y_stride[4];
  RK_HD int64_t taps() const { return kh * kw; }
  RK_HD int64_t k() const { return cig * kh * kw; }  // reduction of the forward GEMM, per group
};

}  // namespace rk::kw
