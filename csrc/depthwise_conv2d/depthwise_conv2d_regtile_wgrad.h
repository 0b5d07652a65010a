// Register-tiled depthwise conv2d weight gradient (RtWgradTile), written once for the CUDA kernel
// (depthwise_conv2d_kernel.cu) and its CPU emulation (depthwise_conv2d.cpp).
//
// dW[c, i, j] = Σ_{n, oh, ow} go[n, c, oh, ow] · x[n, c, oh·sh − ph + i·dh, ow·sw − pw + j·dw], in the
// unit-step phases of RtTile along W (ow = ρ + R·u, j = σ + S·m: input column (u + m)·L + ρ·sw + σ·dw − pw).
// Block (c, split) owns channel c and a contiguous slice of the grad_out tiles (n, ρ, kTileH x kTileW
// positions u). Per chunk of taps (phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mc)):
//   for each tile of the slice:
//     stage:   the input window (zero outside the image) and the grad_out tile (zero outside) into
//              shared memory, as Acc, both with stage_window (RtTile's staging)
//     barrier
//     compute: thread = (tap micro-tile of kTI x kTJ taps, group g); group g takes the units (one grad_out
//              row, kSeg positions) g, g + G, ...: per tap row a window of kTJ + 4 inputs in registers slides
//              by 4 positions per step (one 16-byte load), the 4 grad_out values are one 16-byte load
//     barrier
//   reduce:    the groups' sums meet in shared memory; one thread per tap adds them up and writes
//              ws[c][split][tap]
// The host sums the workspace over the splits (deterministic, no atomics).
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_regtile.h"

namespace rk::dw {

template <int TileH, int TileW, int Seg>
struct RtWgradShapeT {
  static constexpr int kThreads = 128;
  static constexpr int kMinBlocks = 4;
  static constexpr int kTI = 2;   // tap rows per thread
  static constexpr int kTJ = 8;   // phase taps per thread
  static constexpr int kTileH = TileH;
  static constexpr int kTileW = TileW;
  static constexpr int kSeg = Seg;  // positions per unit
  static_assert(kSeg % 4 == 0 && kTileW % kSeg == 0, "16-byte steps, whole units");
  static constexpr int kUnits = kTileH * (kTileW / kSeg);
  static constexpr int kAcc = kTI * kTJ;

  // kc tap rows and mc phase taps, padded to whole micro-tiles
  RK_HD static int rows_p(int kc) { return (kc + kTI - 1) / kTI * kTI; }
  RK_HD static int cols_p(int mc) { return (mc + kTJ - 1) / kTJ * kTJ; }
  RK_HD static int tap_tiles(int kc, int mc) { return rows_p(kc) / kTI * (cols_p(mc) / kTJ); }
  RK_HD static int in_rows(int sh, int dh, int kc) { return (kTileH - 1) * sh + (rows_p(kc) - 1) * dh + 1; }
  RK_HD static int in_cols(int mc) { return kTileW + cols_p(mc); }
  RK_HD static int64_t smem_elems(int sh, int dh, int kc, int mc) {
    const int64_t stage = int64_t(in_rows(sh, dh, kc)) * in_cols(mc) + kTileH * kTileW;
    return stage > kThreads * kAcc ? stage : kThreads * kAcc;
  }
};

// 8 x 64 grad_out positions per tile, units of 16; small maps (grad_out plane within 16 x 16, after
// transposing a kh x 1 filter): 16 x 16 per tile, units of 8 (32 units, as many as the large tile has).
using RtWgradShape = RtWgradShapeT<8, 64, 16>;
using RtWgradSmall = RtWgradShapeT<16, 16, 8>;

// Weight-gradient plan: RtParams geometry (kc, mc the tap chunk) plus the split of the tiles.
struct RtWgradParams {
  RtParams g;
  int tiles;  // grad_out tiles in all: n x R x tiles_h x tiles_w
  int splits, tiles_per_split;
  int n;
  int small;  // 1: RtWgradSmall (g planned transposed for a kh x 1 filter), 0: RtWgradShape
};

// The compute step of the weight-gradient tiles for one thread: tap micro-tile tt (kTI x kTJ taps) of a chunk of kc
// tap rows and mt phase taps, position group g of `groups`, over the staged input window `win` (in_rows x in_cols)
// and the grad_out tile (kTileH x kTileW) right after it of one channel; adds into acc[kAcc].
template <typename Shape, typename Acc>
RK_HD void accumulate_wgrad_units(const RtParams& q, int kc, int mt, int g, int groups, int tt, const Acc* win,
                                  Acc* acc) {
  const int tiles_j = Shape::cols_p(mt) / Shape::kTJ;
  const int ti0 = tt / tiles_j * Shape::kTI, tj0 = tt % tiles_j * Shape::kTJ;
  const int cols = Shape::in_cols(mt);
  const Acc* s_go = win + Shape::in_rows(q.sh, q.dh, kc) * cols;
#if defined(__CUDACC__)
#pragma unroll 1
#endif
  for (int unit = g; unit < Shape::kUnits; unit += groups) {
    const int py = unit / (Shape::kTileW / Shape::kSeg);
    const int s0 = unit % (Shape::kTileW / Shape::kSeg) * Shape::kSeg;
    const Acc* g_row = s_go + py * Shape::kTileW + s0;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int ti = 0; ti < Shape::kTI; ++ti) {
      const Acc* x = win + (py * q.sh + (ti0 + ti) * q.dh) * cols + s0 + tj0;
      Acc w4[Shape::kTJ + 4];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int v = 0; v < Shape::kTJ / 4; ++v) ld4(x + 4 * v, w4 + 4 * v);
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int st = 0; st < Shape::kSeg / 4; ++st) {
        ld4(x + Shape::kTJ + 4 * st, w4 + Shape::kTJ);
        Acc g4[4];
        ld4(g_row + 4 * st, g4);
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int qq = 0; qq < 4; ++qq) {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int jj = 0; jj < Shape::kTJ; ++jj) acc[ti * Shape::kTJ + jj] += g4[qq] * w4[qq + jj];
        }
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int k = 0; k < Shape::kTJ; ++k) w4[k] = w4[k + 4];
      }
    }
  }
}

