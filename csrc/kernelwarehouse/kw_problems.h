// The six GEMM problems of the KernelWarehouse ops, for the tile engine of common/gemm_tile.h: operand gathers and epilogues.
//
//   AsmForward        kernels[addr(r, t)]      = Σ_n  attention[r, n] · warehouse[n, t]          r = b·m + j
//   AsmBackwardAtt    grad_attention[r, n]     = Σ_t  grad[addr(r, t)] · warehouse[n, t]
//   AsmBackwardWh     partial[s][n, t]         = Σ_r∈split s  attention[r, n] · grad[addr(r, t)]
//   ConvForward       y[b, g·cog + o, p]       = Σ_k  w[b, g·cog + o, k] · im2col(x[b])[g·cig + k, p] (+ bias)
//   ConvBackwardInput gx[b, g·cig + c, ih, iw] = Σ_(o,q) w[b, g·cog + o, c, q] · gy[b, g·cog + o, oh, ow]
//                                                (oh = (ih + ph − kh·dh) / sh when exact and in range)
//   ConvBackwardWeight gw[b, g·cog + o, k]     = Σ_p  gy[b, g·cog + o, p] · im2col(x[b])[g·cig + k, p]
//
// `addr` is the conv-layout address of kw_params.h (the kernels are read and written in place: no permuted
// copies). Conv batches are (sample, group) pairs.
#pragma once

#include "kernelwarehouse/kw_params.h"

namespace rk::kw {

template <typename T_, typename Acc_>
struct AsmForward {
  using T = T_;
  using Acc = Acc_;
  AsmParams p;
  const T* att;
  const T* wh;
  T* out;
  RK_HD int64_t batches() const { return 1; }
  RK_HD int64_t M() const { return p.rows(); }
  RK_HD int64_t N() const { return p.cell(); }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return p.n; }
  RK_HD Acc load_a(int64_t, int64_t r, int64_t k) const { return Cvt<T, Acc>::load(att[r * p.n + k]); }
  RK_HD Acc load_b(int64_t, int64_t k, int64_t t) const { return Cvt<T, Acc>::load(wh[k * p.cell() + t]); }
  RK_HD void store(int64_t, int64_t r, int64_t t, Acc v) const {
    out[p.row_offset(r) + p.col_offset(t)] = Cvt<T, Acc>::store(v);
  }
};

template <typename T_, typename Acc_>
struct AsmBackwardAtt {
  using T = T_;
  using Acc = Acc_;
  AsmParams p;
  const T* grad;
  const T* wh;
  T* out;
  RK_HD int64_t batches() const { return 1; }
  RK_HD int64_t M() const { return p.rows(); }
  RK_HD int64_t N() const { return p.n; }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return p.cell(); }
  RK_HD Acc load_a(int64_t, int64_t r, int64_t t) const {
    return Cvt<T, Acc>::load(grad[p.row_offset(r) + p.col_offset(t)]);
  }
  RK_HD Acc load_b(int64_t, int64_t t, int64_t n) const { return Cvt<T, Acc>::load(wh[n * p.cell() + t]); }
  RK_HD void store(int64_t, int64_t r, int64_t n, Acc v) const { out[r * p.n + n] = Cvt<T, Acc>::store(v); }
};

// Split over rows: batch s reduces rows [s·rows_per_split, (s+1)·rows_per_split); partial sums in Acc.
template <typename T_, typename Acc_>
struct AsmBackwardWh {
  using T = T_;
  using Acc = Acc_;
  AsmParams p;
  const T* att;
  const T* grad;
  Acc* partial;  // (splits, n, cell)
  RK_HD int64_t batches() const { return cdiv(p.rows(), p.rows_per_split); }
  RK_HD int64_t M() const { return p.n; }
  RK_HD int64_t N() const { return p.cell(); }
  RK_HD int64_t k_begin(int64_t s) const { return s * p.rows_per_split; }
  RK_HD int64_t k_end(int64_t s) const { return imin((s + 1) * p.rows_per_split, p.rows()); }
  RK_HD Acc load_a(int64_t, int64_t n, int64_t r) const { return Cvt<T, Acc>::load(att[r * p.n + n]); }
  RK_HD Acc load_b(int64_t, int64_t r, int64_t t) const {
    return Cvt<T, Acc>::load(grad[p.row_offset(r) + p.col_offset(t)]);
  }
  RK_HD void store(int64_t s, int64_t n, int64_t t, Acc v) const { partial[(s * p.n + n) * p.cell() + t] = v; }
};

// Gather of im2col(x[b])[g·cig + k, p] (zero in the padding).
template <typename T, typename Acc>
RK_HD Acc conv_input_at(const ConvParams& p, const T* x, int64_t b, int64_t g, int64_t k, int64_t pix) {
  const int64_t c = k / p.taps(), q = k % p.taps();
  const int64_t ih = (pix / p.ow) * p.sh - p.ph + (q / p.kw) * p.dh;
  const int64_t iw = (pix % p.ow) * p.sw - p.pw + (q % p.kw) * p.dw;
  if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) return Acc(0);
  return Cvt<T, Acc>::load(x[b * p.x_stride[0] + (g * p.cig + c) * p.x_stride[1] + ih * p.x_stride[2] +
                             iw * p.x_stride[3]]);
}

