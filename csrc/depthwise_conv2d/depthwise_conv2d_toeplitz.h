// Depthwise conv2d with large kernels as per-channel Toeplitz GEMMs, on the batched tile engine of
// common/gemm_tile.h (host+device code: the same tiles run in the CPU emulation).
//
// The formulation (same as triton_kernels/depthwise_conv2d_toeplitz.py): a Toeplitz plane is one
// spatial axis (1-D) or both (2-D); in 1-D the other axis is a batch-like column axis f whose kf
// kernel taps (stride sf, padding pf, dilation df) each add one Toeplitz product on shifted columns.
//   forward  ToeplitzConv (trans = false): y_c[o, (n, f)]  = Σ_(kf, i) T_c,kf[o, i] · x_c[i, (n, f_src)]
//   dgrad    ToeplitzConv (trans = true):  gx_c[i, (n, f)] = Σ_(kf, o) T_c,kf[o, i] · gy_c[o, (n, f_src)]
//   wgrad    ToeplitzCross: ws[c, kf][o, i] = Σ_(n, f) gy_c[o, (n, f)] · x_c[i, (n, f·sf − pf + kf·df)]
//            ToeplitzDiagonal: gw[c, kf, t] = Σ_o ws[c, kf][o, i(o, t)]   (sums along the diagonals)
// with T_c,kf[o, i] = w[c, kf, (i − o·s + p) / d] when that is a whole tap index, else 0. No multiply is
// spent on padding zeros of the plane. FMA on CUDA cores with fp32 accumulation (the engine has no
// tensor cores; Triton's version of these products uses them).
#pragma once

#include "common/hd.h"
#include "common/gemm_tile.h"

namespace rk::dw {

struct ToeplitzParams {
  int64_t n, c;
  bool two_d, swap;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;  // the plane's taps and conv arguments (kw = 1 in 1-D)
  int64_t kf, sf, pf, df;                  // taps and conv arguments along the free axis (kf = 1 in 2-D)
  int64_t in_h, in_w, out_h, out_w;        // plane sizes (in_w = out_w = 1 in 1-D)
  int64_t f_in, f_out;                     // free-axis sizes (1 in 2-D)
  int64_t w_sf, w_sh, w_sw;                // filter strides of (free tap, plane tap h, plane tap w)
  int64_t x_s[5], y_s[5];                  // strides (n, c, f, plane h, plane w) of input- / output-shaped tensors

