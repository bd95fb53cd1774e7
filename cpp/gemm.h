// Multi-row dot-product tiles for the batched matmul (an addition to quants.h's per-pair vec_dot).
//
// A tile computes nr weight rows × nc activation rows in one pass over k, so each weight block is loaded
// and unpacked once for nc activations, and each activation block once for nr weight rows. The SIMD units
// fill a table of tiles per ISA; matmul.cpp picks them and falls back to vec_dot where a type has none.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quants.h"

namespace rz {

// y[c * ldy + r] = dot(weight row r, activation row c) for r < nr, c < nc.
//   w: nr weight rows, w_stride bytes apart; x: nc activation rows in the type's vec_dot_type, x_stride
//   bytes apart; k elements each (a multiple of the weight type's block size).
//   Requires 1 <= nr <= tile_rows and 1 <= nc <= tile_cols.
using gemm_tile_fn = void (*)(int64_t k, const void* w, size_t w_stride, const void* x, size_t x_stride, float* y,
                              int64_t ldy, int nr, int nc);

struct GemmKernel {
    gemm_tile_fn tile = nullptr;  // nullptr: no tile for this type at this ISA (matmul uses vec_dot)
    int tile_rows = 0;            // largest nr, the tile's preferred height
    int tile_cols = 0;            // largest nc, the tile's preferred width
};

using GemmTable = GemmKernel[kNumTypeIds];

// Each fills the entries it accelerates. They only store pointers, are built for the baseline ISA, and may
// be called on any CPU; the tiles themselves only where cpuid reports the ISA.
void fill_gemm_avx2(GemmTable& t);
void fill_gemm_avx512(GemmTable& t);

}  // namespace rz
