// Small-map register tiles (SmTile): the RtTile forward (depthwise_conv2d_regtile.h) for output maps too
// small to fill its 32 x 64 block. A block covers several whole planes, each plane (n, c, ρ) being one
// sample's channel and W output phase: the plane's outputs are a grid of tr x tc thread micro-tiles
// (kRH x kRW each, the shape RtTile uses for the same tap count), so one plane takes tpp = tr·tc threads
// and a block of kThreads holds P = kThreads / tpp planes (fewer when shared memory is short):
//
//   thread tid → plane pl = tid / tpp of the block (global plane block·P + pl), micro-tile (ty, tx) of it
//
//   for each tap phase σ, chunk of tap rows (kc) and chunk of phase taps (mc):
//     stage:   for each plane of the block, the block copies the plane's whole input window (zero outside
//              the image; stage_window, as RtTile) and its channel's taps into shared memory: P windows,
//              then P tap chunks; NCHW planes back to back in memory whose windows hold the whole plane
//              (the usual small map: the window is the plane plus its padding) in one pass for all P
//              planes instead (stage_planes, depthwise_conv2d_stage_planes.h)
//     barrier
//     compute: RtTile's inner loop on the thread's plane (sliding window of kRW + 4 inputs in
//              registers, 16-byte loads, 4-tap broadcasts)
//     barrier
//   store:     each thread adds its plane's bias and writes its outputs (store_outputs, as RtTile: 16-byte
//              vectors along contiguous aligned rows, else one by one)
//
// A kh x 1 filter is planned transposed (H and W swapped through the strides; the contiguous (kh, 1)
// taps are the same memory as (1, kh)), so that its taps run along the register window.
// Channels_last (channel stride 1, planes not contiguous) with one W phase (R = 1): the block's planes are
// consecutive channels of one sample, or of several (runs per sample, for_each_channel_run); the input windows
// are staged and the outputs stored as channel vectors (depthwise_conv2d_channels_last.h: 16-byte loads and
// stores along C, the outputs parked in the windows' shared memory between two barriers).
//
// Channel-group tiles (plan_channel_groups, REPKERNELS_DW_TILE=cl...): the same code for channels_last inputs whose
// output plane is too large for one block: a block holds G = V consecutive channels (one 16-byte vector) and one
// tile of tr x tc micro-tiles in each (tr·tc = kThreads / G: fp32 16 threads a plane, fp16/bf16 8), its origin
// (oh0, u0) in SmCoord; the tiles_h x tiles_w tiles of a plane are separate blocks, a tile's channel groups
// consecutive blocks. Shared memory: G windows + G tap chunks <= kClSmemBudgetElems (24 KB: 8 blocks of 64 threads
// per SM, as the launch bounds ask; the 48 KB of the other tiles would allow 4 with G windows), tap rows chunked (kc)
// to fit; the planner picks the tr x tc split that stages the fewest window elements over the plane.
//
// Planner rule (plan_small): the output plane needs tpp <= kThreads / 2 threads (the 32 x 64 RtTile
// would leave at least half its threads idle), at least 2 planes fit in shared memory per block. On channels_last
// with one W phase the planes per block are rounded down to a multiple of the vector V = 16 / sizeof(T) when
// there are more than V (whole vectors when C is a multiple of V too), before the tap chunks are sized.
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_channels_last.h"
#include "depthwise_conv2d/depthwise_conv2d_regtile.h"
#include "depthwise_conv2d/depthwise_conv2d_stage_planes.h"

namespace rk::dw {

// Compile-time tap counts of the small-map tile (after transposition): ConvNeXt 7x7, RepLKNet / ParCNetV2
// 13x13 and 13x1, ParCNetV2 27x1 (the (2H − 1) x 1 filter at 14 x 14); KW = 0 is the generic one.
// RepLKNet 31x31 on channels_last (channel-group tiles).
constexpr int kSmKernelSizes[] = {7, 13, 27, 31};

// REPKERNELS_DW_TILE / plan_forward() code of the small-map tiles: kSmallKernel + KW; of the channel-group tiles
// (the same kernels, planned by plan_channel_groups): kClKernel + KW.
constexpr int kSmallKernel = 1000;
constexpr int kClKernel = 2000;

template <int KW>
struct SmShape {
  static constexpr int kThreads = 64;
  static constexpr int kRH = RtShapeFor<KW>::type::kRH;
  static constexpr int kRW = RtShapeFor<KW>::type::kRW;
  static constexpr int kMinBlocks = 8;