  RK_HD int64_t taps() const { return kf * kh * kw; }
  RK_HD int64_t in_plane() const { return in_h * in_w; }
  RK_HD int64_t out_plane() const { return out_h * out_w; }
};

// The Toeplitz formulation of the conv, or false (direct kernels). Rule (as in Triton's plan()): a
// plane whose size is at most kWaste x its taps; the 2-D plane first when the map has at most
// kMaxPlane2D positions, else the 1-D axis with the smaller size/taps ratio (size <= kMaxPlane1D).
constexpr int64_t kToeplitzWaste = 2;
constexpr int64_t kMaxPlane1D = 4096;
constexpr int64_t kMaxPlane2D = 256;

inline bool plan_toeplitz(int64_t n, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw, const int64_t s[2],
                          const int64_t p[2], const int64_t d[2], ToeplitzParams& t) {
  if (kh * kw == 1) return false;
  const int64_t oh = (h + 2 * p[0] - d[0] * (kh - 1) - 1) / s[0] + 1;
  const int64_t ow = (w + 2 * p[1] - d[1] * (kw - 1) - 1) / s[1] + 1;
  t = ToeplitzParams{};
  t.n = n;
  t.c = c;
  if (kh > 1 && kw > 1 && h * w <= kMaxPlane2D && h * w <= kToeplitzWaste * kh * kw) {
    t.two_d = true;
    t.kh = kh, t.kw = kw, t.sh = s[0], t.sw = s[1], t.ph = p[0], t.pw = p[1], t.dh = d[0], t.dw = d[1];
    t.kf = 1, t.sf = 1, t.pf = 0, t.df = 1;
    t.in_h = h, t.in_w = w, t.out_h = oh, t.out_w = ow, t.f_in = 1, t.f_out = 1;
    t.w_sf = 0, t.w_sh = kw, t.w_sw = 1;
    return true;
  }
  const bool v_ok = kh > 1 && h <= kToeplitzWaste * kh && h <= kMaxPlane1D;
  const bool h_ok = kw > 1 && w <= kToeplitzWaste * kw && w <= kMaxPlane1D;
  if (!v_ok && !h_ok) return false;
  // smaller size/taps ratio: h/kh vs w/kw (ties: vertical, as Triton's min() keeps the first)
  const bool swap = !v_ok || (h_ok && w * kh < h * kw);
  const int a = swap ? 1 : 0, b = 1 - a;  // plane axis a, free axis b
  const int64_t size[2] = {h, w}, osize[2] = {oh, ow}, k[2] = {kh, kw};
  t.swap = swap;
  t.kh = k[a], t.kw = 1, t.sh = s[a], t.sw = 1, t.ph = p[a], t.pw = 0, t.dh = d[a], t.dw = 1;
  t.kf = k[b], t.sf = s[b], t.pf = p[b], t.df = d[b];
  t.in_h = size[a], t.in_w = 1, t.out_h = osize[a], t.out_w = 1, t.f_in = size[b], t.f_out = osize[b];
  t.w_sf = swap ? kw : 1;
  t.w_sh = swap ? 1 : kw;
  t.w_sw = 0;
  return true;
}

// Strides (n, c, f, plane h, plane w) of a (N, C, H, W) tensor with strides `st` in the plan's roles.
inline void toeplitz_strides(const ToeplitzParams& t, const int64_t st[4], int64_t out[5]) {
  out[0] = st[0];
  out[1] = st[1];
  if (t.two_d) {
    out[2] = 0, out[3] = st[2], out[4] = st[3];
  } else if (t.swap) {
    out[2] = st[2], out[3] = st[3], out[4] = 0;
  } else {
    out[2] = st[3], out[3] = st[2], out[4] = 0;
  }
}

// Forward (trans = false) and input gradient (trans = true). Batches: channels; M: destination plane
// positions; N: columns (n, f); K: (kf, source plane positions).
template <typename T_, typename Acc_>
struct ToeplitzConv {
  using T = T_;
  using Acc = Acc_;
  ToeplitzParams t;
  bool trans;
  const T* src;
  const T* weight;
  const T* bias;  // forward only, may be null
  T* dst;

  RK_HD int64_t dst_w() const { return trans ? t.in_w : t.out_w; }
  RK_HD int64_t src_w() const { return trans ? t.out_w : t.in_w; }
  RK_HD int64_t q_size() const { return trans ? t.out_plane() : t.in_plane(); }
  RK_HD int64_t f_dst() const { return trans ? t.f_in : t.f_out; }
  RK_HD int64_t f_src_size() const { return trans ? t.f_out : t.f_in; }
  RK_HD const int64_t* s_src() const { return trans ? t.y_s : t.x_s; }
  RK_HD const int64_t* s_dst() const { return trans ? t.x_s : t.y_s; }

  RK_HD int64_t batches() const { return t.c; }
  RK_HD int64_t M() const { return trans ? t.in_plane() : t.out_plane(); }
  RK_HD int64_t N() const { return t.n * f_dst(); }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return t.kf * q_size(); }

  RK_HD Acc load_a(int64_t c, int64_t r, int64_t k) const {
    const int64_t kf = k / q_size(), q = k % q_size();
    const int64_t r_h = r / dst_w(), r_w = r % dst_w(), q_h = q / src_w(), q_w = q % src_w();
    const int64_t th = trans ? r_h - q_h * t.sh + t.ph : q_h - r_h * t.sh + t.ph;
    const int64_t tw = trans ? r_w - q_w * t.sw + t.pw : q_w - r_w * t.sw + t.pw;
    if (th < 0 || tw < 0 || th >= t.kh * t.dh || tw >= t.kw * t.dw || th % t.dh != 0 || tw % t.dw != 0) return Acc(0);
    return Cvt<T, Acc>::load(weight[c * t.taps() + kf * t.w_sf + (th / t.dh) * t.w_sh + (tw / t.dw) * t.w_sw]);
  }

  RK_HD Acc load_b(int64_t c, int64_t k, int64_t j) const {
    const int64_t kf = k / q_size(), q = k % q_size();
    const int64_t n = j / f_dst(), fd = j % f_dst();
    int64_t fs;
    if (trans) {
      const int64_t num = fd + t.pf - kf * t.df;
      if (num < 0 || num % t.sf != 0) return Acc(0);
      fs = num / t.sf;
    } else {
      fs = fd * t.sf - t.pf + kf * t.df;
      if (fs < 0) return Acc(0);
    }
    if (fs >= f_src_size()) return Acc(0);
    const int64_t* s = s_src();
    return Cvt<T, Acc>::load(src[n * s[0] + c * s[1] + fs * s[2] + (q / src_w()) * s[3] + (q % src_w()) * s[4]]);
  }

