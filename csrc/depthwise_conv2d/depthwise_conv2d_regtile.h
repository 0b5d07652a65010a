// Register-tiled direct depthwise conv2d forward (RtTile), written once for the CUDA kernel
// (depthwise_conv2d_kernel.cu) and its CPU emulation (depthwise_conv2d.cpp).
//
// Unit-step form along W. Output column ow and tap j read input column ow·sw + j·dw − pw. With
// L = lcm(sw, dw), R = L / sw, S = L / dw, output phase ρ = ow mod R (ow = ρ + R·u) and tap phase
// σ = j mod S (j = σ + S·m):
//     ow·sw + j·dw − pw = (u + m)·L + (ρ·sw + σ·dw − pw)
// so each (ρ, σ) is a convolution with unit step along W over the input columns taken every L
// (stride 1, dilation 1: R = S = L = 1). A block owns one (n, c, ρ) plane tile of kTileH x kTileW
// outputs (rows x phase columns u); H keeps its stride and dilation (rows are addressed directly).
//
//   for each tap phase σ, chunk of tap rows (kc) and chunk of phase taps (mc, a multiple of 4):
//     stage:   the block copies the input window (zero outside the image; columns every L) and the
//              chunk's taps (rows padded to a multiple of 4 with zeros) into shared memory, as Acc;
//              stage_window: rows contiguous in memory cut at the plane's 16-byte boundaries into slots,
//              each thread keeping one slot and walking rows at a fixed stride (16-byte loads, masked
//              heads and tails); a contiguous plane whose whole lines lie in the window (rows whose cut
//              changes from row to row, transposed planes) as one run cut at its own 16-byte boundaries,
//              each thread walking its vectors' (line, lane) places; other planes element by element; no
//              division per item
//     barrier
//     compute: each thread accumulates its kRH x kRW outputs: per tap row and output row it keeps a
//              window of kRW + 4 inputs in registers, slides it by 4 taps per step (one 16-byte load)
//              and reads the 4 taps with one 16-byte broadcast load
//     barrier
//   store:     each thread adds the bias and writes its outputs (store_outputs): row by row, 16-byte vectors
//              (fp32: 4 outputs; fp16/bf16: 8, converted and packed; 8-byte vectors of 2 and 4 where a row is
//              only 8-byte aligned) when the output row is contiguous, the thread's kRW columns lie inside it and
//              their start is aligned; else one output at a time (right edge, misaligned rows, channels_last,
//              W phases R > 1)
//
// Channels_last inputs with one W phase are planned on the channel-group tiles instead (depthwise_conv2d_smallmap.h,
// plan_forward): channel-vector staging and stores; RtTile still runs them when asked (REPKERNELS_DW_TILE=<taps>).
// KW > 0: compile-time tap count (whole taps row in one chunk, S = 1); KW = 0: any count.
// All indices are 32-bit (the host checks that every plane offset fits).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if !defined(__CUDA_ARCH__)
#include <stdexcept>
#include <string>
#endif

#include "depthwise_conv2d/depthwise_conv2d_params.h"

namespace rk::dw {

// Problem of the register-tiled forward, in 32-bit plane geometry (built by rt_params()).
struct RtParams {
  int c, h, w, oh, ow, kh, kw;
  int sh, dh, ph;
  int sw, dw, pw, L, R, S;
  int tiles_h, tiles_w;
  int kc, mc;                 // tap rows and phase taps staged per pass
  int64_t in_n, in_c, out_n, out_c;
  int in_h, in_w, out_h, out_w;
  // small-map tile (SmTile, depthwise_conv2d_smallmap.h): thread rows and columns per plane, threads per
  // plane, planes per block, planes in all; how it stages the planes (kSmRuns*, depthwise_conv2d_stage_planes.h)
  int sm_tr, sm_tc, sm_tpp, sm_planes, sm_nplanes;
  int sm_runs;
  // channels_last (depthwise_conv2d_channels_last.h): stage the input / store the output as channel vectors
  int cl_in, cl_out;
};

template <int ThreadsW, int ThreadsH, int RowsPerThread, int ColsPerThread>
struct RtShape {
  static constexpr int kThreadsW = ThreadsW;
  static constexpr int kThreadsH = ThreadsH;
  static constexpr int kThreads = ThreadsW * ThreadsH;
  static constexpr int kRH = RowsPerThread;
  static constexpr int kRW = ColsPerThread;
  static constexpr int kTileW = ThreadsW * ColsPerThread;
  static constexpr int kTileH = ThreadsH * RowsPerThread;
  // __launch_bounds__ minimum: lets ptxas use up to 128 registers (without it, it spills at 64-80)
  static constexpr int kMinBlocks = 8;
  static_assert(kRW % 4 == 0, "16-byte window loads");

