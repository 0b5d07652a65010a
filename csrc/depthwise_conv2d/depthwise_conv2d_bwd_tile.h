// Depthwise conv2d backward, written once for the CUDA kernels (depthwise_conv2d_kernel.cu) and their
// CPU emulation (depthwise_conv2d.cpp).
//
// Input gradient (dgrad): the host splits it into forward problems run by the register tiles (see
// dgrad_classes() in depthwise_conv2d.cpp).
//
// Weight gradient (wgrad), WgradTile: dW[c, i, j] = Σ_{n, oh, ow} go[n, c, oh, ow] ·
// x[n, c, oh·s − p + i·d, ow·s − p + j·d]. Block (c, split) owns channel c and a contiguous slice
// of the grad_out tiles (kTileH x kTileW positions of one sample). Per chunk of taps (kh_chunk x
// kw_chunk <= kThreads · kTaps):
//   for each tile of the slice:
//     stage:   the block copies the input window of the tile and chunk (zero outside the image) and
//              the grad_out tile (zero outside) into shared memory, in the accumulation type
//     barrier
//     compute: each thread accumulates, for its kTaps taps (tap t = tid + k · kThreads), the products
//              over the tile's positions: a (taps x positions) implicit GEMM with K = positions
//     barrier
//   write:     each thread stores its tap sums into the fp32 workspace ws[c][split][tap]
// The host sums the workspace over the splits (deterministic second stage, no atomics).
// kDirect (WgradTile::direct) skips staging when not even one tap row fits in shared memory.
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

  RK_HD static void stage(const Params& p, const Block& b, int64_t tile, int64_t kh0, int64_t kw0, int tid,
                          const T* __restrict__ input, const T* __restrict__ grad_out, Acc* smem) {
    int64_t n, oh0, ow0;
    tile_origin(p, tile, n, oh0, ow0);
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    const int64_t rows = Shape::in_rows(p, kc);
    const int64_t cols = Shape::in_cols(p, kwc);
    const int64_t ih0 = oh0 * p.sh - p.ph + kh0 * p.dh;
    const int64_t iw0 = ow0 * p.sw - p.pw + kw0 * p.dw;
    const T* plane = input + n * p.in_stride[0] + b.c * p.in_stride[1];
    for (int64_t i = tid; i < rows * cols; i += Shape::kThreads) {
      const int64_t ih = ih0 + i / cols;
      const int64_t iw = iw0 + i % cols;
      Acc v = Acc(0);
      if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w) v = Cvt<T, Acc>::load(plane[ih * p.in_stride[2] + iw * p.in_stride[3]]);
      smem[i] = v;
    }
    Acc* s_go = smem + rows * cols;
    const T* go = grad_out + n * p.out_stride[0] + b.c * p.out_stride[1];
    for (int64_t i = tid; i < Shape::kTileH * Shape::kTileW; i += Shape::kThreads) {
      const int64_t oh = oh0 + i / Shape::kTileW;
      const int64_t ow = ow0 + i % Shape::kTileW;
      s_go[i] = (oh < p.oh && ow < p.ow) ? Cvt<T, Acc>::load(go[oh * p.out_stride[2] + ow * p.out_stride[3]]) : Acc(0);
    }
  }

  RK_HD static void compute(const Params& p, int64_t kh0, int64_t kw0, int tid, const Acc* smem,
                            Acc* acc /* [Shape::kTaps] */) {
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    const int64_t cols = Shape::in_cols(p, kwc);
    const Acc* s_go = smem + Shape::in_rows(p, kc) * cols;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < Shape::kTaps; ++k) {
      const int64_t t = tid + (int64_t)k * Shape::kThreads;
      if (t >= kc * kwc) break;
      const Acc* s_tap = smem + (t / kwc) * p.dh * cols + (t % kwc) * p.dw;
      Acc sum = Acc(0);
      for (int py = 0; py < Shape::kTileH; ++py) {
        const Acc* s_row = s_tap + py * p.sh * cols;
        const Acc* g_row = s_go + py * Shape::kTileW;
        for (int px = 0; px < Shape::kTileW; ++px) sum += g_row[px] * s_row[px * p.sw];
      }
      acc[k] += sum;
    }
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
