// Depthwise conv2d forward, kDirect (no staging: every tap read from global memory, each thread owning
// Shape::kRows outputs of one column), for the problems the register tiles (depthwise_conv2d_regtile.h)
// cannot stage: huge strides or dilations, planes beyond 32-bit offsets. Written once for the CUDA
// kernel (depthwise_conv2d_kernel.cu) and its CPU emulation (depthwise_conv2d.cpp).
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_params.h"

namespace rk::dw {

struct BlockCoord {
  int64_t n, c, oh0, ow0;
};

template <typename T, typename Acc, typename Shape>
struct FwdTile {
  RK_HD static BlockCoord coord(const Params& p, int64_t block) {
    BlockCoord b;
    const int64_t tw = block % p.tiles_w;
    block /= p.tiles_w;
    const int64_t th = block % p.tiles_h;
    block /= p.tiles_h;
    b.c = block % p.c;
    b.n = block / p.c;
    b.oh0 = th * Shape::kTileH;
    b.ow0 = tw * Shape::kTileW;
    return b;
  }

  RK_HD static void direct(const Params& p, const BlockCoord& b, int tid, const T* __restrict__ input,
                           const T* __restrict__ weight, Acc* acc /* [Shape::kRows] */) {
    const int tx = tid % Shape::kThreadsW;
    const int ty = tid / Shape::kThreadsW;
    const T* plane = input + b.n * p.in_stride[0] + b.c * p.in_stride[1];
    const T* w = weight + b.c * p.kh * p.kw;
    const int64_t iw_base = (b.ow0 + tx) * p.sw - p.pw;
    for (int r = 0; r < Shape::kRows; ++r) {
      const int64_t ih_base = (b.oh0 + ty * Shape::kRows + r) * p.sh - p.ph;
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t ih = ih_base + i * p.dh;
        if (ih < 0 || ih >= p.h) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          const int64_t iw = iw_base + j * p.dw;
          if (iw < 0 || iw >= p.w) continue;
          acc[r] += Cvt<T, Acc>::load(plane[ih * p.in_stride[2] + iw * p.in_stride[3]]) *
                    Cvt<T, Acc>::load(w[i * p.kw + j]);
        }
      }
    }
  }

  RK_HD static void store(const Params& p, const BlockCoord& b, int tid, const Acc* acc,
                          const T* __restrict__ bias, T* __restrict__ output) {
    const int tx = tid % Shape::kThreadsW;
    const int ty = tid / Shape::kThreadsW;
    const int64_t ow = b.ow0 + tx;
    if (ow >= p.ow) return;
    const Acc bv = bias != nullptr ? Cvt<T, Acc>::load(bias[b.c]) : Acc(0);
    T* plane = output + b.n * p.out_stride[0] + b.c * p.out_stride[1];
    for (int r = 0; r < Shape::kRows; ++r) {
      const int64_t oh = b.oh0 + ty * Shape::kRows + r;
      if (oh < p.oh) plane[oh * p.out_stride[2] + ow * p.out_stride[3]] = Cvt<T, Acc>::store(acc[r] + bv);
    }
  }
};

}  // namespace rk::dw