  // Staged window (rows x cols) and taps (kc x 4·ceil(mc / 4)) for kc tap rows and mc phase taps.
  RK_HD static int steps(int mc) { return (mc + 3) / 4; }
  RK_HD static int in_rows(int sh, int dh, int kc) { return (kTileH - 1) * sh + (kc - 1) * dh + 1; }
  RK_HD static int in_cols(int mc) { return kTileW + 4 * steps(mc); }
  RK_HD static int64_t smem_elems(int sh, int dh, int kc, int mc) {
    return int64_t(in_rows(sh, dh, kc)) * in_cols(mc) + int64_t(kc) * 4 * steps(mc);
  }
};

// 32 x 64 outputs, 64 threads of 4 x 8 (any KW); 64 x 64, 64 threads of 4 x 16 for KW <= 3, whose
// short taps rows need the wider window to reach 8 FMAs per load.
using RtWide = RtShape<8, 8, 4, 8>;
using RtWide16 = RtShape<4, 16, 4, 16>;

template <int KW>
struct RtShapeFor {
  using type = RtWide;
};
template <>
struct RtShapeFor<3> {
  using type = RtWide16;
};

// Compile-time tap counts with their own kernel (KW = 0 is the generic one).
constexpr int kRtKernelSizes[] = {3, 5, 7, 13, 27, 31};

RK_HD int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

struct RtCoord {
  int64_t n, c;
  int rho, oh0, u0;
};

// The emulation's check of a vector access the GPU makes at p: it must be `bytes`-aligned (no-op on the GPU).
RK_HD void check_aligned(const void* p, uintptr_t bytes, const char* what) {
#if !defined(__CUDA_ARCH__)
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw std::logic_error(std::string("rk::dw::") + what + ": misaligned");
#endif
}

// 16-byte load of 4 consecutive Acc (p 16-byte aligned for float; the emulation checks it).
template <typename Acc>
RK_HD void ld4(const Acc* p, Acc* d) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<Acc, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
    return;
  }
#endif
  check_aligned(p, 4 * sizeof(Acc), "ld4");
  for (int i = 0; i < 4; ++i) d[i] = p[i];
}

// Taps of W phase σ of the filter (j = σ + S·m).
RK_HD int phase_taps(const RtParams& q, int sigma) { return sigma < q.kw ? (q.kw - sigma + q.S - 1) / q.S : 0; }

// The chunks of taps the register tiles stage one at a time, in order: f(σ, i0, kc, m0, mt) for W phase σ,
// tap rows [i0, i0 + kc) and phase taps [m0, m0 + mt). The CUDA kernels and their emulation walk them alike.
template <typename F>
RK_HD void for_each_tap_chunk(const RtParams& q, F&& f) {
  for (int sigma = 0; sigma < q.S; ++sigma) {
    const int taps = phase_taps(q, sigma);
    for (int i0 = 0; i0 < q.kh; i0 += q.kc) {
      const int kc = q.kh - i0 < q.kc ? q.kh - i0 : q.kc;
      for (int m0 = 0; m0 < taps; m0 += q.mc) f(sigma, i0, kc, m0, taps - m0 < q.mc ? taps - m0 : q.mc);
    }
  }
}

// 16-byte shared-memory store of 4 consecutive Acc (p 16-byte aligned for float; the emulation checks it). The
// store is written in PTX: the compiler would otherwise merge it with the scalar stores of the misaligned path.
template <typename Acc>
RK_HD void sts4(Acc* p, const Acc* s) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<Acc, float>) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(p))),
                 "f"(s[0]), "f"(s[1]), "f"(s[2]), "f"(s[3])
                 : "memory");
    return;
  }
#endif
  check_aligned(p, 4 * sizeof(Acc), "sts4");
  for (int i = 0; i < 4; ++i) p[i] = s[i];
}

// Elements of T in one 16-byte global load.
template <typename T>
constexpr int kVec = int(16 / sizeof(T));

// Global loads of the input (read-only for the kernel's lifetime): one T, and kVec<T> consecutive T at p
// (16-byte aligned; the emulation checks it), as Acc.
template <typename T, typename Acc>
RK_HD Acc ldg1(const T* __restrict__ p) {
#if defined(__CUDA_ARCH__)
  return Cvt<T, Acc>::load(__ldg(p));
#else
  return Cvt<T, Acc>::load(*p);
#endif
}

template <typename T, typename Acc>
RK_HD void ldg_vec(const T* __restrict__ p, Acc* d) {
#if defined(__CUDA_ARCH__)
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec<T>; ++j) d[j] = Cvt<T, Acc>::load(t[j]);
#else
  check_aligned(p, 16, "ldg_vec");
  for (int j = 0; j < kVec<T>; ++j) d[j] = Cvt<T, Acc>::load(p[j]);
#endif
}

// Two outputs converted to half type T and packed into one 32-bit word, lo in the low half (the lower address).
template <typename T>
RK_HD uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
#else
  const T a = Cvt<T, float>::store(lo), b = Cvt<T, float>::store(hi);
  uint16_t x, y;
  std::memcpy(&x, &a, 2);
  std::memcpy(&y, &b, 2);
  return uint32_t(x) | uint32_t(y) << 16;
#endif
}