  RK_HD static int steps(int mc) { return (mc + 3) / 4; }
  RK_HD static int in_rows(const RtParams& q, int kc) { return (q.sm_tr * kRH - 1) * q.sh + (kc - 1) * q.dh + 1; }
  RK_HD static int in_cols(const RtParams& q, int mc) { return q.sm_tc * kRW + 4 * steps(mc); }
  RK_HD static int win_elems(const RtParams& q, int kc, int mc) { return in_rows(q, kc) * in_cols(q, mc); }
  RK_HD static int tap_elems(int kc, int mc) { return kc * 4 * steps(mc); }
  RK_HD static int64_t smem_elems(const RtParams& q, int planes, int kc, int mc) {
    return int64_t(planes) * (int64_t(win_elems(q, kc, mc)) + tap_elems(kc, mc));
  }
};

struct SmCoord {
  int plane0, planes;  // first global plane of the block, planes it holds (the last block may hold fewer)
  int oh0, u0;         // origin of the block's tile in each plane (channel-group tiles; whole planes: 0, 0)
};

template <typename T, typename Acc, int KW>
struct SmTile {
  using Shape = SmShape<KW>;
  using Rt = RtTile<T, Acc, KW>;
  static constexpr int kRH = Shape::kRH;
  static constexpr int kRW = Shape::kRW;
  static_assert(kRH == Rt::kRH && kRW == Rt::kRW, "SmTile runs RtTile's micro-tile");

  // Block = tile t·groups + plane group (channel-group tiles: tiles_h x tiles_w tiles a plane; else one).
  RK_HD static SmCoord coord(const RtParams& q, int64_t block) {
    SmCoord b;
    uint32_t group = uint32_t(block), t = 0;
    b.oh0 = b.u0 = 0;
    if (q.tiles_h * q.tiles_w > 1) {
      const uint32_t groups = uint32_t(q.sm_nplanes + q.sm_planes - 1) / uint32_t(q.sm_planes);
      t = group / groups;
      group -= t * groups;
      const uint32_t th = t / uint32_t(q.tiles_w);
      b.oh0 = int(th) * (q.sm_tr * kRH);
      b.u0 = int(t - th * uint32_t(q.tiles_w)) * (q.sm_tc * kRW);
    }
    b.plane0 = int(group) * q.sm_planes;
    b.planes = q.sm_nplanes - b.plane0 < q.sm_planes ? q.sm_nplanes - b.plane0 : q.sm_planes;
    return b;
  }

  // Global plane k = (n·C + c)·R + ρ: the offsets of its input and output planes, its channel and phase.
  struct Plane {
    int64_t in_off, out_off;
    int c, rho;
  };
  RK_HD static Plane plane(const RtParams& q, int k) {
    Plane r;
    const uint32_t nc = uint32_t(k) / uint32_t(q.R);
    r.rho = k - int(nc) * q.R;
    const uint32_t n = nc / uint32_t(q.c);
    r.c = int(nc - n * uint32_t(q.c));
    r.in_off = int64_t(n) * q.in_n + int64_t(r.c) * q.in_c;
    r.out_off = int64_t(n) * q.out_n + int64_t(r.c) * q.out_c;
    return r;
  }

  // The window of tap chunk (σ, i0, kc, m0, mt) for planes of W phase ρ: first plane row and column, rows, columns.
  struct Window {
    int r0, c0, rows, cols;
  };
  RK_HD static Window window(const RtParams& q, int rho, int sigma, int i0, int kc, int m0, int mt) {
    Window v;
    v.r0 = -q.ph + i0 * q.dh;
    v.c0 = m0 * q.L + rho * q.sw + sigma * q.dw - q.pw;
    v.rows = Shape::in_rows(q, kc);
    v.cols = q.sm_tc * kRW + 4 * Rt::steps(mt);
    return v;
  }
  RK_HD static bool holds_plane(const RtParams& q, const Window& v) {
    return v.r0 <= 0 && v.r0 + v.rows >= q.h && v.c0 <= 0 && v.c0 + v.cols >= q.w;
  }

