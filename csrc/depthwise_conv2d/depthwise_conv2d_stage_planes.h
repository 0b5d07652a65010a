// One-pass staging of a small-map block's planes (SmTile, depthwise_conv2d_smallmap.h), for the CUDA kernel and
// its CPU emulation alike.
//
// SmTile's per-plane staging runs stage_window once per plane with all of the block's threads: a 7 x 7 fp32
// plane is 13 16-byte vectors, so most threads idle in each of the P passes. When the planes are NCHW planes
// lying back to back in memory (row stride w, column stride 1, plane stride h·w; R = 1) and the chunk's window
// holds the whole plane, the block's planes are one run of P·h·w elements instead (one per sample when the
// samples are not back to back), staged in one pass:
//
//   stage_planes_run:   the run cut at its own 16-byte boundaries; thread tid takes vectors tid, tid + kThreads,
//                       ... and scatters each to (plane, row, column) of the windows, following its place with
//                       counters (no division per vector): a vector wraps at most once (w >= V − 1), into the
//                       next row of its plane or the first row of the next plane
//   zero_planes_outside: the padding ring of every window (rows and columns outside the plane), in groups of 4
//                       of a window row: the bands of whole rows between two planes, then the sides of the
//                       planes' rows, each thread keeping one group and walking the bands or rows
//   stage_filter_runs:  the taps of the planes' channels (consecutive, mod C), when the chunk holds the whole
//                       filters: runs of filters as the input's runs of planes (rows of kw taps, planes of kh
//                       rows), then zero past kw; other chunks (stage_plane_taps) each thread keeping one tap and
//                       walking the planes
//
// The host decides where it applies (plan_stage_planes: the layout, for the element size; SmTile checks per tap
// chunk that the window holds the plane).
#pragma once

#include "depthwise_conv2d/depthwise_conv2d_regtile.h"

namespace rk::dw {

// RtParams::sm_runs: the block's planes staged plane by plane, one run per sample, one run for the whole block.
constexpr int kSmRunsNone = 0;
constexpr int kSmRunsPerSample = 1;
constexpr int kSmRunsBlock = 2;

// Copies `planes` planes of h rows of w elements, back to back in memory at `run`, into windows `win` elements
// apart: element (pl, r, i) goes to dst[pl·win + base + r·cols + i]. The run is cut at its own 16-byte boundaries:
// thread tid takes vectors tid, tid + kThreads, ... (16-byte loads; masked scalar loads for the partial head and
// tail vectors). w >= V − 1, so that a vector wraps at most once: its lanes before the wrap go to p + jj, those
// after it to the next row (wrap = cols − w further) or, from a plane's last row, to the next plane's first row
// (pwrap = win − h·cols further still). Each step moves the same number of planes, rows and columns, carrying one
// row and one plane. FastDiv is exact here (the indices are within a block's windows).
template <int kThreads, typename T, typename Acc>
RK_HD void stage_planes_run(const T* __restrict__ run, int planes, int h, int w, int base, int cols, int win, Acc* dst,
                            int tid) {
  constexpr int V = kVec<T>;
  constexpr int kStride = kThreads * V;
#if !defined(__CUDA_ARCH__)
  if (w < V - 1) throw std::logic_error("rk::dw::stage_planes_run: rows shorter than a vector less one");
#endif
  const int n = planes * h * w;
  const int hd = int(uint32_t(reinterpret_cast<uintptr_t>(run) / sizeof(T)) & uint32_t(V - 1));
  const FastDiv div_w(w), div_h(h);
  // vector t holds run elements [t·V − hd, (t + 1)·V − hd): the thread's first at k in row o = pl·h + r (o = −1,
  // plane −1, row h − 1 for the lanes before the run: thread 0's head)
  int k = tid * V - hd;
  const int o = div_w(k + w) - 1;
  const int pl = div_h(o + h) - 1;
  int r = o - pl * h;
  int left = w - (k - o * w);  // lanes before the wrap
  Acc* p = dst + (pl * win + base + r * cols + (w - left));
  const int dq = div_w(kStride);  // a step: dq rows (dp planes and dl rows) and dr elements
  const int dr = kStride - dq * w;
  const int dp = div_h(dq);
  const int dl = dq - dp * h;
  const int wrap = cols - w;
  const int pwrap = win - h * cols;
  const int step = dp * win + dl * cols + dr;
  auto advance = [&]() {
    k += kStride;
    p += step;
    r += dl;
    left -= dr;
    if (left <= 0) {
      left += w;
      p += wrap;
      ++r;
    }
    if (r >= h) {
      r -= h;
      p += pwrap;
    }
  };
  // where lane jj >= left goes, less jj
  auto after_wrap = [&]() { return p + (r == h - 1 ? wrap + pwrap : wrap); };
  auto put_masked = [&]() {
    Acc* const pw = after_wrap();
#if defined(__CUDACC__)
#pragma unroll 1
#endif
    for (int jj = 0; jj < V; ++jj)
      if (unsigned(k + jj) < unsigned(n)) (jj < left ? p : pw)[jj] = ldg1<T, Acc>(run + (k + jj));
  };
  if (k < 0 && k < n) {
    put_masked();
    advance();
  }
#if defined(__CUDACC__)
#pragma unroll 2
#endif
  for (; k <= n - V; advance()) {
    Acc v[V];
    ldg_vec(run + k, v);
    Acc* const pw = after_wrap();
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; ++jj) (jj < left ? p : pw)[jj] = v[jj];
  }
  if (k < n) put_masked();
}

