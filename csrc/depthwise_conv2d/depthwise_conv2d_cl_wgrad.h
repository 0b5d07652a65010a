// Channels_last weight gradient (RtWgradClTile): RtWgradTile (depthwise_conv2d_regtile_wgrad.h) for a channels_last
// input whose grad_out is channels_last too, staging both operands as channel vectors (depthwise_conv2d_channels_last.h:
// 16-byte loads along C, lanes scattered into the channels' shared windows) instead of one element at stride C.
//
// Block (channel group, split): channels [c_lo, c_lo + G) with G = V = 16 / sizeof(T) (fp32 4, fp16/bf16 8; the
// last group of a C not a multiple of V holds fewer) and the split's contiguous slice of the grad_out tiles
// (n, kTileH x kTileW positions; one W phase). The 128 threads split over the channels: kTpc = 128 / V threads a
// channel (fp32 32, fp16/bf16 16), each a tap micro-tile (kTI x kTJ, as RtWgradTile) of one position group, fewer
// position groups than RtWgradTile's. Per chunk of taps (phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mc)):
//   for each tile of the slice:
//     stage:   the G input windows and the G grad_out tiles (zero outside the image / the grad_out plane), channel
//              ch's window then tile at smem + ch·chan_elems, with stage_channel_windows
//     barrier
//     compute: thread tid → channel tid / kTpc (idle past the group), then RtWgradTile's unit loop on its channel
//     barrier
//   reduce:    the position groups' sums meet in shared memory; one thread per (channel, tap) adds them up and writes
//              ws[c][split][tap]; the host sums over the splits (deterministic, no atomics)
//
// Tile rule: kTileH x kTileW = (32 / V) x 32 positions a channel, 1024 a block over its V channels (fp32 8 x 32, fp16
// and bf16 4 x 32), units of 8 positions (32 / 16 units a channel: at least as many as position groups). Shared
// memory: V windows + V tiles <= kClSmemBudgetElems (24 KB of fp32, as the forward's channel-group tiles; the
// reduction's 128 x kAcc = 8 KB fits in it), tap rows then phase taps chunked to fit it and kTpc tap micro-tiles;
// kMinBlocks = 4 (ptxas' register cap of 128), so 4 x 25 KB of an SM's shared memory at the bound.
// A kh x 1 filter is planned transposed (taps along the register window; the same ws layout).
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_channels_last.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile_wgrad.h"
#include "depthwise_conv2d/depthwise_conv2d_smallmap.h"

namespace rk::dw {

// RtWgradTile's geometry (threads, 2 x 8 tap micro-tiles, window and tile sizes) on (32 / V) x 32 positions in
// units of 8, plus the channels: kG a block, kTpc threads a channel, each channel's window and tile in shared memory.
template <int V>
struct RtWgradClShapeT : RtWgradShapeT<32 / V, 32, 8> {
  using Base = RtWgradShapeT<32 / V, 32, 8>;
  static constexpr int kG = V;                         // channels a block
  static constexpr int kTpc = Base::kThreads / V;      // threads a channel
  static_assert(Base::kThreads % V == 0 && 32 / V >= 1, "whole channels");

  // one channel's window and grad_out tile (a multiple of 8: 16-byte aligned channel regions)
  RK_HD static int chan_elems(int sh, int dh, int kc, int mc) {
    return Base::in_rows(sh, dh, kc) * Base::in_cols(mc) + Base::kTileH * Base::kTileW;
  }
  RK_HD static int64_t smem_elems(int sh, int dh, int kc, int mc) {
    const int64_t stage = int64_t(kG) * chan_elems(sh, dh, kc, mc);
    return stage > Base::kThreads * Base::kAcc ? stage : Base::kThreads * Base::kAcc;
  }
};

template <typename T>
using RtWgradClShape = RtWgradClShapeT<kVec<T>>;

template <typename T, typename Acc>
struct RtWgradClTile : WgradSplitTile<RtWgradClShape<T>> {
  using Shape = RtWgradClShape<T>;

  struct Block {
    int c_lo, G;  // channels [c_lo, c_lo + G)
    int split;
  };