// Global store of N consecutive outputs v at p, N·sizeof(T) = 16 or 8 bytes and p aligned to it (the emulation
// checks it); T = float or a half type.
template <typename T, int N>
RK_HD void stg_vec(T* __restrict__ p, const float* v) {
  constexpr int kBytes = N * int(sizeof(T));
  static_assert(kBytes == 16 || kBytes == 8, "8- or 16-byte stores");
  check_aligned(p, kBytes, "stg_vec");
  if constexpr (sizeof(T) == 4) {
#if defined(__CUDA_ARCH__)
    if constexpr (N == 4)
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    else
      *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
#else
    for (int j = 0; j < N; ++j) p[j] = Cvt<T, float>::store(v[j]);
#endif
  } else {
    uint32_t w[N / 2];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < N / 2; ++k) w[k] = pack2<T>(v[2 * k], v[2 * k + 1]);
#if defined(__CUDA_ARCH__)
    if constexpr (N == 8)
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    else
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
#else
    std::memcpy(p, w, kBytes);
#endif
  }
}

// One row of kRW outputs a plus bias bv at p as vector stores of N (stg_vec: p aligned to N·sizeof(T)).
template <typename T, int N, int kRW>
RK_HD void store_row(T* __restrict__ p, const float* a, float bv) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kRW; k += N) {
    float v[N];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int j = 0; j < N; ++j) v[j] = a[k + j] + bv;
    stg_vec<T, N>(p + k, v);
  }
}

// Writes a thread's kRH x kRW outputs acc + bv: output rows oh0 + r, columns ρ + R·(u + cc) of `plane`. When the
// kRW columns of a row are contiguous (R = 1, column stride 1) and inside the output, each row takes 16-byte vectors
// where its column u is 16-byte aligned, 8-byte vectors (2 fp32, 4 fp16/bf16) where only that holds, else scalar
// stores; otherwise every output is stored alone with its own bounds test.
template <typename T, typename Acc, int kRH, int kRW>
RK_HD void store_outputs(const RtParams& q, T* __restrict__ plane, int oh0, int rho, int u, const Acc* acc, Acc bv) {
  constexpr bool kVecT = std::is_same_v<Acc, float> && (sizeof(T) == 4 || sizeof(T) == 2);
  const int rows = q.oh - oh0 < kRH ? q.oh - oh0 : kRH;
  if constexpr (kVecT) {
    if (q.R == 1 && q.out_w == 1 && u + kRW <= q.ow) {
      constexpr int V = kVec<T>;
      static_assert(kRW % V == 0, "whole vectors per row");
      T* p = plane + (oh0 * q.out_h + u);
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int r = 0; r < kRH; ++r, p += q.out_h) {
        if (r >= rows) break;
        const Acc* a = acc + r * kRW;
        const unsigned al = unsigned(reinterpret_cast<uintptr_t>(p)) & 15u;
        if (al == 0) {
          store_row<T, V, kRW>(p, a, bv);
        } else if ((al & 7u) == 0) {
          store_row<T, V / 2, kRW>(p, a, bv);
        } else {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int cc = 0; cc < kRW; ++cc) p[cc] = Cvt<T, Acc>::store(a[cc] + bv);
        }
      }
      return;
    }
  }
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRH; ++r) {
    if (r >= rows) break;
    const int oh = oh0 + r;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int cc = 0; cc < kRW; ++cc) {
      const int ow = rho + q.R * (u + cc);
      if (ow >= q.ow) break;
      plane[oh * q.out_h + ow * q.out_w] = Cvt<T, Acc>::store(acc[r * kRW + cc] + bv);
    }
  }
}

// i / n for 0 <= i, i·n < 2^32 (staged windows are far smaller): i·m / 2^32 with m = ceil(2^32 / n), exact there.
struct FastDiv {
  uint32_t m;
  int n;
  RK_HD explicit FastDiv(int n_) : m(n_ > 1 ? 0xffffffffu / uint32_t(n_) + 1u : 0u), n(n_) {}
  RK_HD int operator()(int i) const {
    if (n == 1) return i;
#if defined(__CUDA_ARCH__)
    return int(__umulhi(uint32_t(i), m));
#else
    return int((uint64_t(uint32_t(i)) * m) >> 32);
#endif
  }
};

// f(a, k) for the items of a rows x n grid that thread tid takes: flat indices tid, tid + kThreads, ...
template <int kThreads, typename F>
RK_HD void for_each_item(int rows, int n, int tid, F&& f) {
  if (n <= 0) return;
  const FastDiv div(n);
  const int total = rows * n;
  for (int i = tid; i < total; i += kThreads) {
    const int a = div(i);
    f(a, i - a * n);
  }
}

// Where thread tid starts a walk over the items of rows of n: column k of row g0, then every G-th row (n <=
// kThreads: the threads split into G groups of n, each thread keeps its column); k = tid, g0 = 0, G = 1 otherwise
// (the caller steps k by kThreads).
struct ThreadLane {
  int k, g0, G;
};

template <int kThreads>
RK_HD ThreadLane thread_lane(int n, int tid) {
  if (n > kThreads) return ThreadLane{tid, 0, 1};
  const FastDiv div(n);
  const int g0 = div(tid);
  return ThreadLane{tid - g0 * n, g0, div(kThreads)};
}

// The plane a window is staged from: h x w elements, row and column strides (elements), and `step`, the
// plane columns between two staged columns.
struct StageSrc {
  int h, w, row_stride, col_stride, step;
};

RK_HD StageSrc input_src(const RtParams& q) { return StageSrc{q.h, q.w, q.in_h, q.in_w, q.L}; }

