// CPU emulation of the batched tile engine's CUDA launch (gemm_kernel.cuh): the same tiles (gemm_tile.h), same
// shape choice (with_shape), run block by block, thread by thread, phase by phase, with shared memory poisoned
// before each stage so that a read of anything the stage phase did not write shows. A test vehicle for the GPU
// algorithm on machines without a GPU, not a fast CPU GEMM. Host code only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/gemm_tile.h"

namespace rk::gemm {

template <typename Prob, typename Shape>
void emulate_gemm_shape(const Prob& pr) {
  using Tile = GemmTile<Prob, Shape>;
  using Acc = typename Prob::Acc;
  at::parallel_for(0, Tile::num_blocks(pr), 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> s_a(Shape::kSmemA), s_b(Shape::kSmemB);
    std::vector<Acc> acc(static_cast<size_t>(Shape::kThreads) * Shape::kAccPerThread);
    for (int64_t block = begin; block < end; ++block) {
      const TileCoord c = Tile::coord(pr, block);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t k0 = c.k_begin; k0 < c.k_end; k0 += Shape::kTileK) {
        std::fill(s_a.begin(), s_a.end(), std::numeric_limits<Acc>::quiet_NaN());
        std::fill(s_b.begin(), s_b.end(), std::numeric_limits<Acc>::quiet_NaN());
        for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::stage(pr, c, k0, tid, s_a.data(), s_b.data());
        for (int tid = 0; tid < Shape::kThreads; ++tid)
          Tile::compute(tid, s_a.data(), s_b.data(), acc.data() + tid * Shape::kAccPerThread);
      }
      for (int tid = 0; tid < Shape::kThreads; ++tid) Tile::store(pr, c, tid, acc.data() + tid * Shape::kAccPerThread);
    }
  });
}

template <typename Prob>
void emulate_gemm(const Prob& pr) {
  with_shape(pr, [&](auto shape) { emulate_gemm_shape<Prob, typename decltype(shape)::type>(pr); });
}

}  // namespace rk::gemm