  RK_HD static Block coord(const RtWgradParams& w, int64_t block) {
    Block b;
    const int group = int(block / w.splits);
    b.split = int(block - int64_t(group) * w.splits);
    b.c_lo = group * Shape::kG;
    b.G = w.g.c - b.c_lo < Shape::kG ? w.g.c - b.c_lo : Shape::kG;
    return b;
  }

  // Tile `tile` (over n, tiles_h, tiles_w), tap chunk (σ, i0, kc, m0, mt): the G windows and grad_out tiles.
  RK_HD static void stage(const RtWgradParams& w, const Block& b, int tile, int sigma, int i0, int kc, int m0, int mt,
                          int tid, const T* __restrict__ input, const T* __restrict__ grad_out, Acc* smem) {
    const RtParams& q = w.g;
    const int tw = tile % q.tiles_w;
    const int k = tile / q.tiles_w;
    const int th = k % q.tiles_h;
    const int64_t n = k / q.tiles_h;
    const int oh0 = th * Shape::kTileH, u0 = tw * Shape::kTileW;
    const int rows = Shape::in_rows(q.sh, q.dh, kc);
    const int cols = Shape::in_cols(mt);
    const int cs = Shape::chan_elems(q.sh, q.dh, kc, mt);
    const int ih0 = oh0 * q.sh - q.ph + i0 * q.dh;
    const int iw0 = (u0 + m0) * q.L + sigma * q.dw - q.pw;  // R = 1: ρ = 0
    stage_channel_windows<Shape::kThreads>(cl_input_src(q), input + n * q.in_n, b.c_lo, b.G, ih0, iw0, rows, cols, cs,
                                           tid, smem);
    stage_channel_windows<Shape::kThreads>(cl_output_src(q), grad_out + n * q.out_n, b.c_lo, b.G, oh0, u0,
                                           Shape::kTileH, Shape::kTileW, cs, tid, smem + rows * cols);
  }

  RK_HD static void compute(const RtParams& q, const Block& b, int kc, int mt, int tid, const Acc* smem,
                            Acc* acc /* [kAcc] */) {
    const int ch = tid / Shape::kTpc;
    if (ch >= b.G) return;
    const int t = tid - ch * Shape::kTpc;
    const int tap_tiles = Shape::tap_tiles(kc, mt);
    const int groups = Shape::kTpc / tap_tiles;
    const int g = t / tap_tiles;
    if (g >= groups) return;
    accumulate_wgrad_units<Shape>(q, kc, mt, g, groups, t - g * tap_tiles,
                                  smem + ch * Shape::chan_elems(q.sh, q.dh, kc, mt), acc);
  }