// The V staged values v of one slot into shared memory at p: 16-byte stores when `aligned` (p 16-byte aligned,
// V a multiple of 4), else one by one where keep(jj).
template <int V, typename Acc, typename Keep>
RK_HD void put_slot(Acc* p, const Acc* v, bool aligned, Keep&& keep) {
  if (aligned) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; jj += 4) sts4(p + jj, v + jj);
  } else {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; ++jj)
      if (keep(jj)) p[jj] = v[jj];
  }
}

// Zeros dst[begin, end) (0 <= begin; dst 16-byte aligned for float): 16-byte stores of the whole groups of 4,
// the partial groups at either end element by element (the first and the last thread). The block's kThreads
// threads share the work (one store per step: the tile's accumulators are live while it stages).
template <int kThreads, typename Acc>
RK_HD void zero_range(Acc* dst, int begin, int end, int tid) {
  const int b4 = (begin + 3) & ~3, e4 = end & ~3;  // the whole groups [b4, e4)
  const Acc zero[4] = {};
#if defined(__CUDACC__)
#pragma unroll 1
#endif
  for (int e = b4 + 4 * tid; e < e4; e += 4 * kThreads) sts4(dst + e, zero);
  const int head_end = b4 < end ? b4 : end, tail_begin = e4 > b4 ? e4 : b4;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int jj = 0; jj < 3; ++jj) {
    if (tid == 0 && begin + jj < head_end) dst[begin + jj] = Acc(0);
    if (tid == kThreads - 1 && tail_begin + jj < end) dst[tail_begin + jj] = Acc(0);
  }
}

// Zeros the elements of a rows x cols window (dst, 16-byte aligned for float) outside its rectangle of rows
// [ra, rb) and columns [ca, cb): the run before the rectangle's first element, the gaps of cols − (cb − ca)
// elements between two of its rows (each thread keeps one gap column and walks the gaps at a fixed stride, as the
// slots of stage_window), the run after its last element.
template <int kThreads, typename Acc>
RK_HD void zero_outside(Acc* dst, int rows, int cols, int ra, int rb, int ca, int cb, int tid) {
  if (ra >= rb || ca >= cb) {
    zero_range<kThreads>(dst, 0, rows * cols, tid);
    return;
  }
  zero_range<kThreads>(dst, 0, ra * cols + ca, tid);
  zero_range<kThreads>(dst, (rb - 1) * cols + cb, rows * cols, tid);
  const int m = cols - (cb - ca);
  const int gaps = rb - ra - 1;
  if (m <= 0 || gaps <= 0) return;
  const ThreadLane lane = thread_lane<kThreads>(m, tid);
  if (lane.g0 >= lane.G) return;
  int k = lane.k;
  const int g0 = lane.g0, G = lane.G;
  const int stride = G * cols;
  Acc* const end = dst + ((rb - 1) * cols + cb);  // past the last gap's elements
  for (; k < m; k += kThreads) {
    for (Acc* p = dst + ((ra + g0) * cols + cb + k); p < end; p += stride) *p = Acc(0);
  }
}

// Copies the run of n plane elements at `run` (contiguous in memory) into the window: run element
// k = o·inner + i (0 <= i < inner) goes to dst[base + o·d_outer + i·d_inner] (d_inner = 1 when kUnitInner).
// The run is cut at its own 16-byte boundaries: thread tid takes vectors tid, tid + kThreads, ... (16-byte loads;
// masked scalar loads for the run's partial head and tail vectors) and follows its place with no division: each
// step moves the same number of lines and lanes, carrying one wrap. inner >= V − 1, so that a vector wraps at most
// once: its lanes before the wrap go to p + jj·d_inner, those after it one wrap (d_outer − inner·d_inner) further.
// FastDiv(inner) is exact here: inner and the thread's first index are within the staged window's size. The loops
// are unrolled little (the tile's accumulators are live while it stages: registers).
template <int kThreads, bool kUnitInner, typename T, typename Acc>
RK_HD void stage_run(const T* __restrict__ run, int n, int inner, int base, int d_outer, int d_inner_, Acc* dst,
                     int tid) {
  constexpr int V = kVec<T>;
  constexpr int kStride = kThreads * V;
  const int d_inner = kUnitInner ? 1 : d_inner_;
  const int hd = int(uint32_t(reinterpret_cast<uintptr_t>(run) / sizeof(T)) & uint32_t(V - 1));
  const FastDiv div(inner);
  // vector t holds run elements [t·V − hd, (t + 1)·V − hd): the thread's first at k = o·inner + i, o = −1 for
  // lanes before the run (thread 0's head)
  int k = tid * V - hd;
  const int o = div(k + inner) - 1;
  int left = inner - (k - o * inner);  // lanes before the wrap
  Acc* p = dst + (base + o * d_outer + (inner - left) * d_inner);
  const int dq = div(kStride);
  const int dr = kStride - dq * inner;
  const int wrap = d_outer - inner * d_inner;
  const int step = dq * d_outer + dr * d_inner;
  auto advance = [&]() {
    k += kStride;
    p += step;
    left -= dr;
    if (left <= 0) {
      left += inner;
      p += wrap;
    }
  };
  auto put_masked = [&]() {
#if defined(__CUDACC__)
#pragma unroll 1
#endif
    for (int jj = 0; jj < V; ++jj)
      if (unsigned(k + jj) < unsigned(n))
        (jj < left ? p : p + wrap)[jj * d_inner] = ldg1<T, Acc>(run + (k + jj));
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
    Acc* const pw = p + wrap;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < V; ++jj) (jj < left ? p : pw)[jj * d_inner] = v[jj];
  }
  if (k < n) put_masked();
}

