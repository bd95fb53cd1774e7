// Weights repacked for the matrix products: kPackRows rows interleaved block by block.
//
// In a GGUF matrix each row's blocks are contiguous, so a tile that multiplies several rows by one activation
// row ends each product with a horizontal sum, and AVX2 has no cheap one (vphaddw runs at a fifth of
// vpmaddubsw's rate on the EPYC we measure on). Interleaved, one 256-bit load holds four consecutive quants of
// each of 8 rows, one byte-product instruction with four broadcast activation bytes advances all 8 rows, and
// each row's sum stays in its own lane to the end: about half the instructions per product.
//
// A packed matrix is a copy made at load time next to the GGUF original (which the scalar kernels and
// embedding lookups keep reading). At one ISA level every product of a packed matrix, whatever the batch, goes
// through the same per-lane operations, so a row's result never depends on the batch (matmul.h's promise).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "quants.h"
#include "threadpool.h"

namespace rz {

constexpr int kPackRows = 8;

// Q4_1, block b of rows 8g..8g+7: their scales and mins, then 4 chunks of 32 bytes; chunk j holds the packed
// quant bytes qs[4j..4j+3] of row 0, row 1, ..., row 7. A byte's low nibble is element 4j+i, its high nibble
// element 16+4j+i (as in block_q4_1).
struct block_q4_1x8 {
    f16_t d[kPackRows];
    f16_t m[kPackRows];
    uint8_t qs[kPackRows * 16];
};
static_assert(sizeof(block_q4_1x8) == 160, "block_q4_1x8 size");

// Q4_0: the same without mins.
struct block_q4_0x8 {
    f16_t d[kPackRows];
    uint8_t qs[kPackRows * 16];
};
static_assert(sizeof(block_q4_0x8) == 144, "block_q4_0x8 size");

// Q5_0: scales, fifth bits regrouped, then the nibbles as Q4_1's. Chunk half h (h = 0..7; j = h / 2) holds the
// elements e(h, i) = 16 (h % 2) + 4 j + i; bit h of nq[4r + i] is set where row r's element e(h, i) has its fifth
// bit CLEAR (w = q - 16: those take the -16).
struct block_q5_0x8 {
    f16_t d[kPackRows];
    uint8_t nq[kPackRows * 4];
    uint8_t qs[kPackRows * 16];
};
static_assert(sizeof(block_q5_0x8) == 176, "block_q5_0x8 size");

// Q4_K, super-block b (256 elements) of 8 rows: scales, mins' scales, the 6-bit sub-block scales sc[s][r] and mins
// m[p][r][s % 2] (p = s / 2) unpacked to bytes, then per sub-block pair p 8 chunks of 32 bytes; chunk j holds
// qs[32p + 4j .. 32p + 4j + 3] of each row in turn (low nibbles: sub-block 2p's elements 4j + i, high: 2p + 1's).
struct block_q4_Kx8 {
    f16_t d[kPackRows];
    f16_t dmin[kPackRows];
    uint8_t sc[8][kPackRows];
    uint8_t m[4][kPackRows][2];
    uint8_t qs[4][8][32];
};
static_assert(sizeof(block_q4_Kx8) == 1184, "block_q4_Kx8 size");

// Q8_0, block b of rows 8g..8g+7: their scales, then 8 chunks of 32 bytes; chunk j holds qs[4j..4j+3] of row 0,
// row 1, ..., row 7.
struct block_q8_0x8 {
    f16_t d[kPackRows];
    int8_t qs[kPackRows * 32];
};
static_assert(sizeof(block_q8_0x8) == 272, "block_q8_0x8 size");

// Whether `wtype` has a packed layout and kernels, `rows` fit it (a multiple of kPackRows) and the CPU runs them.
bool packable(Type wtype, int64_t rows, int64_t k);

// Bytes of the packed copy of a rows x k matrix (packable ones).
size_t packed_bytes(Type wtype, int64_t rows, int64_t k);

// The packed copy of a rows x k matrix in GGUF blocks: rows / kPackRows groups, each its blocks in order.
std::vector<uint8_t> pack_weights(Type wtype, const void* w, int64_t rows, int64_t k);

// matmul_rows (matmul.h) for a packed matrix: y[i*ldy + r] = dot(row r, activation row i), xq rows as
// quantize_packed_row writes them. Work units are (activation block, pass of groups); with `next` (zeroed before
// the threads start) and more than one activation row the threads claim them from that shared counter, so one the
// VM preempts leaves its share to the others; otherwise thread ith of nth takes a fixed contiguous share. Either
// way each product is computed the same way.
// isa: Avx2 or Avx512 (their kernels give the same bits; Scalar has none).
void matmul_packed_rows(Type wtype, const uint8_t* packed, int64_t rows, int64_t k, const uint8_t* xq, int64_t n,
                        float* y, int64_t ldy, int ith, int nth, Isa isa, std::atomic<int64_t>* next = nullptr);

// An activation row for a packed matrix: the row in the weight type's vec_dot_type (activation_row_bytes), then,
// from packed_scales_offset of it, its blocks' scales again as floats — Q8_1's d and s per block, Q8_0's d — so
// the tiles broadcast them from memory instead of converting f16 in the inner loop. The values are the f16 ones,
// widened exactly, so the products equal the unpacked kernels'. Q8_0 rows then hold each block's quant sum as an
// int32 (the AVX-512 tiles multiply unsigned weights w + o and take o times it back). Q8_K rows (Q4_K) are
// unchanged.
size_t packed_activation_row_bytes(Type wtype, int64_t k);
inline size_t packed_scales_offset(size_t quant_bytes) { return (quant_bytes + 3) / 4 * 4; }
// Quantizes one row of k floats for the packed matrix type wtype into out (packed_activation_row_bytes).
void quantize_packed_row(Type wtype, const float* x, int64_t k, uint8_t* out, Isa isa);

// Asks for (into L2) the first max_bytes of the weights that thread ith of nth reads first in the same call of
// matmul_packed_rows with a `next` counter, so that they are on their way while the thread waits at the barrier
// before it. Only a hint: any thread may end up with any unit.
void prefetch_packed_start(Type wtype, const uint8_t* packed, int64_t rows, int64_t k, int64_t n, int ith, int nth,
                           Isa isa, size_t max_bytes);

// matmul (matmul.h) for a packed matrix, on the pool: quantizes x into scratch, then the threads split the rows.
void matmul_packed(ThreadPool& pool, Type wtype, const uint8_t* packed, int64_t rows, int64_t k, const float* x,
                   int64_t n, float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa);

// ---- the kernels (AVX2 and AVX-512 objects) ---------------------------------------------------------------
// One pass: y[c * ldy + 8g + r] for groups g < n_groups and activation rows c < nc (each at most the pass shape
// below); w points at the first group's first block, groups group_bytes apart; x: nc activation rows
// (quantize_packed_row's) x_stride bytes apart. nullptr where the type has no packed kernel.
constexpr int kPassGroups = 2;  // for Q4_1 the best of 1x4, 1x6, 2x2, 2x3 and 2x4 on the EPYC, by 5-10%
constexpr int kPassCols = 2;
using packed_tile_fn = void (*)(int64_t k, const uint8_t* w, size_t group_bytes, const uint8_t* x, size_t x_stride,
                                float* y, int64_t ldy, int n_groups, int nc);
packed_tile_fn packed_tile_avx2(Type wtype);
// The AVX-512 VNNI tiles: the same results bit for bit, in passes of up to 4 groups (two zmm of 16 rows) x 4
// activation rows.
constexpr int kPassGroupsAvx512 = 4;
constexpr int kPassColsAvx512 = 4;
packed_tile_fn packed_tile_avx512(Type wtype);

}  // namespace rz