// Zeros, in each of `planes` windows of rows x cols back to back at dst (16-byte aligned for float; cols a multiple
// of 4), the elements outside its rectangle of rows [ra, rb) and columns [ca, cb) (not empty), in groups of 4 of a
// window row, two walks in which each thread keeps one group and follows its place with counters:
//   the bands of whole rows between two planes' rectangles (rows [rb, rows) of window j − 1 and [0, ra) of window
//   j, contiguous: band j, j = 0 .. planes, the first and the last cut at the ends): 16-byte stores;
//   the sides of the rectangles' rows (columns [0, ca) and [cb, cols)): a 16-byte store for a group wholly outside
//   [ca, cb), the lanes outside it one by one for a group that straddles ca or cb.
template <int kThreads, typename Acc>
RK_HD void zero_planes_outside(Acc* dst, int planes, int rows, int cols, int ra, int rb, int ca, int cb, int tid) {
  const Acc zero[4] = {};
  const int win = rows * cols;
  const int h = rb - ra;
  const int band = (rows - h) * cols / 4;  // groups of a band
  if (band > 0) {
    const int top = (rows - rb) * cols / 4;  // groups of band j before window j
    const int end = planes * win / 4;
    const ThreadLane lane = thread_lane<kThreads>(band, tid);
    if (lane.g0 < lane.G) {
      const int de = lane.G * (win / 4);
      for (int k = lane.k; k < band; k += kThreads) {
        int e = lane.g0 * (win / 4) - top + k;  // group e of the windows: band g0's k-th
        Acc* p = dst + 4 * e;
#if defined(__CUDACC__)
#pragma unroll 1
#endif
        for (int j = lane.g0; j <= planes; j += lane.G, e += de, p += 4 * de)
          if (unsigned(e) < unsigned(end)) sts4(p, zero);
      }
    }
  }
  const int left = (ca + 3) / 4;        // groups with a lane before ca: [0, left)
  const int right = cb / 4;             // groups with a lane from cb on: [right, cols / 4)
  const int sides = left + cols / 4 - right;
  if (sides == 0) return;
  const ThreadLane lane = thread_lane<kThreads>(sides, tid);
  if (lane.g0 >= lane.G) return;
  const int G = lane.G;
  const int lines = planes * h;
  const int g_planes = G / h, g_rows = G - g_planes * h;  // a step: whole windows and rows
  const int step = g_planes * win + g_rows * cols;
  const int wrap = win - h * cols;                         // from past a rectangle's last row to the next's first
  for (int k = lane.k; k < sides; k += kThreads) {
    const bool is_left = k < left;
    const int c = 4 * (is_left ? k : right + k - left);
    bool zero_lane[4];
    bool whole = true;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < 4; ++jj) {
      zero_lane[jj] = is_left ? c + jj < ca : c + jj >= cb;
      whole = whole && zero_lane[jj];
    }
    const int pl = lane.g0 / h;
    // the thread's rows of the rectangles, put(p) at each
    auto walk = [&](auto put) {
      int r = lane.g0 - pl * h;
      Acc* p = dst + (pl * win + (ra + r) * cols + c);
#if defined(__CUDACC__)
#pragma unroll 1
#endif
      for (int m = lane.g0; m < lines; m += G) {
        put(p);
        p += step;
        r += g_rows;
        if (r >= h) {
          r -= h;
          p += wrap;
        }
      }
    };
    if (whole) {
      walk([&](Acc* p) { sts4(p, zero); });
    } else {
      walk([&](Acc* p) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int jj = 0; jj < 4; ++jj)
          if (zero_lane[jj]) p[jj] = Acc(0);
      });
    }
  }
}