  RK_HD void store(int64_t c, int64_t r, int64_t j, Acc v) const {
    const int64_t n = j / f_dst(), fd = j % f_dst();
    if (bias != nullptr) v += Cvt<T, Acc>::load(bias[c]);
    const int64_t* s = s_dst();
    dst[n * s[0] + c * s[1] + fd * s[2] + (r / dst_w()) * s[3] + (r % dst_w()) * s[4]] = Cvt<T, Acc>::store(v);
  }
};

// Weight gradient, stage 1: ws[c·kf + kf][o][i] = Σ_j gy[o, j] · x[i, shifted j]. Batches: (c, kf).
template <typename T_, typename Acc_>
struct ToeplitzCross {
  using T = T_;
  using Acc = Acc_;
  ToeplitzParams t;
  const T* grad;
  const T* input;
  Acc* ws;

  RK_HD int64_t batches() const { return t.c * t.kf; }
  RK_HD int64_t M() const { return t.out_plane(); }
  RK_HD int64_t N() const { return t.in_plane(); }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return t.n * t.f_out; }

  RK_HD Acc load_a(int64_t b, int64_t o, int64_t j) const {
    const int64_t c = b / t.kf, n = j / t.f_out, f = j % t.f_out;
    const int64_t* s = t.y_s;
    return Cvt<T, Acc>::load(grad[n * s[0] + c * s[1] + f * s[2] + (o / t.out_w) * s[3] + (o % t.out_w) * s[4]]);
  }

  RK_HD Acc load_b(int64_t b, int64_t j, int64_t i) const {
    const int64_t c = b / t.kf, kf = b % t.kf, n = j / t.f_out, f = j % t.f_out;
    const int64_t fi = f * t.sf - t.pf + kf * t.df;
    if (fi < 0 || fi >= t.f_in) return Acc(0);
    const int64_t* s = t.x_s;
    return Cvt<T, Acc>::load(input[n * s[0] + c * s[1] + fi * s[2] + (i / t.in_w) * s[3] + (i % t.in_w) * s[4]]);
  }

  RK_HD void store(int64_t b, int64_t o, int64_t i, Acc v) const { ws[(b * M() + o) * N() + i] = v; }
};

// Weight gradient, stage 2: gw[c, kf, t] = Σ_o ws[c·kf + kf][o][i(o, t)] (M = 1, a reduction over o).
template <typename T_, typename Acc_>
struct ToeplitzDiagonal {
  using T = T_;
  using Acc = Acc_;
  ToeplitzParams t;
  const Acc* ws;
  T* grad_weight;  // (C, 1, KH, KW) contiguous

  RK_HD int64_t batches() const { return t.c * t.kf; }
  RK_HD int64_t M() const { return 1; }
  RK_HD int64_t N() const { return t.kh * t.kw; }
  RK_HD int64_t k_begin(int64_t) const { return 0; }
  RK_HD int64_t k_end(int64_t) const { return t.out_plane(); }

  RK_HD Acc load_a(int64_t, int64_t, int64_t) const { return Acc(1); }

  RK_HD Acc load_b(int64_t b, int64_t o, int64_t tap) const {
    const int64_t ih = (o / t.out_w) * t.sh - t.ph + (tap / t.kw) * t.dh;
    const int64_t iw = (o % t.out_w) * t.sw - t.pw + (tap % t.kw) * t.dw;
    if (ih < 0 || ih >= t.in_h || iw < 0 || iw >= t.in_w) return Acc(0);
    return ws[(b * t.out_plane() + o) * t.in_plane() + ih * t.in_w + iw];
  }

  RK_HD void store(int64_t b, int64_t, int64_t tap, Acc v) const {
    const int64_t c = b / t.kf, kf = b % t.kf;
    grad_weight[c * t.taps() + kf * t.w_sf + (tap / t.kw) * t.w_sh + (tap % t.kw) * t.w_sw] = Cvt<T, Acc>::store(v);
  }
};

}  // namespace rk::dw
