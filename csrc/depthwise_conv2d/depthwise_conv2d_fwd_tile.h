// Depthwise conv2d forward, one output tile per thread block: the three phases of the kernel,
// written once for the CUDA kernel (depthwise_conv2d_kernel.cu) and its CPU emulation
// (depthwise_conv2d.cpp).
//
//   for each chunk of kernel taps (kc rows x kwc cols):
//     stage:   the block copies the input window the chunk needs (zero outside the image) and the
//              chunk's taps into shared memory, converted to the accumulation type
//     barrier
//     compute: each thread accumulates its kRows outputs (one column) over the chunk's taps
//     barrier
//   store:     each thread adds the bias and writes its outputs
//
// (kDirect skips staging: `direct` reads every tap from global memory.)
//
// Staging loads are spread over consecutive threads along W (coalesced for NCHW). The kernel is
// direct (no im2col buffer): the implicit-GEMM view is M = tile outputs, K = taps, with the
// filter chunk broadcast from shared memory.
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

  RK_HD static void stage(const Params& p, const BlockCoord& b, int64_t kh0, int64_t kw0, int tid,
                          const T* __restrict__ input, const T* __restrict__ weight, Acc* smem) {
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    const int64_t rows = Shape::in_rows(p, kc);
    const int64_t cols = Shape::in_cols(p, kwc);
    const int64_t ih0 = b.oh0 * p.sh - p.ph + kh0 * p.dh;
    const int64_t iw0 = b.ow0 * p.sw - p.pw + kw0 * p.dw;
    const T* plane = input + b.n * p.in_stride[0] + b.c * p.in_stride[1];
    for (int64_t i = tid; i < rows * cols; i += Shape::kThreads) {
      const int64_t ih = ih0 + i / cols;
      const int64_t iw = iw0 + i % cols;
      Acc v = Acc(0);
      if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w) {
        v = Cvt<T, Acc>::load(plane[ih * p.in_stride[2] + iw * p.in_stride[3]]);
      }
      smem[i] = v;
    }
    Acc* s_w = smem + rows * cols;
    const T* w = weight + b.c * p.kh * p.kw;
    for (int64_t i = tid; i < kc * kwc; i += Shape::kThreads) {
      s_w[i] = Cvt<T, Acc>::load(w[(kh0 + i / kwc) * p.kw + kw0 + i % kwc]);
    }
  }

  RK_HD static void compute(const Params& p, int64_t kh0, int64_t kw0, int tid, const Acc* smem,
                            Acc* acc /* [Shape::kRows] */) {
    const int64_t kc = imin(p.kh_chunk, p.kh - kh0);
    const int64_t kwc = imin(p.kw_chunk, p.kw - kw0);
    const int64_t rows = Shape::in_rows(p, kc);
    const int64_t cols = Shape::in_cols(p, kwc);
    const Acc* s_w = smem + rows * cols;
    const int tx = tid % Shape::kThreadsW;
    const int ty = tid / Shape::kThreadsW;
    const Acc* s_col = smem + (int64_t)ty * Shape::kRows * p.sh * cols + tx * p.sw;
    for (int64_t i = 0; i < kc; ++i) {
      const Acc* s_row = s_col + i * p.dh * cols;
      for (int64_t j = 0; j < kwc; ++j) {
        const Acc wv = s_w[i * kwc + j];
        const Acc* s_tap = s_row + j * p.dw;
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int r = 0; r < Shape::kRows; ++r) acc[r] += s_tap[r * p.sh * cols] * wv;
      }
    }
  }

  // kDirect: no staging, every tap read from global memory.
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