// What the weight-gradient tiles (RtWgradTile, RtWgradClTile) share: the grad_out tiles of a block's split (Block has
// `split`) and the first phase of the reduction.
template <typename Shape>
struct WgradSplitTile {
  template <typename Block>
  RK_HD static int first_tile(const RtWgradParams& w, const Block& b) { return b.split * w.tiles_per_split; }
  template <typename Block>
  RK_HD static int end_tile(const RtWgradParams& w, const Block& b) {
    const int e = (b.split + 1) * w.tiles_per_split;
    return e < w.tiles ? e : w.tiles;
  }

  // Reduction, phase 1 (after a barrier): each thread's sums into red[tid][kAcc] (shared memory).
  template <typename Acc>
  RK_HD static void spill(int tid, const Acc* acc, Acc* red) {
    for (int k = 0; k < Shape::kAcc; ++k) red[tid * Shape::kAcc + k] = acc[k];
  }
};

template <typename T, typename Acc, typename Shape_ = RtWgradShape>
struct RtWgradTile : WgradSplitTile<Shape_> {
  using Shape = Shape_;

  struct Block {
    int64_t c;
    int split;
  };

  RK_HD static Block coord(const RtWgradParams& w, int64_t block) {
    return Block{block / w.splits, int(block % w.splits)};
  }

  // Tile `tile` (over n, ρ, tiles_h, tiles_w), tap chunk (σ, i0, kc, m0, mt).
  RK_HD static void stage(const RtWgradParams& w, const Block& b, int tile, int sigma, int i0, int kc, int m0, int mt,
                          int tid, const T* __restrict__ input, const T* __restrict__ grad_out, Acc* smem) {
    const RtParams& q = w.g;
    const int tw = tile % q.tiles_w;
    int k = tile / q.tiles_w;
    const int th = k % q.tiles_h;
    k /= q.tiles_h;
    const int rho = k % q.R;
    const int64_t n = k / q.R;
    const int oh0 = th * Shape::kTileH, u0 = tw * Shape::kTileW;
    const int rows = Shape::in_rows(q.sh, q.dh, kc);
    const int cols = Shape::in_cols(mt);
    const int ih0 = oh0 * q.sh - q.ph + i0 * q.dh;
    const int iw0 = (u0 + m0) * q.L + rho * q.sw + sigma * q.dw - q.pw;
    stage_window<Shape::kThreads>(input_src(q), input + n * q.in_n + b.c * q.in_c, ih0, iw0, rows, cols, tid, smem);
    stage_window<Shape::kThreads>(StageSrc{q.oh, q.ow, q.out_h, q.out_w, q.R}, grad_out + n * q.out_n + b.c * q.out_c,
                                  oh0, rho + q.R * u0, Shape::kTileH, Shape::kTileW, tid, smem + rows * cols);
  }

  RK_HD static void compute(const RtParams& q, const Block&, int kc, int mt, int tid, const Acc* smem,
                            Acc* acc /* [kAcc] */) {
    const int tap_tiles = Shape::tap_tiles(kc, mt);
    const int groups = Shape::kThreads / tap_tiles;
    const int g = tid / tap_tiles;
    if (g >= groups) return;
    accumulate_wgrad_units<Shape>(q, kc, mt, g, groups, tid - g * tap_tiles, smem, acc);
  }