// Stages the window through stage_run when the plane is contiguous and the window holds its whole lines: rows
// (row stride w, column stride 1, the window spans every column; taken when the rows' 16-byte cut changes from
// row to row, w not a multiple of V) or columns (row stride 1, column stride h, the window spans every row: a
// transposed plane). Zeros the rest of the window (zero_outside). False when it does not apply.
template <int kThreads, typename T, typename Acc>
RK_HD bool stage_plane_lines(const StageSrc& g, const T* __restrict__ plane, int r0, int c0, int rows, int cols,
                             int tid, Acc* dst) {
  constexpr int V = kVec<T>;
  if (g.step != 1) return false;
  if (g.col_stride == 1 && g.row_stride == g.w && (g.w & (V - 1)) != 0 && g.w >= V - 1 && c0 <= 0 &&
      c0 + cols >= g.w) {
    const int lo = r0 > 0 ? r0 : 0;
    const int hi = r0 + rows < g.h ? r0 + rows : g.h;
    const int ra = lo - r0, rb = hi - r0;
    zero_outside<kThreads>(dst, rows, cols, ra, rb, -c0, g.w - c0, tid);
    if (hi > lo)
      stage_run<kThreads, true>(plane + lo * g.w, (hi - lo) * g.w, g.w, ra * cols - c0, cols, 1, dst, tid);
    return true;
  }
  if (g.row_stride == 1 && g.col_stride == g.h && g.h >= V - 1 && r0 <= 0 && r0 + rows >= g.h) {
    const int lo = c0 > 0 ? c0 : 0;
    const int hi = c0 + cols < g.w ? c0 + cols : g.w;
    const int ca = lo - c0, cb = hi - c0;
    zero_outside<kThreads>(dst, rows, cols, -r0, g.h - r0, ca, cb, tid);
    if (hi > lo)
      stage_run<kThreads, false>(plane + lo * g.h, (hi - lo) * g.h, g.h, -r0 * cols + ca, 1, cols, dst, tid);
    return true;
  }
  return false;
}

// Stage a rows x cols window of plane `src` into dst (row-major, cols a row, 16-byte aligned): element (a, e) is
// plane row r0 + a, column c0 + e·step, zero outside the plane. The block's kThreads threads share the work.
//
// Rows contiguous in memory (step 1, column stride 1): row a is cut at the 16-byte boundaries of global memory
// (its own cut: rows need not be aligned alike): with f = head(r0 + a), slot j (0 <= j < J) holds window columns
// [f + (j-1)·kVec, f + j·kVec) that lie in [0, cols): slot 0 the head, then whole runs, then the tail. Each
// thread keeps one slot j and walks rows a0, a0 + G, ... (thread tid: a0 = tid / J, j = tid mod J, G = kThreads / J
// groups; J > kThreads: G = 1 and slots j, j + kThreads, ...). G is lowered to a multiple of the period of
// head() along rows when it stays >= 1, so that a thread's rows share f: its slot's column tests are then taken
// once, and the walk is split into rows above, inside and below the plane. A slot whose 16 bytes lie in the
// plane's row is one 16-byte load (else masked scalar loads; zeros outside the plane); whole slots are stored
// with 16-byte shared stores where aligned (slot start a multiple of 4 of the row), else element by element, only
// the window's columns. Contiguous planes whose whole lines lie in the window, when the rows' cut changes from row to
// row or the plane is transposed: stage_plane_lines (one run of the plane's memory). Other planes (channels_last,
// W phases): one item per element.
// No cp.async: with the usual odd paddings a row's 16-byte global runs start 1-3 floats off the shared row's
// 16-byte boundaries, so 16-byte copies rarely apply and 4-byte ones cost an instruction per element like the
// register path; double buffering would double the shared memory the planner budgets per stage.
template <int kThreads, typename T, typename Acc>
RK_HD void stage_window(const StageSrc& g, const T* __restrict__ plane, int r0, int c0, int rows, int cols, int tid,
                        Acc* dst) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(plane));  // keeps plane one 64-bit pointer (else every address re-adds the 64-bit plane offset)
