// Channels_last primitives of the register tiles (SmTile on small maps and the channel-group tiles on large ones,
// depthwise_conv2d_smallmap.h): a block that holds G consecutive channels [c_lo, c_lo + G) of one sample reads and
// writes them as channel vectors.
//
// In a channels_last tensor element (n, h, w, c) lies at n·HWC + (h·W + w)·C + c: the channels of a pixel are
// contiguous (channel stride 1), the planes are not (column stride C). Staging one plane's window element by element
// at stride C makes every 4- or 2-byte load its own instruction and its own 32-byte sector. Here the G planes'
// windows are staged together: each load takes the 16 bytes of V = 16 / sizeof(T) consecutive channels of one pixel
// (fp32: 4, fp16/bf16: 8) and scatters its lanes into the G shared windows; the outputs go back the same way.
//
//   channel vectors: the group's channels cut at the 16-byte boundaries of global memory, which fall at the same
//   channel of every pixel when the row and column strides are multiples of V: vector k holds channels
//   [c_lo + k·V − shift, c_lo + (k + 1)·V − shift) (shift: how far c_lo lies past its boundary). A vector that lies
//   in [0, C) is one 16-byte load (its lanes outside the group are dropped); others (the partial vectors of C not a
//   multiple of V, strides or a base pointer not 16-byte aligned: then shift = 0 and no vector is whole) load their
//   group lanes one by one.
//   stage_channel_windows: thread tid keeps one vector k and walks the window's positions (row, column) at a fixed
//   stride (thread_lane), zero outside the image; no division per item.
//   park_outputs / store_channel_vectors: after the last compute barrier the windows' shared memory is free: each
//   thread parks its kRH x kRW accumulators in its channel's output tile (16-byte shared stores), a barrier, then
//   each thread keeps one vector k, adds the bias and writes the parked outputs as 16-byte vectors of T (converted
//   and packed) where the vector lies in the group, the strides and the base allow it; else lane by lane. Only the
//   group's channels are written (other blocks own the rest of a vector).
// All indices are 32-bit (the planner checks that a sample's span fits).
#pragma once

#include <cstdint>

#include "depthwise_conv2d/depthwise_conv2d_regtile.h"

namespace rk::dw {

// One sample of a channels_last tensor seen as C planes: plane geometry as StageSrc (h x w, row and column strides,
// `step` plane columns between two window columns) and its C channels at stride 1.
struct ClSrc {
  int h, w, row_stride, col_stride, step, channels;
};

RK_HD ClSrc cl_input_src(const RtParams& q) { return ClSrc{q.h, q.w, q.in_h, q.in_w, q.L, q.c}; }
RK_HD ClSrc cl_output_src(const RtParams& q) { return ClSrc{q.oh, q.ow, q.out_h, q.out_w, 1, q.c}; }

// The channel vectors of channels [c_lo, c_lo + G) of the sample at px (channel 0 of pixel (0, 0)).
struct ChannelVectors {
  int shift;     // vector k's lane jj is group channel k·V − shift + jj
  int count;     // vectors covering the group
  bool aligned;  // 16-byte accesses apply (strides multiples of V): whole vectors take them
};

template <typename T>
RK_HD ChannelVectors channel_vectors(const ClSrc& g, const T* px, int c_lo, int G) {
  constexpr int V = kVec<T>;
  ChannelVectors cv;
  cv.aligned = ((g.row_stride | g.col_stride) & (V - 1)) == 0;
  cv.shift = cv.aligned ? int((uint32_t(reinterpret_cast<uintptr_t>(px) / sizeof(T)) + uint32_t(c_lo)) &
                              uint32_t(V - 1))
                        : 0;
  cv.count = (cv.shift + G + V - 1) / V;
  return cv;
}

// Where thread tid walks the positions of a window of `cols` columns: position i = a·cols + e from i = i0 by
// `stride` (the thread_lane of its vector), kept as (a, e) with the step (dq rows, dr columns) split once.
struct PosWalk {
  int i, a, e, dq, dr;
  RK_HD PosWalk(int i0, int stride, int cols) : i(i0) {
    a = i0 / cols;  // once per thread and call
    e = i0 - a * cols;
    dq = stride / cols;
    dr = stride - dq * cols;
  }
  RK_HD void advance(int stride, int cols) {
    i += stride;
    a += dq;
    e += dr;
    if (e >= cols) {
      e -= cols;
      ++a;
    }
  }
};

// Stage the rows x cols windows of channels [c_lo, c_lo + G) of the channels_last sample px: window element (a, e)
// of group channel ch is plane row r0 + a, column c0 + e·step (zero outside the plane), at dst[ch·win_stride +
// a·cols + e]. The block's kThreads threads share the work: one 16-byte load per whole vector and position.
template <int kThreads, typename T, typename Acc>
RK_HD void stage_channel_windows(const ClSrc& g, const T* __restrict__ px, int c_lo, int G, int r0, int c0, int rows,
                                 int cols, int win_stride, int tid, Acc* dst) {
  constexpr int V = kVec<T>;
  const ChannelVectors cv = channel_vectors(g, px, c_lo, G);
  const ThreadLane lane = thread_lane<kThreads>(cv.count, tid);
  if (lane.g0 >= lane.G) return;
  const int n = rows * cols;
  for (int k = lane.k; k < cv.count; k += kThreads) {
    const int rel = k * V - cv.shift;  // group channel of lane 0
    const int first = c_lo + rel;      // its sample channel
    const bool whole = cv.aligned && first >= 0 && first + V <= g.channels;
    bool keep[V];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; ++jj) keep[jj] = unsigned(rel + jj) < unsigned(G);
    for (PosWalk w(lane.g0, lane.G, cols); w.i < n; w.advance(lane.G, cols)) {
      const int r = r0 + w.a, c = c0 + w.e * g.step;
      const bool inside = unsigned(r) < unsigned(g.h) && unsigned(c) < unsigned(g.w);
      Acc v[V];
      if (inside && whole) {
        ldg_vec(px + (r * g.row_stride + c * g.col_stride + first), v);
      } else {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int jj = 0; jj < V; ++jj)
          v[jj] = inside && keep[jj] ? ldg1<T, Acc>(px + (r * g.row_stride + c * g.col_stride + first + jj)) : Acc(0);
      }
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int jj = 0; jj < V; ++jj)
        if (keep[jj]) dst[(rel + jj) * win_stride + w.i] = v[jj];
    }
  }
}