  // Phase 2 (after a barrier): item t < G·taps of the chunk (channel, tap) sums its channel's position groups and
  // writes ws[c][split][kh x kw].
  RK_HD static void reduce(const RtWgradParams& w, const Block& b, int sigma, int i0, int kc, int m0, int mt, int tid,
                           const Acc* red, Acc* ws) {
    const RtParams& q = w.g;
    const int tiles_j = Shape::cols_p(mt) / Shape::kTJ;
    const int tap_tiles = Shape::tap_tiles(kc, mt);
    const int groups = Shape::kTpc / tap_tiles;
    const int taps = kc * mt;
    for (int t = tid; t < b.G * taps; t += Shape::kThreads) {
      const int ch = t / taps, r = t - ch * taps;
      const int i = r / mt, m = r % mt;
      const int tt = i / Shape::kTI * tiles_j + m / Shape::kTJ;
      const int k = i % Shape::kTI * Shape::kTJ + m % Shape::kTJ;
      const Acc* src = red + (ch * Shape::kTpc + tt) * Shape::kAcc + k;
      Acc sum = Acc(0);
      for (int g = 0; g < groups; ++g) sum += src[g * tap_tiles * Shape::kAcc];
      Acc* out = ws + (int64_t(b.c_lo + ch) * w.splits + b.split) * q.kh * q.kw;
      out[(i0 + i) * q.kw + sigma + (m0 + m) * q.S] = sum;
    }
  }
};

// Why the channels_last weight-gradient tile does not apply to `p` (in_stride: input, out_stride: grad_out), or null.
inline const char* cl_wgrad_rejection(const Params& p) {
  const Params t = as_planned(p);
  RtParams g{};
  if (!plan_rt<RtShape<8, 2, 4, 8>>(t, g, 0)) return "no staged window fits (strides, dilations or 32-bit offsets)";
  if (g.R != 1) return "the problem has several W phases (dilation a multiple of the stride along W: R > 1)";
  if (p.c < 2) return "C = 1 (no channel vectors)";
  set_channels_last(t, g);
  if (!g.cl_in) return "`input` is not channels_last (channel stride 1, column stride > 1)";
  if (!g.cl_out) return "`grad` is not channels_last (channel stride 1, column stride > 1)";
  return nullptr;
}

// Plans RtWgradClTile with Shape S for `p` over about `target_blocks` blocks: false when it does not apply
// (cl_wgrad_rejection) or no tap chunk fits. Sets g.cl_in = g.cl_out = 1 (the launch's mark of this tile) and
// g.sm_planes = S::kG (channels a block).
template <typename S>
inline bool plan_cl_wgrad_shape(const Params& p0, RtWgradParams& w, int64_t target_blocks) {
  if (cl_wgrad_rejection(p0) != nullptr) return false;
  const Params p = as_planned(p0);
  RtParams& q = w.g;
  if (!plan_rt<RtShape<8, 2, 4, 8>>(p, q, 0)) return false;  // geometry, phases and 32-bit checks
  set_channels_last(p, q);
  int64_t kc = p.kh, mc = cdiv(p.kw, q.S);
  auto fits = [&](int64_t kc_, int64_t mc_) {
    return S::smem_elems(q.sh, q.dh, int(kc_), int(mc_)) <= kClSmemBudgetElems &&
           S::tap_tiles(int(kc_), int(mc_)) <= S::kTpc;
  };
  while (kc > S::kTI && !fits(kc, mc)) kc = imax(S::kTI, cdiv(kc, 2 * S::kTI) * S::kTI);
  while (mc > S::kTJ && !fits(kc, mc)) mc = imax(S::kTJ, cdiv(mc, 2 * S::kTJ) * S::kTJ);
  if (!fits(kc, mc)) return false;
  while (kc + S::kTI <= p.kh && fits(kc + S::kTI, mc)) kc += S::kTI;
  q.kc = int(kc);
  q.mc = int(mc);
  q.tiles_h = int(cdiv(p.oh, S::kTileH));
  q.tiles_w = int(cdiv(p.ow, S::kTileW));
  q.sm_planes = S::kG;
  const int64_t tiles = p.n * int64_t(q.tiles_h) * q.tiles_w;
  const int64_t groups = cdiv(p.c, S::kG);
  if (tiles >= (int64_t(1) << 31) || groups * tiles >= (int64_t(1) << 31)) return false;
  const int64_t splits = imax(1, imin(cdiv(target_blocks, imax(groups, 1)), tiles));
  w.tiles = int(tiles);
  w.tiles_per_split = int(imax(1, cdiv(tiles, splits)));
  w.splits = int(imax(1, cdiv(tiles, w.tiles_per_split)));
  w.n = int(p.n);
  w.small = 0;
  return true;
}

// The channels_last weight-gradient plan for the element size of `p` (V = 16 / elem_bytes channels a block).
inline bool plan_cl_wgrad(const Params& p, RtWgradParams& w, int64_t target_blocks) {
  switch (p.elem_bytes) {
    case 2: return plan_cl_wgrad_shape<RtWgradClShapeT<8>>(p, w, target_blocks);
    case 4: return plan_cl_wgrad_shape<RtWgradClShapeT<4>>(p, w, target_blocks);
    case 8: return plan_cl_wgrad_shape<RtWgradClShapeT<2>>(p, w, target_blocks);  // float64 (CPU emulation)
  }
  return false;
}

}  // namespace rk::dw