#endif
  auto scalar = [&](int r, int c) {
    return unsigned(r) < unsigned(g.h) && unsigned(c) < unsigned(g.w)
               ? ldg1<T, Acc>(plane + (r * g.row_stride + c * g.col_stride))
               : Acc(0);
  };
  if (stage_plane_lines<kThreads>(g, plane, r0, c0, rows, cols, tid, dst)) return;
  if (g.step != 1 || g.col_stride != 1) {
    for_each_item<kThreads>(rows, cols, tid,
                            [&](int a, int e) { dst[a * cols + e] = scalar(r0 + a, c0 + e * g.step); });
    return;
  }
  constexpr int V = kVec<T>;
  // plane element (r, c0 + e) is 16-byte aligned for e ≡ head(r) mod V (modular arithmetic, any sign of r)
  const uint32_t base = uint32_t(reinterpret_cast<uintptr_t>(plane) / sizeof(T)) + uint32_t(c0);
  auto head = [&](int r) { return int((0u - (base + uint32_t(r) * uint32_t(g.row_stride))) & uint32_t(V - 1)); };
  const int J = (cols + 2 * V - 1) / V;  // slots per row: enough for every head
  const ThreadLane lane = thread_lane<kThreads>(J, tid);
  int j = lane.k, G = lane.G;
  const int a0 = lane.g0;
  if (J <= kThreads) {
    // head(r + P) = head(r) for the P that row_stride·P ≡ 0 mod V (a power of 2)
    const uint32_t low = uint32_t(g.row_stride) & (0u - uint32_t(g.row_stride));
    const int P = low == 0 || low >= uint32_t(V) ? 1 : V / int(low);
    if (G >= P) G &= ~(P - 1);
    if (a0 >= G) return;
  }
  const bool same_head = ((uint32_t(G) * uint32_t(g.row_stride)) & uint32_t(V - 1)) == 0;
  // rows [a_lo, a_hi) of the window lie in the plane
  const int a_lo = r0 >= 0 ? 0 : (-r0 < rows ? -r0 : rows);
  const int a_hi = g.h - r0 < a_lo ? a_lo : (g.h - r0 < rows ? g.h - r0 : rows);
  for (; j < J; j += kThreads) {
    // slot j of row a with head f, row inside the plane or not
    auto slot = [&](int a, int f, bool inside) {
      const int e = f + (j - 1) * V;
      const int c = c0 + e;
      const bool whole = e >= 0 && e <= cols - V;
      Acc v[V];
      if (inside && c >= 0 && c <= g.w - V && e > -V && e < cols) {
        ldg_vec(plane + ((r0 + a) * g.row_stride + c), v);
      } else {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int jj = 0; jj < V; ++jj)
          v[jj] = inside && unsigned(c + jj) < unsigned(g.w) && unsigned(e + jj) < unsigned(cols)
                      ? ldg1<T, Acc>(plane + ((r0 + a) * g.row_stride + c + jj))
                      : Acc(0);
      }
      const int o = a * cols + e;
      put_slot<V>(dst + o, v, whole && (o & 3) == 0,
                  [&](int jj) { return whole || unsigned(e + jj) < unsigned(cols); });
    };
    if (same_head) {
      const int e = head(r0 + a0) + (j - 1) * V;
      const int c = c0 + e;
      if (e <= -V || e >= cols) continue;
      const bool whole = e >= 0 && e <= cols - V;
      bool in_win[V], in_plane[V];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int jj = 0; jj < V; ++jj) {
        in_win[jj] = unsigned(e + jj) < unsigned(cols);
        in_plane[jj] = in_win[jj] && unsigned(c + jj) < unsigned(g.w);
      }
      // the slot's rows: above the plane, inside, below; stores whole and aligned, or element by element
      auto walk = [&](auto aligned, auto vector, auto masked) {
        const Acc zero[V] = {};
        int a = a0;
        int o = a0 * cols + e;
        auto put = [&](const Acc* v) {
          put_slot<V>(dst + o, v, decltype(aligned)::value,
                      [&](int jj) { return !decltype(masked)::value || in_win[jj]; });
        };
        for (; a < a_lo; a += G, o += G * cols) put(zero);
        for (; a < a_hi; a += G, o += G * cols) {
          const int off = (r0 + a) * g.row_stride + c;
          Acc v[V];
          if constexpr (decltype(vector)::value) {
            ldg_vec(plane + off, v);
          } else {
#if defined(__CUDACC__)
#pragma unroll
#endif
            for (int jj = 0; jj < V; ++jj) v[jj] = in_plane[jj] ? ldg1<T, Acc>(plane + (off + jj)) : Acc(0);
          }
          put(v);
        }
        for (; a < rows; a += G, o += G * cols) put(zero);
      };
      using Yes = std::true_type;
      using No = std::false_type;
      if (!(c >= 0 && c <= g.w - V))
        walk(No{}, No{}, Yes{});
      else if (!whole)
        walk(No{}, Yes{}, Yes{});
      else if ((cols & 3) == 0 && (e & 3) == 0)
        walk(Yes{}, Yes{}, No{});
      else
        walk(No{}, Yes{}, No{});
    } else {
      for (int a = a0; a < rows; a += G) slot(a, head(r0 + a), a >= a_lo && a < a_hi);
    }
  }
}

// Stage the taps of phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mt) of one channel's filter w into
// s_w: kc rows of 4·ns taps, zero past mt and past the filter's width.
template <int kThreads, typename T, typename Acc>
RK_HD void stage_taps(const RtParams& q, const T* __restrict__ w, int sigma, int i0, int kc, int m0, int mt, int ns,
                      int tid, Acc* s_w) {
  const int wp = 4 * ns;
  for (int e = tid; e < kc * wp; e += kThreads) {
    const int i = e / wp;
    const int mm = e - i * wp;
    const int j = sigma + (m0 + mm) * q.S;
    s_w[e] = (mm < mt && j < q.kw) ? ldg1<T, Acc>(w + ((i0 + i) * q.kw + j)) : Acc(0);
  }
}