  // The block's planes in one pass (depthwise_conv2d_stage_planes.h) where q.sm_runs allows it and the chunk's
  // window holds the whole plane: the windows' padding, the planes' runs (one, or one per sample), the taps of
  // their channels (runs of whole filters when the chunk holds them). False, nothing staged, otherwise.
  RK_HD static bool stage_planes(const RtParams& q, const SmCoord& b, int sigma, int i0, int kc, int m0, int mt,
                                 int tid, const T* __restrict__ input, const T* __restrict__ weight, Acc* smem) {
    if (q.sm_runs == kSmRunsNone) return false;
    const Window v = window(q, 0, sigma, i0, kc, m0, mt);
    if (!holds_plane(q, v)) return false;
    constexpr int kThreads = Shape::kThreads;
    const int win = v.rows * v.cols;
    const int ra = -v.r0, ca = -v.c0;
    const int base = ra * v.cols + ca;
    zero_planes_outside<kThreads>(smem, b.planes, v.rows, v.cols, ra, ra + q.h, ca, ca + q.w, tid);
    const Plane first = plane(q, b.plane0);
    if (q.sm_runs == kSmRunsBlock) {
      stage_planes_run<kThreads>(input + first.in_off, b.planes, q.h, q.w, base, v.cols, win, smem, tid);
    } else {
      int64_t off = first.in_off;
      int c = first.c;
      for (int pl = 0; pl < b.planes;) {
        const int seg = q.c - c < b.planes - pl ? q.c - c : b.planes - pl;  // the planes left in this sample
        stage_planes_run<kThreads>(input + off, seg, q.h, q.w, base, v.cols, win, smem + pl * win, tid);
        pl += seg;
        off += q.in_n - int64_t(c) * q.in_c;
        c = 0;
      }
    }
    const int ns = Rt::steps(mt);
    Acc* const s_w = smem + b.planes * win;
    if (i0 == 0 && kc == q.kh && m0 == 0 && mt == q.kw && q.kw >= kVec<T> - 1)  // the whole filters (S = 1)
      stage_filter_runs<kThreads>(weight, first.c, q.c, b.planes, q.kh, q.kw, 4 * ns, tid, s_w);
    else
      stage_plane_taps<kThreads>(q, weight, first.c, b.planes, sigma, i0, kc, m0, mt, ns, tid, s_w);
    return true;
  }

  // Phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mt), every plane of the block.
  RK_HD static void stage(const RtParams& q, const SmCoord& b, int sigma, int i0, int kc, int m0, int mt, int tid,
                          const T* __restrict__ input, const T* __restrict__ weight, Acc* smem) {
    if (stage_planes(q, b, sigma, i0, kc, m0, mt, tid, input, weight, smem)) return;
    const int ns = Rt::steps(mt);
    const int cols = q.sm_tc * kRW + 4 * ns;
    const int rows = Shape::in_rows(q, kc);
    const int win = rows * cols;
    const int wp = 4 * ns;
    const int ih0 = b.oh0 * q.sh - q.ph + i0 * q.dh;
    Acc* s_w0 = smem + b.planes * win;
    if (q.cl_in) {
      const int iw0 = (b.u0 + m0) * q.L + sigma * q.dw - q.pw;  // R = 1: ρ = 0
      for_each_channel_run(q, b, [&](int64_t n, int c_lo, int G, int pl) {
        stage_channel_windows<Shape::kThreads>(cl_input_src(q), input + n * q.in_n, c_lo, G, ih0, iw0, rows, cols, win,
                                               tid, smem + pl * win);
      });
      for (int pl = 0; pl < b.planes; ++pl) {
        const int c = plane(q, b.plane0 + pl).c;
        stage_taps<Shape::kThreads>(q, weight + c * q.kh * q.kw, sigma, i0, kc, m0, mt, ns, tid, s_w0 + pl * kc * wp);
      }
      return;
    }
    for (int pl = 0; pl < b.planes; ++pl) {
      const Plane pc = plane(q, b.plane0 + pl);
      const int iw0 = (b.u0 + m0) * q.L + pc.rho * q.sw + sigma * q.dw - q.pw;
      stage_window<Shape::kThreads>(input_src(q), input + pc.in_off, ih0, iw0, rows, cols, tid, smem + pl * win);
      stage_taps<Shape::kThreads>(q, weight + pc.c * q.kh * q.kw, sigma, i0, kc, m0, mt, ns, tid, s_w0 + pl * kc * wp);
    }
  }

