// A batched, tiled GEMM whose operands are gathered and whose result is scattered by a "problem" type:
// C[batch][m][n] = Σ_k A(batch, m, k) · B(batch, k, n), k in [k_begin(batch), k_end(batch)).
//
// Written once as host+device code (RK_HD) for the CUDA kernel (gemm_kernel.cuh) and its CPU emulation
// (gemm_emulation.h); used by the KernelWarehouse ops (kernelwarehouse/kw_problems.h) and the depthwise
// Toeplitz GEMMs (depthwise_conv2d/depthwise_conv2d_toeplitz.h). One thread block computes one
// kTileM x kTileN tile of one batch:
//
//   for each chunk of kTileK reduction indices:
//     stage:   the block gathers the A chunk (kTileK x kTileM) and the B chunk (kTileK x kTileN) into shared
//              memory, converted to the accumulation type (zero outside the problem)
//     barrier
//     compute: each thread accumulates its kRowsM x kRowsN outputs (rows tm + r·kThreadsM, columns
//              tn + c·kThreadsN: strided, so that a warp reads consecutive shared-memory words)
//     barrier
//   store:     each thread hands its outputs to the problem's epilogue (scatter, bias, cast)
//
// Plain FMA on CUDA cores with fp32 (fp64 in the emulation) accumulation: no tensor cores, no warp shuffles,
// so every line of the kernel runs in the emulation. A problem provides (all RK_HD):
//   using T (storage) / Acc; int64_t batches(), M(), N(); k_begin(batch), k_end(batch);
//   Acc load_a(batch, m, k); Acc load_b(batch, k, n); void store(batch, m, n, Acc v).
#pragma once

#include "common/hd.h"

namespace rk::gemm {

template <int TileM, int TileN, int TileK, int ThreadsM, int ThreadsN>
struct GemmShape {
  static constexpr int kTileM = TileM;
  static constexpr int kTileN = TileN;
  static constexpr int kTileK = TileK;
  static constexpr int kThreadsM = ThreadsM;
  static constexpr int kThreadsN = ThreadsN;
  static constexpr int kThreads = ThreadsM * ThreadsN;
  static constexpr int kRowsM = TileM / ThreadsM;
  static constexpr int kRowsN = TileN / ThreadsN;
  static constexpr int kAccPerThread = kRowsM * kRowsN;
  static constexpr int kSmemA = TileK * TileM;
  static constexpr int kSmemB = TileK * TileN;
  static_assert(TileM % ThreadsM == 0 && TileN % ThreadsN == 0, "tile must split evenly over threads");
};

// 64 x 64 outputs, 256 threads of 4 x 4 (dense layers); 4 x 256, 256 threads of 1 x 4 (thin: depthwise and
// other problems with M <= 8, e.g. one output channel per group).
using WideShape = GemmShape<64, 64, 16, 16, 16>;
using ThinShape = GemmShape<4, 256, 16, 4, 64>;

template <typename Shape>
struct ShapeTag {
  using type = Shape;
};

// The engine's one shape choice, made by the CUDA launcher (run_gemm) and the CPU emulation (emulate_gemm)
// alike: calls f(ShapeTag<ThinShape>{}) for problems with at most 8 rows per batch, else
// f(ShapeTag<WideShape>{}).
template <typename Prob, typename F>
decltype(auto) with_shape(const Prob& pr, F&& f) {
  if (pr.M() <= 8) return f(ShapeTag<ThinShape>{});
  return f(ShapeTag<WideShape>{});
}

struct TileCoord {
  int64_t batch, m0, n0, k_begin, k_end;
};

template <typename Prob, typename Shape>
struct GemmTile {
  using Acc = typename Prob::Acc;

  RK_HD static int64_t tiles_m(const Prob& pr) { return cdiv(pr.M(), Shape::kTileM); }
  RK_HD static int64_t tiles_n(const Prob& pr) { return cdiv(pr.N(), Shape::kTileN); }
  RK_HD static int64_t num_blocks(const Prob& pr) { return pr.batches() * tiles_m(pr) * tiles_n(pr); }

  RK_HD static TileCoord coord(const Prob& pr, int64_t block) {
    TileCoord c;
    const int64_t tn = tiles_n(pr), tm = tiles_m(pr);
    c.n0 = (block % tn) * Shape::kTileN;
    block /= tn;
    c.m0 = (block % tm) * Shape::kTileM;
    c.batch = block / tm;
    c.k_begin = pr.k_begin(c.batch);
    c.k_end = pr.k_end(c.batch);
    return c;
  }

  RK_HD static void stage(const Prob& pr, const TileCoord& c, int64_t k0, int tid, Acc* s_a, Acc* s_b) {
    for (int i = tid; i < Shape::kSmemA; i += Shape::kThreads) {
      const int kk = i % Shape::kTileK;  // consecutive threads: consecutive k
      const int mm = i / Shape::kTileK;
      const int64_t m = c.m0 + mm, k = k0 + kk;
      s_a[kk * Shape::kTileM + mm] = (m < pr.M() && k < c.k_end) ? pr.load_a(c.batch, m, k) : Acc(0);
    }
    for (int i = tid; i < Shape::kSmemB; i += Shape::kThreads) {
      const int nn = i % Shape::kTileN;  // consecutive threads: consecutive n
      const int kk = i / Shape::kTileN;
      const int64_t n = c.n0 + nn, k = k0 + kk;
      s_b[kk * Shape::kTileN + nn] = (n < pr.N() && k < c.k_end) ? pr.load_b(c.batch, k, n) : Acc(0);
    }
  }

  RK_HD static void compute(int tid, const Acc* s_a, const Acc* s_b, Acc* acc) {
    const int tm = tid / Shape::kThreadsN;
    const int tn = tid % Shape::kThreadsN;
    for (int kk = 0; kk < Shape::kTileK; ++kk) {
      Acc a[Shape::kRowsM];
      Acc b[Shape::kRowsN];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int r = 0; r < Shape::kRowsM; ++r) a[r] = s_a[kk * Shape::kTileM + tm + r * Shape::kThreadsM];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int q = 0; q < Shape::kRowsN; ++q) b[q] = s_b[kk * Shape::kTileN + tn + q * Shape::kThreadsN];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int r = 0; r < Shape::kRowsM; ++r) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int q = 0; q < Shape::kRowsN; ++q) acc[r * Shape::kRowsN + q] += a[r] * b[q];
      }
    }
  }

  RK_HD static void store(const Prob& pr, const TileCoord& c, int tid, const Acc* acc) {
    const int tm = tid / Shape::kThreadsN;
    const int tn = tid % Shape::kThreadsN;
    for (int r = 0; r < Shape::kRowsM; ++r) {
      const int64_t m = c.m0 + tm + r * Shape::kThreadsM;
      if (m >= pr.M()) continue;
      for (int q = 0; q < Shape::kRowsN; ++q) {
        const int64_t n = c.n0 + tn + q * Shape::kThreadsN;
        if (n < pr.N()) pr.store(c.batch, m, n, acc[r * Shape::kRowsN + q]);
      }
    }
  }
};

}  // namespace rk::gemm
