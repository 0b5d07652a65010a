// Problem description and launch plan of the depthwise conv2d kernels (plain data: included by the
// .cu kernels, the host code and the CPU emulation alike).
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace rk::dw {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward kernels: kRegTile (RtTile, depthwise_conv2d_regtile.h: register tiles over a staged window);
// kDirect (FwdTile::direct: every tap from global memory) serves what the staged window cannot (huge
// strides or dilations, planes beyond 32-bit offsets). kWide: the staged weight-gradient tile (WgradShape).
enum class TileConfig : int { kWide = 0, kDirect = 2, kRegTile = 3 };

struct Params {
  // input (N, C, H, W) and output (N, C, OH, OW); any strides (NCHW, channels_last, views)
  int64_t n, c, h, w, oh, ow;
  int64_t kh, kw;  // weight (C, 1, KH, KW), contiguous
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t in_stride[4];
  int64_t out_stride[4];
  int64_t elem_bytes;  // bytes of one element of the storage type (the planners size 16-byte vectors with it)
  // kDirect and wgrad plan (plan_direct(), plan_wgrad()): taps staged per pass, output tiles per plane
  TileConfig config;
  int64_t kh_chunk, kw_chunk;
  int64_t tiles_h, tiles_w;
  // wgrad plan (plan_wgrad()): blocks per channel, grad_out tiles per block
  int64_t splits, tiles_per_split;
};

template <int ThreadsW, int ThreadsH, int Rows>
struct TileShape {
  static constexpr int kThreadsW = ThreadsW;
  static constexpr int kThreadsH = ThreadsH;
  static constexpr int kRows = Rows;
  static constexpr int kThreads = ThreadsW * ThreadsH;
  static constexpr int kTileW = ThreadsW;
  static constexpr int kTileH = ThreadsH * Rows;
};

// kDirect: 16 x 32 outputs, 256 threads each owning 2 outputs of one column.
using WideTile = TileShape<32, 8, 2>;

// Shared-memory budget of one block, in accumulator elements (48 KiB of fp32: no opt-in needed).
constexpr int64_t kSmemBudgetElems = 12 * 1024;

// kDirect plan of the forward problem `p`.
inline void plan_direct(Params& p) {
  p.config = TileConfig::kDirect;
  p.kh_chunk = p.kh;
  p.kw_chunk = p.kw;
  p.tiles_h = cdiv(p.oh, WideTile::kTileH);
  p.tiles_w = cdiv(p.ow, WideTile::kTileW);
}

inline int64_t num_blocks(const Params& p) { return p.n * p.c * p.tiles_h * p.tiles_w; }

// Weight gradient tiles (WgradTile): kTileH x kTileW grad_out positions staged per step, kThreads
// threads each owning up to kTaps taps of the current chunk.
struct WgradShape {
  static constexpr int kThreads = 256;
  static constexpr int kTaps = 4;
  static constexpr int kTileH = 8;
  static constexpr int kTileW = 32;
  static constexpr int64_t kMaxChunkTaps = int64_t(kThreads) * kTaps;

  RK_HD static int64_t in_rows(const Params& p, int64_t kc) { return (kTileH - 1) * p.sh + (kc - 1) * p.dh + 1; }
  RK_HD static int64_t in_cols(const Params& p, int64_t kwc) { return (kTileW - 1) * p.sw + (kwc - 1) * p.dw + 1; }
  RK_HD static int64_t smem_elems(const Params& p, int64_t kc, int64_t kwc) {
    return in_rows(p, kc) * in_cols(p, kwc) + kTileH * kTileW;
  }
};

// Weight gradient: tap chunks (<= kMaxChunkTaps taps, staged window within the shared-memory budget,
// else kDirect) and the split of each channel's grad_out tiles over `target_blocks` blocks in all.
inline void plan_wgrad(Params& p, int64_t target_blocks) {
  using S = WgradShape;
  int64_t kc = p.kh, kwc = p.kw;
  while (kc > 1 && kc * kwc > S::kMaxChunkTaps) kc = (kc + 1) / 2;
  while (kwc > 1 && kc * kwc > S::kMaxChunkTaps) kwc = (kwc + 1) / 2;
  while (kc > 1 && S::smem_elems(p, kc, kwc) > kSmemBudgetElems) kc = (kc + 1) / 2;
  while (kwc > 1 && S::smem_elems(p, kc, kwc) > kSmemBudgetElems) kwc = (kwc + 1) / 2;
  p.config = S::smem_elems(p, kc, kwc) <= kSmemBudgetElems ? TileConfig::kWide : TileConfig::kDirect;
  if (p.config == TileConfig::kWide) {  // grow back as far as the budgets allow
    while (kc < p.kh && (kc + 1) * kwc <= S::kMaxChunkTaps && S::smem_elems(p, kc + 1, kwc) <= kSmemBudgetElems) ++kc;
  }
  p.kh_chunk = kc;
  p.kw_chunk = kwc;
  p.tiles_h = cdiv(p.oh, S::kTileH);
  p.tiles_w = cdiv(p.ow, S::kTileW);
  const int64_t tiles = p.n * p.tiles_h * p.tiles_w;
  int64_t splits = imax(1, imin(cdiv(target_blocks, imax(p.c, 1)), tiles));
  p.tiles_per_split = imax(1, cdiv(tiles, splits));
  p.splits = imax(1, cdiv(tiles, p.tiles_per_split));
}

inline int64_t num_wgrad_blocks(const Params& p) { return p.c * p.splits; }

}  // namespace rk::dw
