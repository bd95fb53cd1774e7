#include "matmul.h"

#include <stdexcept>

#include "gemm.h"

namespace rz {
namespace {

// Tile tables per ISA: AVX-512 starts from AVX2's and overrides what it accelerates; scalar has none.
struct GemmTables {
    GemmTable t[kNumIsa];
    GemmTables() {
        fill_gemm_avx2(t[int(Isa::Avx2)]);
        for (int i = 0; i < kNumTypeIds; ++i) t[int(Isa::Avx512)][i] = t[int(Isa::Avx2)][i];
        fill_gemm_avx512(t[int(Isa::Avx512)]);
    }
};

const GemmKernel& gemm_kernel(Type wtype, Isa isa) {
    static const GemmTables tables;
    return tables.t[int(isa)][int(wtype)];
}

// Activation rows per column block: the block (in the activation format) should stay in L2 while every
// weight tile of the thread's rows passes over it, each tile reused from L1 for the whole block.
constexpr size_t kActivationBlockBytes = 192 * 1024;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace

size_t activation_row_bytes(Type wtype, int64_t k) {
    const TypeTraits& at = traits(traits(wtype, Isa::Scalar).vec_dot_type, Isa::Scalar);
    return size_t(k / at.block_size) * at.type_size;
}

void quantize_activations(Type wtype, const float* x, int64_t n, int64_t k, uint8_t* xq, int ith, int nth,
                          Isa isa) {
    const TypeTraits& at = traits(traits(wtype, isa).vec_dot_type, isa);
    const size_t row_bytes = size_t(k / at.block_size) * at.type_size;
    int64_t begin, end;
    split_range(n, ith, nth, begin, end);
    for (int64_t i = begin; i < end; ++i) at.quantize(x + i * k, xq + i * row_bytes, k);
}

void matmul_rows(Type wtype, const void* W, int64_t rows, int64_t k, const uint8_t* xq, int64_t n, float* y,
                 int64_t ldy, int ith, int nth, Isa isa) {
    const TypeTraits& wt = traits(wtype, isa);
    const TypeTraits& at = traits(wt.vec_dot_type, isa);
    const size_t w_row_bytes = size_t(k / wt.block_size) * wt.type_size;
    const size_t x_row_bytes = size_t(k / at.block_size) * at.type_size;
    const auto* w = static_cast<const uint8_t*>(W);
    const GemmKernel& g = gemm_kernel(wtype, isa);
    const int64_t tr = g.tile ? g.tile_rows : 1, tc = g.tile ? g.tile_cols : 1;

    // Each thread takes whole row tiles while there are enough to share; otherwise (few rows, many
    // activations) whole column tiles. Either way every (row, column) is computed by exactly one thread.
    int64_t r0 = 0, r1 = rows, c0 = 0, c1 = n;
    const int64_t row_tiles = (rows + tr - 1) / tr, col_tiles = (n + tc - 1) / tc;
    if (row_tiles >= 4 * int64_t(nth) || col_tiles < 2 * int64_t(nth)) {
        split_range(row_tiles, ith, nth, r0, r1);
        r0 *= tr;
        r1 = min64(r1 * tr, rows);
    } else {
        split_range(col_tiles, ith, nth, c0, c1);
        c0 *= tc;
        c1 = min64(c1 * tc, n);
    }
    if (r0 >= r1 || c0 >= c1) return;

    int64_t block = x_row_bytes ? int64_t(kActivationBlockBytes / x_row_bytes) / tc * tc : n;
    if (block < tc) block = tc;
    for (int64_t cb = c0; cb < c1; cb += block) {
        const int64_t ce = min64(cb + block, c1);
        for (int64_t r = r0; r < r1; r += tr) {
            const int nr = int(min64(tr, r1 - r));
            const uint8_t* wr = w + size_t(r) * w_row_bytes;
            for (int64_t c = cb; c < ce; c += tc) {
                const int nc = int(min64(tc, ce - c));
                const uint8_t* xc = xq + size_t(c) * x_row_bytes;
                if (g.tile) {
                    g.tile(k, wr, w_row_bytes, xc, x_row_bytes, y + c * ldy + r, ldy, nr, nc);
                } else {
                    for (int i = 0; i < nr; ++i)
                        for (int j = 0; j < nc; ++j)
                            wt.vec_dot(k, y + (c + j) * ldy + r + i, wr + size_t(i) * w_row_bytes, xc + size_t(j) * x_row_bytes);
                }
            }
        }
    }
}

void matmul(ThreadPool& pool, Type wtype, const void* W, int64_t rows, int64_t k, const float* x, int64_t n,
            float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa) {
    const TypeTraits& wt = traits(wtype, isa);
    if (!wt.vec_dot) throw std::invalid_argument(std::string("no dot product for type ") + wt.name);
    if (k % wt.block_size) throw std::invalid_argument("k is not a multiple of the block size");
    scratch.resize(activation_row_bytes(wtype, k) * size_t(n));
    uint8_t* xq = scratch.data();
    pool.run([&](int ith, int nth) {
        quantize_activations(wtype, x, n, k, xq, ith, nth, isa);
        pool.barrier();
        matmul_rows(wtype, W, rows, k, xq, n, y, ldy, ith, nth, isa);
    });
}

}  // namespace rz
