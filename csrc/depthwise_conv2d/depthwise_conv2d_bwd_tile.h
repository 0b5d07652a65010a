// Depthwise conv2d backward, written once for the CUDA kernels (depthwise_conv2d_kernel.cu) and their
// CPU emulation (depthwise_conv2d.cpp).
//
// Input gradient (dgrad): the host splits it into forward problems run by the register tiles (see
// dgrad_classes() in depthwise_conv2d.cpp).
//
// Weight gradient (wgrad): RtWgradTile (depthwise_conv2d_regtile_wgrad.h); WgradTile below (kDirect: every
// product read from global memory, threads owning kTaps taps each, blocks (c, split) owning a slice of the
// grad_out tiles, per-split sums into ws[c][split][tap]) serves the strides no staged window fits.
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_fwd_tile.h"
#include "depthwise_conv2d/depthwise_conv2d_params.h"

namespace rk::dw {

// In WgradTile, `Params` describes the forward problem: in_stride are the strides of the input,
// out_stride those of grad_out.

template <typename T, typename Acc>
struct WgradTile {
  using Shape = WgradShape;

  struct Block {
    int64_t c, split;
  };

  RK_HD static Block coord(const Params& p, int64_t block) { return Block{block / p.splits, block % p.splits}; }

  RK_HD static int64_t first_tile(const Params& p, const Block& b) { return b.split * p.tiles_per_split; }
  RK_HD static int64_t end_tile(const Params& p, const Block& b) {
    return imin((b.split + 1) * p.tiles_per_split, p.n * p.tiles_h * p.tiles_w);
  }

  // grad_out tile `tile` (flattened over n, tiles_h, tiles_w) -> (n, oh0, ow0)
  RK_HD static void tile_origin(const Params& p, int64_t tile, int64_t& n, int64_t& oh0, int64_t& ow0) {
    ow0 = (tile % p.tiles_w) * Shape::kTileW;
    tile /= p.tiles_w;
    oh0 = (tile % p.tiles_h) * Shape::kTileH;
    n = tile / p.tiles_h;
  }

  // kDirect: no staging; the thread reads its taps' inputs and the tile's grad_out from global memory.
  RK_HD static void direct(const Params& p, const Block& b, int64_t tile, int64_t kh0, int64_t kw0, int tid,
                           const T* __restrict__ input, const T* __restrict__ grad_out, Acc* acc) {
    int64_t n, oh0, ow0;
    tile_origin(p, tile, n, oh0, ow0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const T* plane = input + n * p.in_stride[0] + b.c * p.in_stride[1];
    const T* go = grad_out + n * p.out_stride[0] + b.c * p.out_stride[1];
    for (int k = 0; k < Shape::kTaps; ++k) {
      const int64_t t = tid + (int64_t)k * Shape::kThreads;
      if (t >= kc * kwc) break;
      const int64_t i = kh0 + t / kwc, j = kw0 + t % kwc;
      Acc sum = Acc(0);
      for (int64_t oh = oh0; oh < imin(oh0 + Shape::kTileH, p.oh); ++oh) {
        const int64_t ih = oh * p.sh - p.ph + i * p.dh;
        if (ih < 0 || ih >= p.h) continue;
        for (int64_t ow = ow0; ow < imin(ow0 + Shape::kTileW, p.ow); ++ow) {
          const int64_t iw = ow * p.sw - p.pw + j * p.dw;
          if (iw < 0 || iw >= p.w) continue;
          sum += Cvt<T, Acc>::load(go[oh * p.out_stride[2] + ow * p.out_stride[3]]) *
                 Cvt<T, Acc>::load(plane[ih * p.in_stride[2] + iw * p.in_stride[3]]);
        }
      }
      acc[k] += sum;
    }
  }

  // Tap sums of this block's slice for the chunk at (kh0, kw0) into ws[c][split][kh * kw].
  RK_HD static void write(const Params& p, const Block& b, int64_t kh0, int64_t kw0, int tid, const Acc* acc, Acc* ws) {
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    Acc* out = ws + (b.c * p.splits + b.split) * p.kh * p.kw;
    for (int k = 0; k < Shape::kTaps; ++k) {
      const int64_t t = tid + (int64_t)k * Shape::kThreads;
      if (t >= kc * kwc) break;
      out[(kh0 + t / kwc) * p.kw + kw0 + t % kwc] = acc[k];
    }
  }
};

}  // namespace rk::dw
