#include "matmul.h"

#include <atomic>
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

namespace {

// rows [r0, r1) x activation rows [c0, c1) in tiles of tr x tc (vec_dot per pair where the type has no tile).
// Tiles start at multiples of tr and tc from r0 and c0, and every tile computes each of its (row, column)
// products with the same operations, so a product never depends on the tiling, the batch or the threads.
void compute_block(const GemmKernel& g, const TypeTraits& wt, int64_t k, const uint8_t* w, size_t w_row_bytes,
                   const uint8_t* xq, size_t x_row_bytes, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t c0,
                   int64_t c1, int64_t tr, int64_t tc) {
    for (int64_t r = r0; r < r1; r += tr) {
        const int nr = int(min64(tr, r1 - r));
        const uint8_t* wr = w + size_t(r) * w_row_bytes;
        for (int64_t c = c0; c < c1; c += tc) {
            const int nc = int(min64(tc, c1 - c));
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

// Shared by the static and the dynamic split.
struct Problem {
    const TypeTraits* wt;
    const GemmKernel* g;
    size_t w_row_bytes, x_row_bytes;
    int64_t tr, tc, block;  // tile rows, tile columns, activation rows per column block

    Problem(Type wtype, int64_t k, Isa isa) {
        wt = &traits(wtype, isa);
        const TypeTraits& at = traits(wt->vec_dot_type, isa);
        w_row_bytes = size_t(k / wt->block_size) * wt->type_size;
        x_row_bytes = size_t(k / at.block_size) * at.type_size;
        g = &gemm_kernel(wtype, isa);
        tr = g->tile ? g->tile_rows : 1;
        tc = g->tile ? g->tile_cols : 1;
        block = x_row_bytes ? int64_t(kActivationBlockBytes / x_row_bytes) / tc * tc : tc;
        if (block < tc) block = tc;
    }
};

}  // namespace

void matmul_rows(Type wtype, const void* W, int64_t rows, int64_t k, const uint8_t* xq, int64_t n, float* y,
                 int64_t ldy, int ith, int nth, Isa isa) {
    const Problem p(wtype, k, isa);
    const auto* w = static_cast<const uint8_t*>(W);

    // Each thread takes whole row tiles while there are enough to share; otherwise (few rows, many
    // activations) whole column tiles. Either way every (row, column) is computed by exactly one thread.
    int64_t r0 = 0, r1 = rows, c0 = 0, c1 = n;
    const int64_t row_tiles = (rows + p.tr - 1) / p.tr, col_tiles = (n + p.tc - 1) / p.tc;
    if (row_tiles >= 4 * int64_t(nth) || col_tiles < 2 * int64_t(nth)) {
        split_range(row_tiles, ith, nth, r0, r1);
        r0 *= p.tr;
        r1 = min64(r1 * p.tr, rows);
    } else {
        split_range(col_tiles, ith, nth, c0, c1);
        c0 *= p.tc;
        c1 = min64(c1 * p.tc, n);
    }
    if (r0 >= r1 || c0 >= c1) return;
    // Column blocks stay in L2 while the thread's row tiles pass over them, each tile reused from L1.
    for (int64_t cb = c0; cb < c1; cb += p.block)
        compute_block(*p.g, *p.wt, k, w, p.w_row_bytes, xq, p.x_row_bytes, y, ldy, r0, r1, cb, min64(cb + p.block, c1),
                      p.tr, p.tc);
}

void matmul(ThreadPool& pool, Type wtype, const void* W, int64_t rows, int64_t k, const float* x, int64_t n,
            float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa) {
    const TypeTraits& wt = traits(wtype, isa);
    if (!wt.vec_dot) throw std::invalid_argument(std::string("no dot product for type ") + wt.name);
    if (k % wt.block_size) throw std::invalid_argument("k is not a multiple of the block size");
    scratch.resize(activation_row_bytes(wtype, k) * size_t(n));
    uint8_t* xq = scratch.data();
    // Quantizing the activations costs O(n k) next to the product's O(n k rows): the caller does it, so the
    // threads need no barrier.
    quantize_activations(wtype, x, n, k, xq, 0, 1, isa);
    if (n == 0 || rows == 0) return;

    // Work units of (column block, row chunk), column-block-major, taken from a shared counter: a thread that
    // starts late or is preempted leaves its share to the others instead of holding them up. About 8 units per
    // thread; chunks are whole row tiles, so the tiling (and every result) is the static split's.
    const Problem p(wtype, k, isa);
    const int nth = pool.size();
    const int64_t row_tiles = (rows + p.tr - 1) / p.tr;
    const int64_t n_blocks = (n + p.block - 1) / p.block;
    int64_t chunks = (8 * int64_t(nth) + n_blocks - 1) / n_blocks;
    if (chunks > row_tiles) chunks = row_tiles;
    const int64_t chunk_rows = (row_tiles + chunks - 1) / chunks * p.tr;
    chunks = (rows + chunk_rows - 1) / chunk_rows;
    const int64_t units = chunks * n_blocks;
    std::atomic<int64_t> next{0};
    const auto* w = static_cast<const uint8_t*>(W);
    pool.run([&](int, int) {
        for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
            const int64_t cb = u / chunks * p.block, r0 = u % chunks * chunk_rows;
            compute_block(*p.g, *p.wt, k, w, p.w_row_bytes, xq, p.x_row_bytes, y, ldy, r0, min64(r0 + chunk_rows, rows),
                          cb, min64(cb + p.block, n), p.tr, p.tc);
        }
    });
}

}  // namespace rz