template <typename T, typename Acc, int KW>
struct RtTile {
  using Shape = typename RtShapeFor<KW>::type;
  static constexpr int kRH = Shape::kRH;
  static constexpr int kRW = Shape::kRW;
  static constexpr bool kChannelVectors = false;  // stores each thread's outputs itself (store())

  RK_HD static RtCoord coord(const RtParams& q, int64_t block) {
    RtCoord b;
    uint32_t k = uint32_t(block);  // < 2^31 blocks (plan_rt)
    const int tw = int(k % uint32_t(q.tiles_w));
    k /= uint32_t(q.tiles_w);
    const int th = int(k % uint32_t(q.tiles_h));
    k /= uint32_t(q.tiles_h);
    b.rho = int(k % uint32_t(q.R));
    k /= uint32_t(q.R);
    b.c = k % uint32_t(q.c);
    b.n = k / uint32_t(q.c);
    b.oh0 = th * Shape::kTileH;
    b.u0 = tw * Shape::kTileW;
    return b;
  }

  RK_HD static int steps(int mt) {
    if constexpr (KW > 0) return (KW + 3) / 4;
    return (mt + 3) / 4;
  }

  // Phase σ, tap rows [i0, i0 + kc), phase taps [m0, m0 + mt).
  RK_HD static void stage(const RtParams& q, const RtCoord& b, int sigma, int i0, int kc, int m0, int mt, int tid,
                          const T* __restrict__ input, const T* __restrict__ weight, Acc* smem) {
    const int ns = steps(mt);
    const int rows = Shape::in_rows(q.sh, q.dh, kc);
    const int cols = Shape::kTileW + 4 * ns;
    const int ih0 = b.oh0 * q.sh - q.ph + i0 * q.dh;
    const int iw0 = (b.u0 + m0) * q.L + b.rho * q.sw + sigma * q.dw - q.pw;
    stage_window<Shape::kThreads>(input_src(q), input + b.n * q.in_n + b.c * q.in_c, ih0, iw0, rows, cols, tid,
                                  smem);
    stage_taps<Shape::kThreads>(q, weight + b.c * q.kh * q.kw, sigma, i0, kc, m0, mt, ns, tid, smem + rows * cols);
  }

  // One 4-tap step of output row r: slide the window by 4 inputs, FMA the 4 taps (those < KW).
  RK_HD static void step(const Acc* x, const Acc* w4p, int s, Acc* win, Acc* acc_r) {
    ld4(x + kRW + 4 * s, win + kRW);
    Acc wv[4];
    ld4(w4p + 4 * s, wv);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int jj = 0; jj < 4; ++jj) {
      if (KW == 0 || 4 * s + jj < KW) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int cc = 0; cc < kRW; ++cc) acc_r[cc] += win[cc + jj] * wv[jj];
      }
    }
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < kRW; ++k) win[k] = win[k + 4];
  }

  RK_HD static void compute(const RtParams& q, const RtCoord& /* b */, int kc, int mt, int tid, const Acc* smem,
                            Acc* acc /* [kRH * kRW] */) {
    const int ns = steps(mt);
    const int cols = Shape::kTileW + 4 * ns;
    const int tx = tid % Shape::kThreadsW;
    const int ty = tid / Shape::kThreadsW;
    accumulate(q, kc, ns, cols, smem + ty * kRH * q.sh * cols + tx * kRW, smem + Shape::in_rows(q.sh, q.dh, kc) * cols,
               acc);
  }

  // The thread's kRH x kRW outputs over tap rows [0, kc): its staged window starts at s_thr (rows of `cols`),
  // the taps at s_w (rows of 4·ns).
  RK_HD static void accumulate(const RtParams& q, int kc, int ns, int cols, const Acc* s_thr, const Acc* s_w,
                               Acc* acc /* [kRH * kRW] */) {
    const int row_step = q.sh * cols;
#if defined(__CUDACC__)
#pragma unroll 1
#endif
    for (int i = 0; i < kc; ++i) {
      const Acc* w_row = s_w + i * 4 * ns;
      const Acc* x_i = s_thr + i * q.dh * cols;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int r = 0; r < kRH; ++r) {
        const Acc* x = x_i + r * row_step;
        Acc win[kRW + 4];
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int v = 0; v < kRW / 4; ++v) ld4(x + 4 * v, win + 4 * v);
        if constexpr (KW > 0) {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int s = 0; s < (KW + 3) / 4; ++s) step(x, w_row, s, win, acc + r * kRW);
        } else {
          for (int s = 0; s < ns; ++s) step(x, w_row, s, win, acc + r * kRW);
        }
      }
    }
  }

  RK_HD static void store(const RtParams& q, const RtCoord& b, int tid, const Acc* acc, const T* __restrict__ bias,
                          T* __restrict__ output) {
    const int tx = tid % Shape::kThreadsW;
    const int ty = tid / Shape::kThreadsW;
    const Acc bv = bias != nullptr ? Cvt<T, Acc>::load(bias[b.c]) : Acc(0);
    store_outputs<T, Acc, kRH, kRW>(q, output + b.n * q.out_n + b.c * q.out_c, b.oh0 + ty * kRH, b.rho,
                                    b.u0 + tx * kRW, acc, bv);
  }
};