// Park a thread's kRH x kRW accumulators at dst (rows of ld elements; dst and ld 16-byte aligned for float).
template <int kRH, int kRW, typename Acc>
RK_HD void park_outputs(const Acc* acc, int ld, Acc* dst) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRH; ++r) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int cc = 0; cc < kRW; cc += 4) sts4(dst + (r * ld + cc), acc + (r * kRW + cc));
  }
}

// Write the parked outputs of channels [c_lo, c_lo + G) of the channels_last sample px: output rows [oh0, oh0 +
// rows), columns [ow0, ow0 + cols) (inside the output), group channel ch's output (a, e) parked at src[ch·park_stride
// + a·ld + e], plus bias[c] (bias null: none). One 16-byte store per whole vector and position.
template <int kThreads, typename T, typename Acc>
RK_HD void store_channel_vectors(const ClSrc& g, T* __restrict__ px, int c_lo, int G, int oh0, int ow0, int rows,
                                 int cols, const Acc* src, int park_stride, int ld, const T* __restrict__ bias,
                                 int tid) {
  constexpr int V = kVec<T>;
  const ChannelVectors cv = channel_vectors(g, static_cast<const T*>(px), c_lo, G);
  const ThreadLane lane = thread_lane<kThreads>(cv.count, tid);
  if (lane.g0 >= lane.G) return;
  const int n = rows * cols;
  for (int k = lane.k; k < cv.count; k += kThreads) {
    const int rel = k * V - cv.shift;
    const int first = c_lo + rel;
    bool keep[V];
    Acc bv[V];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; ++jj) {
      keep[jj] = unsigned(rel + jj) < unsigned(G);
      bv[jj] = keep[jj] && bias != nullptr ? Cvt<T, Acc>::load(bias[first + jj]) : Acc(0);
    }
    // the whole vector is the group's (other blocks own the channels past it)
    const bool whole = cv.aligned && rel >= 0 && rel + V <= G;
    for (PosWalk w(lane.g0, lane.G, cols); w.i < n; w.advance(lane.G, cols)) {
      const Acc* s = src + (w.a * ld + w.e);
      T* out = px + ((oh0 + w.a) * g.row_stride + (ow0 + w.e) * g.col_stride + first);
      if constexpr (std::is_same_v<Acc, float>) {
        if (whole) {
          float v[V];
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int jj = 0; jj < V; ++jj) v[jj] = s[(rel + jj) * park_stride] + bv[jj];
          stg_vec<T, V>(out, v);
          continue;
        }
      }
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int jj = 0; jj < V; ++jj)
        if (keep[jj]) out[jj] = Cvt<T, Acc>::store(s[(rel + jj) * park_stride] + bv[jj]);
    }
  }
}

}  // namespace rk::dw