// Stages the whole filters (kh x kw taps, contiguous, one after the other in channel order) of channels c_first,
// c_first + 1, ... (mod C) for `planes` planes into s_w: per plane kh rows of wp taps (wp >= kw a multiple of 4),
// zero past kw. The channels up to the last one (C − 1) are one run of filters in memory (stage_planes_run: kw >=
// V − 1), the planes from channel 0 on (a block crossing a sample) the next run.
template <int kThreads, typename T, typename Acc>
RK_HD void stage_filter_runs(const T* __restrict__ weight, int c_first, int C, int planes, int kh, int kw, int wp,
                             int tid, Acc* s_w) {
  const int taps = kh * wp;
  int c = c_first;
  for (int pl = 0; pl < planes;) {
    const int seg = C - c < planes - pl ? C - c : planes - pl;  // the planes up to channel C − 1
    stage_planes_run<kThreads>(weight + c * (kh * kw), seg, kh, kw, 0, wp, taps, s_w + pl * taps, tid);
    pl += seg;
    c = 0;
  }
  if (kw < wp) zero_planes_outside<kThreads>(s_w, planes, kh, wp, 0, kh, 0, kw, tid);
}

// Stages the taps of phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mt) of channels c_first, c_first + 1,
// ... (mod C: planes crossing a sample) for `planes` planes into s_w: per plane kc rows of 4·ns taps, zero past mt
// and past the filter's width (as stage_taps, per channel). Each thread keeps one tap of the chunk and walks the
// planes at a fixed stride (more taps than threads: each thread walks every plane for each of its taps).
template <int kThreads, typename T, typename Acc>
RK_HD void stage_plane_taps(const RtParams& q, const T* __restrict__ weight, int c_first, int planes, int sigma,
                            int i0, int kc, int m0, int mt, int ns, int tid, Acc* s_w) {
  const int wp = 4 * ns;
  const int taps = kc * wp;
  const ThreadLane lane = thread_lane<kThreads>(taps, tid);
  if (lane.g0 >= lane.G) return;
  const int G = lane.G;
  const int g_c = G % q.c;                      // channels a step moves (mod C)
  const int c_start = (c_first + lane.g0) % q.c;  // the channel of the thread's first plane
  const int filter = q.kh * q.kw;
  const int step_c = g_c * filter, all_c = q.c * filter;
  const FastDiv div_wp(wp);
  for (int t = lane.k; t < taps; t += kThreads) {
    const int i = div_wp(t);
    const int mm = t - i * wp;
    const int j = sigma + (m0 + mm) * q.S;
    Acc* d = s_w + (lane.g0 * taps + t);
    if (!(mm < mt && j < q.kw)) {
#if defined(__CUDACC__)
#pragma unroll 1
#endif
      for (int pl = lane.g0; pl < planes; pl += G, d += G * taps) *d = Acc(0);
      continue;
    }
    const T* src = weight + ((i0 + i) * q.kw + j);
    int oc = c_start * filter;  // the plane's channel's filter, from src
#if defined(__CUDACC__)
#pragma unroll 1
#endif
    for (int pl = lane.g0; pl < planes; pl += G, d += G * taps) {
      *d = ldg1<T, Acc>(src + oc);
      oc += step_c;
      if (oc >= all_c) oc -= all_c;
    }
  }
}

// The one-pass staging's layout condition (RtParams::sm_runs) for V elements a 16-byte vector: NCHW planes back to
// back within a sample (row stride w, column stride 1, plane stride h·w; R = 1, columns every L = 1) whose rows hold
// at least V − 1 elements (a vector wraps at most once); kSmRunsBlock when the samples lie back to back too
// (sample stride C·h·w), else kSmRunsPerSample (none with one channel: a run would be one plane).
inline int plan_stage_planes(const RtParams& q, int V) {
  const int64_t plane = int64_t(q.h) * q.w;
  if (q.R != 1 || q.L != 1 || q.in_w != 1 || q.in_h != q.w || q.w < V - 1) return kSmRunsNone;
  if (q.c > 1 && q.in_c != plane) return kSmRunsNone;
  if (q.in_n == plane * q.c) return kSmRunsBlock;
  return q.c > 1 ? kSmRunsPerSample : kSmRunsNone;
}

}  // namespace rk::dw