  // Phase 2 (after a barrier): thread t < taps of the chunk sums the groups for its tap and writes
  // ws[c][split][kh x kw].
  RK_HD static void reduce(const RtWgradParams& w, const Block& b, int sigma, int i0, int kc, int m0, int mt, int tid,
                           const Acc* red, Acc* ws) {
    const RtParams& q = w.g;
    const int tiles_j = Shape::cols_p(mt) / Shape::kTJ;
    const int tap_tiles = Shape::tap_tiles(kc, mt);
    const int groups = Shape::kThreads / tap_tiles;
    Acc* out = ws + (b.c * w.splits + b.split) * q.kh * q.kw;
    for (int t = tid; t < kc * mt; t += Shape::kThreads) {
      const int i = t / mt, m = t % mt;
      const int tt = i / Shape::kTI * tiles_j + m / Shape::kTJ;
      const int k = i % Shape::kTI * Shape::kTJ + m % Shape::kTJ;
      Acc sum = Acc(0);
      for (int g = 0; g < groups; ++g) sum += red[(g * tap_tiles + tt) * Shape::kAcc + k];
      out[(i0 + i) * q.kw + sigma + (m0 + m) * q.S] = sum;
    }
  }
};

// Plans the register-tiled weight gradient of `p` (in_stride: input, out_stride: grad_out) over about
// `target_blocks` blocks; false when no chunk fits (huge strides) or offsets exceed 32 bits.
template <typename S>
inline bool plan_rt_wgrad_shape(const Params& p, RtWgradParams& w, int64_t target_blocks) {
  RtParams& q = w.g;
  Params f = p;
  if (!plan_rt<RtShape<8, 2, 4, 8>>(f, q, 0)) return false;  // geometry, phases and 32-bit checks (tile 8 x 64)
  int64_t kc = p.kh, mc = cdiv(p.kw, q.S);
  auto fits = [&](int64_t kc_, int64_t mc_) {
    return S::smem_elems(q.sh, q.dh, int(kc_), int(mc_)) <= kSmemBudgetElems &&
           S::tap_tiles(int(kc_), int(mc_)) <= S::kThreads;
  };
  while (kc > S::kTI && !fits(kc, mc)) kc = imax(S::kTI, cdiv(kc, 2 * S::kTI) * S::kTI);
  while (mc > S::kTJ && !fits(kc, mc)) mc = imax(S::kTJ, cdiv(mc, 2 * S::kTJ) * S::kTJ);
  if (!fits(kc, mc)) return false;
  while (kc < p.kh && fits(kc + S::kTI, mc) && (kc + S::kTI <= p.kh)) kc += S::kTI;
  q.kc = int(kc);
  q.mc = int(mc);
  q.tiles_h = int(cdiv(p.oh, S::kTileH));
  q.tiles_w = int(cdiv(cdiv(p.ow, q.R), S::kTileW));
  const int64_t tiles = p.n * q.R * int64_t(q.tiles_h) * q.tiles_w;
  if (tiles >= (int64_t(1) << 31)) return false;
  const int64_t splits = imax(1, imin(cdiv(target_blocks, imax(p.c, 1)), tiles));
  w.tiles = int(tiles);
  w.tiles_per_split = int(imax(1, cdiv(tiles, splits)));
  w.splits = int(imax(1, cdiv(tiles, w.tiles_per_split)));
  w.n = int(p.n);
  return true;
}

// The weight-gradient plan: RtWgradSmall when `allow_small` and the grad_out plane (a kh x 1 filter's
// transposed) fits in one of its tiles, else RtWgradShape.
inline bool plan_rt_wgrad(const Params& p, RtWgradParams& w, int64_t target_blocks, bool allow_small = true) {
  if (allow_small) {
    const Params t = as_planned(p);
    if (plan_rt_wgrad_shape<RtWgradSmall>(t, w, target_blocks) && w.g.tiles_h == 1 && w.g.tiles_w == 1) {
      w.small = 1;
      return true;
    }
  }
  w.small = 0;
  return plan_rt_wgrad_shape<RtWgradShape>(p, w, target_blocks);
}

// Whether `w` plans the channels_last tile (RtWgradClTile, depthwise_conv2d_cl_wgrad.h: w.g.sm_planes channels a
// block); the other plans leave w.g.cl_in and cl_out at 0.
inline bool is_cl_wgrad(const RtWgradParams& w) { return w.g.cl_in != 0 && w.g.cl_out != 0; }

// Blocks of plan `w`: one per channel and split, or per channel vector and split (is_cl_wgrad).
inline int64_t num_rt_wgrad_blocks(const Params& p, const RtWgradParams& w) {
  if (is_cl_wgrad(w)) return cdiv(p.c, int64_t(w.g.sm_planes)) * w.splits;
  return p.c * w.splits;
}

}  // namespace rk::dw