  // Channels_last, one W phase (R = 1: plane k = n·C + c): the block's planes as runs of consecutive channels of one
  // sample, f(n, c_lo, G, pl) for sample n, channels [c_lo, c_lo + G), block planes [pl, pl + G).
  template <typename F>
  RK_HD static void for_each_channel_run(const RtParams& q, const SmCoord& b, F&& f) {
    uint32_t n = uint32_t(b.plane0) / uint32_t(q.c);
    int c = b.plane0 - int(n * uint32_t(q.c));
    for (int pl = 0; pl < b.planes; ++n, c = 0) {
      const int G = q.c - c < b.planes - pl ? q.c - c : b.planes - pl;
      f(int64_t(n), c, G, pl);
      pl += G;
    }
  }

  // The thread's plane of the block (>= b.planes: idle) and micro-tile (ty, tx).
  RK_HD static void place(const RtParams& q, int tid, int& pl, int& ty, int& tx) {
    pl = tid / q.sm_tpp;
    const int t = tid - pl * q.sm_tpp;
    ty = t / q.sm_tc;
    tx = t - ty * q.sm_tc;
  }

  RK_HD static void compute(const RtParams& q, const SmCoord& b, int kc, int mt, int tid, const Acc* smem,
                            Acc* acc /* [kRH * kRW] */) {
    int pl, ty, tx;
    place(q, tid, pl, ty, tx);
    if (pl >= b.planes) return;
    const int ns = Rt::steps(mt);
    const int cols = q.sm_tc * kRW + 4 * ns;
    const int win = Shape::in_rows(q, kc) * cols;
    Rt::accumulate(q, kc, ns, cols, smem + pl * win + ty * kRH * q.sh * cols + tx * kRW,
                   smem + b.planes * win + pl * kc * 4 * ns, acc);
  }

  RK_HD static void store(const RtParams& q, const SmCoord& b, int tid, const Acc* acc, const T* __restrict__ bias,
                          T* __restrict__ output) {
    int pl, ty, tx;
    place(q, tid, pl, ty, tx);
    if (pl >= b.planes) return;
    const Plane pc = plane(q, b.plane0 + pl);
    const Acc bv = bias != nullptr ? Cvt<T, Acc>::load(bias[pc.c]) : Acc(0);
    store_outputs<T, Acc, kRH, kRW>(q, output + pc.out_off, b.oh0 + ty * kRH, pc.rho, b.u0 + tx * kRW, acc, bv);
  }

  // Channels_last output (q.cl_out, R = 1): park(), a barrier, store_parked() instead of store(). Plane pl's
  // outputs are parked at smem + pl·park_stride in rows of park_ld; the 4 elements past a plane's tile move the
  // next plane's lanes to other banks. The windows' space holds them: P·(tile + 4) <= P·window.
  static constexpr bool kChannelVectors = true;
  RK_HD static bool stores_channel_vectors(const RtParams& q) { return q.cl_out != 0; }
  RK_HD static int park_ld(const RtParams& q) { return q.sm_tc * kRW; }
  RK_HD static int park_stride(const RtParams& q) { return q.sm_tr * kRH * park_ld(q) + 4; }

  RK_HD static void park(const RtParams& q, const SmCoord& b, int tid, const Acc* acc, Acc* smem) {
    int pl, ty, tx;
    place(q, tid, pl, ty, tx);
    if (pl >= b.planes) return;
    park_outputs<kRH, kRW>(acc, park_ld(q), smem + (pl * park_stride(q) + ty * kRH * park_ld(q) + tx * kRW));
  }