template <typename T_, typename Acc_>
struct ConvForward {
  using T = T_;
  using Acc = Acc_;
  ConvParams p;
  const T* x;
  const T* w;
  const T* bias;  // may be null
  T* y;
  RK_HD int64_t batches() const { return p.batch * p.groups; }
  RK_HD int64_t M() const { return p.cog; }
  RK_HD int64_t N() const { return p.oh * p.ow; }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return p.k(); }
  RK_HD Acc load_a(int64_t bg, int64_t o, int64_t k) const {
    const int64_t b = bg / p.groups, g = bg % p.groups;
    return Cvt<T, Acc>::load(w[(b * p.cout + g * p.cog + o) * p.k() + k]);
  }
  RK_HD Acc load_b(int64_t bg, int64_t k, int64_t pix) const {
    return conv_input_at<T, Acc>(p, x, bg / p.groups, bg % p.groups, k, pix);
  }
  RK_HD void store(int64_t bg, int64_t o, int64_t pix, Acc v) const {
    const int64_t b = bg / p.groups, oc = (bg % p.groups) * p.cog + o;
    if (bias != nullptr) v += Cvt<T, Acc>::load(bias[oc]);
    y[b * p.y_stride[0] + oc * p.y_stride[1] + (pix / p.ow) * p.y_stride[2] + (pix % p.ow) * p.y_stride[3]] =
        Cvt<T, Acc>::store(v);
  }
};

// Reduction index k = o·taps + q (output channel of the group, tap).
template <typename T_, typename Acc_>
struct ConvBackwardInput {
  using T = T_;
  using Acc = Acc_;
  ConvParams p;
  const T* gy;
  const T* w;
  T* gx;
  RK_HD int64_t batches() const { return p.batch * p.groups; }
  RK_HD int64_t M() const { return p.cig; }
  RK_HD int64_t N() const { return p.h * p.w; }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return p.cog * p.taps(); }
  RK_HD Acc load_a(int64_t bg, int64_t c, int64_t k) const {
    const int64_t b = bg / p.groups, g = bg % p.groups;
    const int64_t o = k / p.taps(), q = k % p.taps();
    return Cvt<T, Acc>::load(w[((b * p.cout + g * p.cog + o) * p.cig + c) * p.taps() + q]);
  }
  RK_HD Acc load_b(int64_t bg, int64_t k, int64_t pix) const {
    const int64_t b = bg / p.groups, g = bg % p.groups;
    const int64_t o = k / p.taps(), q = k % p.taps();
    const int64_t th = (pix / p.w) + p.ph - (q / p.kw) * p.dh;
    const int64_t tw = (pix % p.w) + p.pw - (q % p.kw) * p.dw;
    if (th < 0 || tw < 0 || th % p.sh != 0 || tw % p.sw != 0) return Acc(0);
    const int64_t oh = th / p.sh, ow = tw / p.sw;
    if (oh >= p.oh || ow >= p.ow) return Acc(0);
    return Cvt<T, Acc>::load(gy[b * p.y_stride[0] + (g * p.cog + o) * p.y_stride[1] + oh * p.y_stride[2] +
                                ow * p.y_stride[3]]);
  }
  RK_HD void store(int64_t bg, int64_t c, int64_t pix, Acc v) const {
    const int64_t b = bg / p.groups, ic = (bg % p.groups) * p.cig + c;
    gx[b * p.x_stride[0] + ic * p.x_stride[1] + (pix / p.w) * p.x_stride[2] + (pix % p.w) * p.x_stride[3]] =
        Cvt<T, Acc>::store(v);
  }
};

template <typename T_, typename Acc_>
struct ConvBackwardWeight {
  using T = T_;
  using Acc = Acc_;
  // Without it ptxas holds the thin-tile kernel (M <= 8) at 64 registers and spills 16 B (4 blocks/SM); with it,
  // 80 registers and no spill (3 blocks/SM, as the wide-tile kernel).
  static constexpr int kMinBlocksPerSm = 3;
  ConvParams p;
  const T* x;
  const T* gy;
  T* gw;
  RK_HD int64_t batches() const { return p.batch * p.groups; }
  RK_HD int64_t M() const { return p.cog; }
  RK_HD int64_t N() const { return p.k(); }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return p.oh * p.ow; }
  RK_HD Acc load_a(int64_t bg, int64_t o, int64_t pix) const {
    const int64_t b = bg / p.groups, g = bg % p.groups;
    return Cvt<T, Acc>::load(gy[b * p.y_stride[0] + (g * p.cog + o) * p.y_stride[1] + (pix / p.ow) * p.y_stride[2] +
                                (pix % p.ow) * p.y_stride[3]]);
  }
  RK_HD Acc load_b(int64_t bg, int64_t pix, int64_t k) const {
    return conv_input_at<T, Acc>(p, x, bg / p.groups, bg % p.groups, k, pix);
  }
  RK_HD void store(int64_t bg, int64_t o, int64_t k, Acc v) const {
    const int64_t b = bg / p.groups, oc = (bg % p.groups) * p.cog + o;
    gw[(b * p.cout + oc) * p.k() + k] = Cvt<T, Acc>::store(v);
  }
};

}  // namespace rk::kw