// Plans the register-tiled forward of `p` with Shape: false when not even one tap row and one 4-tap
// step fit in shared memory, or a plane offset does not fit in 32 bits. kw_fixed > 0: the taps row
// must be staged whole (compile-time tap count).
template <typename Shape>
inline bool plan_rt(const Params& p, RtParams& q, int64_t kw_fixed) {
  const int64_t g = gcd64(p.sw, p.dw);
  const int64_t L = p.sw / g * p.dw, R = L / p.sw, S = L / p.dw;
  if (kw_fixed > 0 && (S != 1 || p.kw != kw_fixed)) return false;
  const int64_t span_in = (p.h - 1) * (p.in_stride[2] < 0 ? -p.in_stride[2] : p.in_stride[2]) +
                          (p.w - 1) * (p.in_stride[3] < 0 ? -p.in_stride[3] : p.in_stride[3]);
  const int64_t span_out = (p.oh - 1) * p.out_stride[2] + (p.ow - 1) * p.out_stride[3];
  const int64_t lim = int64_t(1) << 30;
  if (span_in >= lim || span_out >= lim || p.h >= lim || p.w >= lim || p.kh * p.kw >= lim || L * (p.w + p.kw) >= lim ||
      p.sh * (p.oh + Shape::kTileH) + p.dh * p.kh >= lim || imax(p.ph, -p.ph) >= lim || imax(p.pw, -p.pw) >= lim)
    return false;
  const int64_t m_max = cdiv(p.kw, S);
  int64_t kc = p.kh, mc = m_max;
  auto fits = [&](int64_t kc_, int64_t mc_) {
    return Shape::smem_elems(int(p.sh), int(p.dh), int(kc_), int(mc_)) <= kSmemBudgetElems;
  };
  if (!fits(1, kw_fixed > 0 ? mc : imin(mc, 4))) return false;
  while (kc > 1 && !fits(kc, mc)) kc = (kc + 1) / 2;
  while (mc > 4 && !fits(kc, mc)) mc = imax(4, cdiv(mc, 8) * 4);
  while (kc > 1 && !fits(kc, mc)) kc = (kc + 1) / 2;
  if (!fits(kc, mc)) return false;
  while (kc < p.kh && fits(kc + 1, mc)) ++kc;
  if (p.n * p.c * R * cdiv(p.oh, Shape::kTileH) * cdiv(cdiv(p.ow, R), Shape::kTileW) >= (int64_t(1) << 31)) return false;
  q.c = int(p.c);
  q.h = int(p.h);
  q.w = int(p.w);
  q.oh = int(p.oh);
  q.ow = int(p.ow);
  q.kh = int(p.kh);
  q.kw = int(p.kw);
  q.sh = int(p.sh);
  q.dh = int(p.dh);
  q.ph = int(p.ph);
  q.sw = int(p.sw);
  q.dw = int(p.dw);
  q.pw = int(p.pw);
  q.L = int(L);
  q.R = int(R);
  q.S = int(S);
  q.tiles_h = int(cdiv(p.oh, Shape::kTileH));
  q.tiles_w = int(cdiv(cdiv(p.ow, R), Shape::kTileW));
  q.kc = int(kc);
  q.mc = int(mc);
  q.in_n = p.in_stride[0];
  q.in_c = p.in_stride[1];
  q.out_n = p.out_stride[0];
  q.out_c = p.out_stride[1];
  q.in_h = int(p.in_stride[2]);
  q.in_w = int(p.in_stride[3]);
  q.out_h = int(p.out_stride[2]);
  q.out_w = int(p.out_stride[3]);
  return true;
}

// `p` with H and W swapped (a kh x 1 filter becomes 1 x kh over the same contiguous taps).
inline Params transposed(const Params& p) {
  Params t = p;
  t.h = p.w, t.w = p.h, t.oh = p.ow, t.ow = p.oh, t.kh = p.kw, t.kw = p.kh;
  t.sh = p.sw, t.sw = p.sh, t.ph = p.pw, t.pw = p.ph, t.dh = p.dw, t.dw = p.dh;
  t.in_stride[2] = p.in_stride[3], t.in_stride[3] = p.in_stride[2];
  t.out_stride[2] = p.out_stride[3], t.out_stride[3] = p.out_stride[2];
  return t;
}

// `p` as the small-map, channel-group and weight-gradient tiles plan it: a kh x 1 filter transposed, so that its taps
// lie along the register window.
inline Params as_planned(const Params& p) { return (p.kw == 1 && p.kh > 1) ? transposed(p) : p; }

// Elements of `p`'s storage type in one 16-byte vector (V of the channel vectors and the one-pass staging).
inline int vec_elems(const Params& p) { return int(16 / imax(p.elem_bytes, 1)); }

inline int64_t num_rt_blocks(const Params& p, const RtParams& q) {
  return p.n * p.c * int64_t(q.R) * q.tiles_h * q.tiles_w;
}

template <typename Shape>
inline int64_t rt_smem_elems(const RtParams& q) {
  return Shape::smem_elems(q.sh, q.dh, q.kc, q.mc);
}

}  // namespace rk::dw