  RK_HD static void store_parked(const RtParams& q, const SmCoord& b, int tid, const Acc* smem,
                                 const T* __restrict__ bias, T* __restrict__ output) {
    const int ps = park_stride(q);
    const int tile_h = q.sm_tr * kRH, tile_w = park_ld(q);
    const int rows = q.oh - b.oh0 < tile_h ? q.oh - b.oh0 : tile_h;
    const int cols = q.ow - b.u0 < tile_w ? q.ow - b.u0 : tile_w;
    for_each_channel_run(q, b, [&](int64_t n, int c_lo, int G, int pl) {
      store_channel_vectors<Shape::kThreads>(cl_output_src(q), output + n * q.out_n, c_lo, G, b.oh0, b.u0, rows, cols,
                                             smem + pl * ps, ps, park_ld(q), bias, tid);
    });
  }
};

// Channels_last flags of the plan (RtParams::cl_in, cl_out; `p` as planned, after any transposition): channel
// stride 1, planes not contiguous along W, positive strides, one W phase, a sample's span within 32-bit offsets.
inline void set_channels_last(const Params& p, RtParams& g) {
  const int64_t span_in = (p.h - 1) * p.in_stride[2] + (p.w - 1) * p.in_stride[3] + p.c;
  const int64_t span_out = (p.oh - 1) * p.out_stride[2] + (p.ow - 1) * p.out_stride[3] + p.c;
  const bool cl = g.R == 1 && p.c > 1;
  g.cl_in = cl && p.in_stride[1] == 1 && p.in_stride[3] > 1 && p.in_stride[2] > 0 && span_in < (int64_t(1) << 30);
  g.cl_out = cl && p.out_stride[1] == 1 && p.out_stride[3] > 1 && p.out_stride[2] > 0 && span_out < (int64_t(1) << 30);
}

// Tap chunks that fit (fits(kc, mc)): tap rows halved, then phase taps (generic tiles, kw_fixed = 0), then rows
// again; rows grown back as far as they fit. False when one tap row of the smallest chunk does not fit.
template <typename Fits>
inline bool size_tap_chunks(Fits&& fits, int kh, int m_max, int64_t kw_fixed, int& kc_out, int& mc_out) {
  int kc = kh, mc = m_max;
  while (kc > 1 && !fits(kc, mc)) kc = (kc + 1) / 2;
  while (kw_fixed == 0 && mc > 4 && !fits(kc, mc)) mc = int(imax(4, cdiv(mc, 8) * 4));
  while (kc > 1 && !fits(kc, mc)) kc = (kc + 1) / 2;
  if (!fits(kc, mc)) return false;
  while (kc < kh && fits(kc + 1, mc)) ++kc;
  kc_out = kc;
  mc_out = mc;
  return true;
}

// The outputs parked for channel-vector stores fit in the windows' space (always: a window has tile + 4 columns).
template <typename Shape>
inline void keep_parking_in_bounds(RtParams& g) {
  const int64_t tile = int64_t(g.sm_tr) * Shape::kRH * g.sm_tc * Shape::kRW;
  if (g.cl_out && g.sm_planes * (tile + 4) > Shape::smem_elems(g, g.sm_planes, g.kc, g.mc)) g.cl_out = 0;
}

// Plans the small-map tile with KW (0: generic) for `p` (transposed first when the filter is kh x 1):
// false unless the output plane takes at most kThreads / 2 threads and at least 2 planes fit in shared
// memory. Keeps as many planes per block as the threads allow, chunking tap rows (then taps, generic
// only) to fit; fewer planes only when one tap row does not fit.
template <int KW>
inline bool plan_small(const Params& p0, RtParams& q, int64_t kw_fixed) {
  using Shape = SmShape<KW>;
  const Params p = as_planned(p0);
  RtParams g{};
  if (!plan_rt<RtWide>(p, g, kw_fixed)) return false;  // geometry and 32-bit limits
  const int64_t tr = cdiv(p.oh, Shape::kRH), tc = cdiv(cdiv(p.ow, g.R), Shape::kRW);
  if (tr * tc > Shape::kThreads / 2) return false;
  const int64_t nplanes = p.n * p.c * g.R;
  if (nplanes >= (int64_t(1) << 31)) return false;
  g.sm_tr = int(tr);
  g.sm_tc = int(tc);
  g.sm_tpp = int(tr * tc);
  g.sm_nplanes = int(nplanes);
  int planes = Shape::kThreads / g.sm_tpp;
  const int m_max = int(cdiv(p.kw, g.S));
  auto fits = [&](int kc_, int mc_) { return Shape::smem_elems(g, planes, kc_, mc_) <= kSmemBudgetElems; };
  const int mc_min = kw_fixed > 0 ? m_max : (m_max < 4 ? m_max : 4);
  while (planes >= 2 && !fits(1, mc_min)) planes /= 2;
  if (planes < 2) return false;
  // channels_last with one W phase: the block's planes are consecutive channels, staged and stored as channel
  // vectors; a whole number of vectors per block where the threads allow it
  set_channels_last(p, g);
  const int V = vec_elems(p);
  if ((g.cl_in || g.cl_out) && planes > V) planes -= planes % V;
  if (!size_tap_chunks(fits, int(p.kh), m_max, kw_fixed, g.kc, g.mc)) return false;
  g.sm_planes = planes;
  keep_parking_in_bounds<Shape>(g);
  g.tiles_h = g.tiles_w = 1;
  q = g;
  return true;
}

// Channel-group tiles (REPKERNELS_DW_TILE=cl...): SmTile on a channels_last input with one W phase whose output plane
// is too large for whole planes. A block holds G = V planes (the consecutive channels of one 16-byte vector: 4 fp32,
// 8 fp16/bf16) and one tile of tr x tc micro-tiles in each, tr·tc = kThreads / G threads per plane (fp32 16: e.g.
// 16 x 32 outputs; fp16/bf16 8: e.g. 8 x 32), the tiles of a plane in tiles_h x tiles_w blocks, the channel groups of
// one tile in consecutive blocks (neighbouring vectors share 32-byte sectors). Rule: G windows + taps <=
// kClSmemBudgetElems (tap rows chunked, kc); among the tr x tc splits of the threads the one staging the fewest
// window elements over the whole plane (halo of all tiles and tap chunks).
// False when it does not apply (input not channels_last, W phases, no chunk fits, 32-bit limits).
// Shared memory of a channel-group tile, in accumulator elements: 24 KB of fp32, so that the 8 blocks of 64 threads
// its launch bounds ask for (kMinBlocks) fit in an SM's shared memory (Hopper: 9 of 24 + 1 KB).
constexpr int64_t kClSmemBudgetElems = kSmemBudgetElems / 2;

template <int KW>
inline bool plan_channel_groups(const Params& p0, RtParams& q, int64_t kw_fixed) {
  using Shape = SmShape<KW>;
  const Params p = as_planned(p0);
  RtParams g{};
  if (!plan_rt<RtWide>(p, g, kw_fixed)) return false;  // geometry and 32-bit limits
  set_channels_last(p, g);
  if (!g.cl_in) return false;
  const int V = vec_elems(p);
  const int planes = V < Shape::kThreads ? V : Shape::kThreads;
  const int tpp = Shape::kThreads / planes;
  const int m_max = int(cdiv(p.kw, g.S));
  if (p.n * p.c >= (int64_t(1) << 31)) return false;
  g.sm_nplanes = int(p.n * p.c);
  g.sm_planes = planes;
  g.sm_tpp = tpp;
  bool found = false;
  int64_t best = 0;
  RtParams t = g;
  for (int tr = 1; tr <= tpp; ++tr) {
    if (tpp % tr != 0) continue;
    t.sm_tr = tr;
    t.sm_tc = tpp / tr;
    auto fits = [&](int kc_, int mc_) { return Shape::smem_elems(t, planes, kc_, mc_) <= kClSmemBudgetElems; };
    if (!size_tap_chunks(fits, int(p.kh), m_max, kw_fixed, t.kc, t.mc)) continue;
    t.tiles_h = int(cdiv(p.oh, int64_t(tr) * Shape::kRH));
    t.tiles_w = int(cdiv(p.ow, int64_t(t.sm_tc) * Shape::kRW));
    int64_t staged = 0;  // window elements of the chunks for_each_tap_chunk walks
    for (int sigma = 0; sigma < t.S; ++sigma) {
      const int taps = phase_taps(t, sigma);
      for (int i0 = 0; i0 < t.kh; i0 += t.kc) {
        const int kc = t.kh - i0 < t.kc ? t.kh - i0 : t.kc;
        for (int m0 = 0; m0 < taps; m0 += t.mc)
          staged += int64_t(Shape::in_rows(t, kc)) * Shape::in_cols(t, taps - m0 < t.mc ? taps - m0 : t.mc);
      }
    }
    staged *= int64_t(t.tiles_h) * t.tiles_w;
    if (!found || staged < best) g = t, best = staged, found = true;
  }
  if (!found || cdiv(g.sm_nplanes, planes) * g.tiles_h * g.tiles_w >= (int64_t(1) << 31)) return false;
  keep_parking_in_bounds<Shape>(g);
  q = g;
  return true;
}

inline int64_t num_small_blocks(const RtParams& q) {
  return cdiv(int64_t(q.sm_nplanes), int64_t(q.sm_planes)) * q.tiles_h * q.tiles_w;
}

template <int KW>
inline int64_t small_smem_elems(const RtParams& q) {
  return SmShape<KW>::smem_elems(q, q.sm_planes, q.kc, q.mc);
}

// Whether the window of every tap chunk of the small-map tile with KW holds the whole plane (SmTile::stage_planes).
template <int KW>
inline bool small_windows_hold_planes(const RtParams& q) {
  using Tile = SmTile<float, float, KW>;
  bool all = true;
  for_each_tap_chunk(q, [&](int sigma, int i0, int kc, int m0, int mt) {
    all = all && Tile::holds_plane(q, Tile::window(q, 0, sigma, i0, kc, m0, mt));
  });
  return all;
}

}  // namespace rk::dw

namespace rk::dw {

// kAuto: small-map tiles, then channel-group tiles (channels_last input), then RtTile (compile-time, then
// generic), then kDirect. kRegTile: RtTile (compile-time, then generic) or kDirect; kGeneric: the generic RtTile or
// kDirect; kDirect: kDirect. kSmall: the small-map tiles only (compile-time, then generic); kSmallGeneric: the
// generic one only; kCl, kClGeneric: the same for the channel-group tiles (-1 when they do not apply).
enum class FwdChoice : int {
  kAuto = 0, kGeneric = 1, kDirect = 2, kRegTile = 3, kSmall = 4, kSmallGeneric = 5, kCl = 6, kClGeneric = 7
};

// Plans the forward problem `p` (strides in_stride / out_stride set). Returns the kernel: the tap count
// of a compile-time RtTile, 0 for the generic RtTile, kSmallKernel + KW for a small-map tile (`q`
// filled), -1 for kDirect (`p` planned).
inline int plan_forward(Params& p, RtParams& q, FwdChoice choice = FwdChoice::kAuto) {
  p.config = TileConfig::kRegTile;
  const bool small = choice == FwdChoice::kAuto || choice == FwdChoice::kSmall || choice == FwdChoice::kSmallGeneric;
  if (small) {
    if (choice != FwdChoice::kSmallGeneric) {
      const int64_t k = (p.kw == 1 && p.kh > 1) ? p.kh : p.kw;  // the tap count along the window
      if (k == 7 && plan_small<7>(p, q, 7)) return kSmallKernel + 7;
      if (k == 13 && plan_small<13>(p, q, 13)) return kSmallKernel + 13;
      if (k == 27 && plan_small<27>(p, q, 27)) return kSmallKernel + 27;
      if (k == 31 && plan_small<31>(p, q, 31)) return kSmallKernel + 31;
    }
    if (plan_small<0>(p, q, 0)) return kSmallKernel;
    if (choice != FwdChoice::kAuto) {
      plan_direct(p);
      return -1;
    }
  }
  if (choice == FwdChoice::kAuto || choice == FwdChoice::kCl || choice == FwdChoice::kClGeneric) {
    if (choice != FwdChoice::kClGeneric) {
      const int64_t k = (p.kw == 1 && p.kh > 1) ? p.kh : p.kw;
      for (int ks : kSmKernelSizes) {
        if (k == ks && (ks == 7    ? plan_channel_groups<7>(p, q, 7)
                        : ks == 13 ? plan_channel_groups<13>(p, q, 13)
                        : ks == 27 ? plan_channel_groups<27>(p, q, 27)
                                   : plan_channel_groups<31>(p, q, 31)))
          return kClKernel + ks;
      }
    }
    if (plan_channel_groups<0>(p, q, 0)) return kClKernel;
    if (choice != FwdChoice::kAuto) {
      plan_direct(p);
      return -1;
    }
  }
  if (choice == FwdChoice::kAuto || choice == FwdChoice::kRegTile) {
    for (int k : kRtKernelSizes) {
      if (k == p.kw && (k == 3 ? plan_rt<RtWide16>(p, q, k) : plan_rt<RtWide>(p, q, k))) return k;
    }
  }
  if (choice != FwdChoice::kDirect && plan_rt<RtWide>(p, q, 0)) return 0;
  plan_direct(p);
  return -1;
}

}  // namespace rk::dw

namespace rk::dw {

// Blocks of the forward `kernel` planned by plan_forward(p, q).
inline int64_t num_forward_blocks(const Params& p, const RtParams& q, int kernel) {
  if (kernel < 0) return num_blocks(p);
  if (kernel >= kSmallKernel) return num_small_blocks(q);  // small-map and channel-group tiles
  return num_rt_blocks(p, q);
}

}  // namespace rk::dw
