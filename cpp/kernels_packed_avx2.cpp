// AVX2 kernels for packed weights (packed.h). Compiled with -mavx2 -mfma -mf16c; only reached when cpuid says so.
// As in kernels_avx2.cpp, nothing here may instantiate a std:: template or define an external inline function.
#include <immintrin.h>

#include <cstring>

#include "packed.h"

namespace rz {
namespace {

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
constexpr int kAhead = 4;  // blocks ahead a decode prefetches (2, 4 and 8 measured alike)
template <typename P>
inline void prefetch_block(const P* p) {
    const char* c = reinterpret_cast<const char*>(p);
    for (size_t i = 0; i < sizeof(P); i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Chunk bytes -> their low (high = 0) or high (high = 1) nibbles, one per byte.
inline __m256i nibbles(const uint8_t* chunk, int high) {
    return _mm256_and_si256(_mm256_srli_epi16(load256(chunk), 4 * high), _mm256_set1_epi8(0x0F));
}

// Keeps the compiler from regrouping integer sums (legal, but it then holds every product at once and spills).
inline __m256i pinned(__m256i v) {
    __asm__("" : "+x"(v));
    return v;
}
struct TileArgs {
    int64_t k;
    const uint8_t* w;
    size_t gb;  // bytes between groups
    const uint8_t* x;
    size_t xs;  // bytes between activation rows
    float* y;
    int64_t ldy;
};

// A tile's G weight groups or C activation rows: base, base + stride, ...
template <typename P, int N>
inline void rows_at(const uint8_t* base, size_t stride, const P* (&out)[N]) {
    for (int i = 0; i < N; ++i) out[i] = reinterpret_cast<const P*>(base + size_t(i) * stride);
}
template <int G, int C>
inline void zero(__m256 (&acc)[G][C]) {
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) acc[g][c] = _mm256_setzero_ps();
}
// Lane r of acc[g][c] is the product of row 8g + r with activation row c.
template <int G, int C>
inline void store(const TileArgs& a, const __m256 (&acc)[G][C]) {
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) _mm256_storeu_ps(a.y + c * a.ldy + g * kPackRows, acc[g][c]);
}

// Activation row c's scales as floats (packed.h: after its nb blocks of B).
template <typename B, int C>
inline void scales_at(const B* const (&X)[C], int64_t nb, const float* (&out)[C]) {
    for (int c = 0; c < C; ++c)
        out[c] = reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(X[c]) +
                                                packed_scales_offset(size_t(nb) * sizeof(B)));
}

// Q4_1 x Q8_1, G groups of 8 rows x C activation rows. Per block and lane (row): the 32 products q p summed
// exactly in int16 (each vpmaddubsw lane adds two, at most 2 * 15 * 128; 8 of them stay below 2^15), widened,
// then acc = fma(d_w d_x, sum, acc) and acc = fma(m_w, s_x, acc) — the same operations for every G and C.
template <int G, int C>
struct Q4_1Tile {
    static void run(const TileArgs& a);
};
template <int G, int C>
void Q4_1Tile<G, C>::run(const TileArgs& a) {
    const int64_t nb = a.k / 32;
    const block_q4_1x8* W[G];
    const block_q8_1* X[C];
    rows_at(a.w, a.gb, W);
    rows_at(a.x, a.xs, X);
    const float* S[C];  // d, s per block
    scales_at(X, nb, S);
    __m256 acc[G][C];
    zero(acc);

    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1)  // decode streams the weights from memory once: ask for them ahead of the hardware prefetcher
            for (int g = 0; g < G; ++g) prefetch_block(W[g] + b + kAhead);
        __m256i s16[G][C];
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < C; ++c) s16[g][c] = _mm256_setzero_si256();
        // Chunk j's low nibbles (elements 4j..4j+3 of each row), then its high ones (16+4j..): one half at a time
        // keeps the 2 x 2 pass within the 16 registers.
#pragma GCC unroll 8
        for (int h = 0; h < 8; ++h) {
            const int j = h / 2;
            __m256i q[G];
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g)
                q[g] = nibbles(W[g][b].qs + 32 * j, h % 2);
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
                const __m256i p = bcast4(X[c][b].qs + 16 * (h % 2) + 4 * j);
#pragma GCC unroll 4
                for (int g = 0; g < G; ++g) s16[g][c] = pinned(_mm256_add_epi16(s16[g][c], _mm256_maddubs_epi16(q[g], p)));
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            const __m256 wd = _mm256_cvtph_ps(load128(W[g][b].d)), wm = _mm256_cvtph_ps(load128(W[g][b].m));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
                const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[g][c], _mm256_set1_epi16(1)));
                acc[g][c] = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_broadcast_ss(S[c] + 2 * b)), sum, acc[g][c]);
                acc[g][c] = _mm256_fmadd_ps(wm, _mm256_broadcast_ss(S[c] + 2 * b + 1), acc[g][c]);
            }
        }
    }
    store(a, acc);
}

// Signed quants times Q8_0, 8 rows x 4 elements per call: weights(B, h) for h = 0..7 covers elements
// first(h) + i of each row; kWide: products too large to sum 8 in int16 (Q8_0's |w| <= 127).
// Q4_0 and Q5_0: w = q - 8 or q - 16, their chunks' low nibbles then high ones.
struct Q8_0Packed {
    using P = block_q8_0x8;
    static constexpr bool kWide = true;
    static int first(int h) { return 4 * h; }
    static __m256i weights(const P& B, int h) { return load256(B.qs + 32 * h); }
};
struct Q4_0Packed {
    using P = block_q4_0x8;
    static constexpr bool kWide = false;
    static int first(int h) { return 16 * (h % 2) + 4 * (h / 2); }
    static __m256i weights(const P& B, int h) {
        return _mm256_sub_epi8(nibbles(B.qs + 32 * (h / 2), h % 2), _mm256_set1_epi8(8));
    }
};
struct Q5_0Packed : Q4_0Packed {
    using P = block_q5_0x8;
    static __m256i weights(const P& B, int h) {
        // bit h of each nq byte moved to bit 4 (16-bit shifts: the bits that cross a byte edge are masked off)
        const __m256i nq = load256(B.nq);
        const __m256i t = h <= 4 ? _mm256_slli_epi16(nq, 4 - h) : _mm256_srli_epi16(nq, h - 4);
        return _mm256_sub_epi8(nibbles(B.qs + 32 * (h / 2), h % 2), _mm256_and_si256(t, _mm256_set1_epi8(0x10)));
    }
};

// L's signed quants x Q8_0, G groups of 8 rows x C activation rows: |w| times p with w's sign (vpmaddubsw needs an
// unsigned operand), two products per int16 lane. Q4_0 and Q5_0 (at most 2 * 16 * 128 each) sum a block's 8 exactly
// in int16, then widen; Q8_0 (up to 2 * 127 * 128) widens each at once and sums in int32. Then
// acc = fma(d_w d_x, sum, acc) per block: the same operations for every G and C.
template <typename L, int G, int C>
struct SignedTile {
    static void run(const TileArgs& a);
};
template <typename L, int G, int C>
void SignedTile<L, G, C>::run(const TileArgs& a) {
    using P = typename L::P;
    const int64_t nb = a.k / 32;
    const P* W[G];
    const block_q8_0* X[C];
    rows_at(a.w, a.gb, W);
    rows_at(a.x, a.xs, X);
    const float* S[C];  // d per block
    scales_at(X, nb, S);
    __m256 acc[G][C];
    zero(acc);

    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1)
            for (int g = 0; g < G; ++g) prefetch_block(W[g] + b + kAhead);
        __m256i s[G][C];  // int16 lanes, or int32 where L::kWide
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < C; ++c) s[g][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int h = 0; h < 8; ++h) {
            __m256i q[G], aq[G];
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g) {
                q[g] = L::weights(W[g][b], h);
                aq[g] = _mm256_abs_epi8(q[g]);
            }
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
                const __m256i p = bcast4(X[c][b].qs + L::first(h));
#pragma GCC unroll 4
                for (int g = 0; g < G; ++g) {
                    const __m256i t = _mm256_maddubs_epi16(aq[g], _mm256_sign_epi8(p, q[g]));
                    s[g][c] = pinned(L::kWide ? _mm256_add_epi32(s[g][c], _mm256_madd_epi16(t, _mm256_set1_epi16(1)))
                                              : _mm256_add_epi16(s[g][c], t));
                }
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            const __m256 wd = _mm256_cvtph_ps(load128(W[g][b].d));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
                const __m256 sum = _mm256_cvtepi32_ps(L::kWide ? s[g][c] : _mm256_madd_epi16(s[g][c], _mm256_set1_epi16(1)));
                acc[g][c] = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_broadcast_ss(S[c] + b)), sum, acc[g][c]);
            }
        }
    }
    store(a, acc);
}

// Q4_K x Q8_K, G groups of 8 rows x C activation rows, per super-block of 256 and lane (row): each 32-element
// sub-block's products summed exactly in int16 (8 vpmaddubsw of at most 2 * 15 * 128), times its 6-bit scale into
// int32 (vpmaddwd with the scale in both halves of the lane); the mins' sum m[s] * (x's sum over sub-block s) in
// int32 (vpmaddwd of two sub-blocks' mins with their two sums). Then acc = fma(d_w d_x, isum, acc) and
// acc = fnmadd(dmin_w d_x, msum, acc): the same operations for every G and C.
template <int G, int C>
struct Q4_KTile {
    static void run(const TileArgs& a);
};
template <int G, int C>
void Q4_KTile<G, C>::run(const TileArgs& a) {
    const int64_t nb = a.k / QK_K;
    const block_q4_Kx8* W[G];
    const block_q8_K* X[C];
    rows_at(a.w, a.gb, W);
    rows_at(a.x, a.xs, X);
    __m256 acc[G][C];
    zero(acc);

    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1)
            for (int g = 0; g < G; ++g) prefetch_block(W[g] + b + 1);
        __m256i isum[G][C];
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < C; ++c) isum[g][c] = _mm256_setzero_si256();
        for (int sb = 0; sb < 8; ++sb) {
            __m256i s16[G][C];
            for (int g = 0; g < G; ++g)
                for (int c = 0; c < C; ++c) s16[g][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {
                __m256i q[G];
#pragma GCC unroll 4
                for (int g = 0; g < G; ++g)
                    q[g] = nibbles(W[g][b].qs[sb / 2][j], sb % 2);
#pragma GCC unroll 4
                for (int c = 0; c < C; ++c) {
                    const __m256i p = bcast4(X[c][b].qs + 32 * sb + 4 * j);
#pragma GCC unroll 4
                    for (int g = 0; g < G; ++g)
                        s16[g][c] = pinned(_mm256_add_epi16(s16[g][c], _mm256_maddubs_epi16(q[g], p)));
                }
            }
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g) {
                __m128i sc8;
                std::memcpy(&sc8, W[g][b].sc[sb], 8);  // low 8 bytes used
                const __m256i sc32 = _mm256_cvtepu8_epi32(sc8);
                const __m256i sc = _mm256_or_si256(sc32, _mm256_slli_epi32(sc32, 16));
#pragma GCC unroll 4
                for (int c = 0; c < C; ++c)
                    isum[g][c] = pinned(_mm256_add_epi32(isum[g][c], _mm256_madd_epi16(s16[g][c], sc)));
            }
        }
        // x's sums over sub-block pairs p as int16 pairs [sum(2p), sum(2p + 1)] broadcast to every lane
        __m256i bs[C][4];
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
            const __m256i s32 = _mm256_madd_epi16(load256(X[c][b].bsums), _mm256_set1_epi16(1));  // sums 0..3 | 4..7
            const __m256i s16 = _mm256_packs_epi32(s32, s32);  // [0 1 2 3 0 1 2 3 | 4 5 6 7 4 5 6 7], |sum| <= 4096
            for (int p = 0; p < 4; ++p)
                bs[c][p] = _mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(p < 2 ? p : p + 2));
        }
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            const __m256 wd = _mm256_cvtph_ps(load128(W[g][b].d)), wm = _mm256_cvtph_ps(load128(W[g][b].dmin));
            __m256i m16[4];
            for (int p = 0; p < 4; ++p) m16[p] = _mm256_cvtepu8_epi16(load128(W[g][b].m[p]));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
                __m256i msum = _mm256_madd_epi16(m16[0], bs[c][0]);
                for (int p = 1; p < 4; ++p) msum = _mm256_add_epi32(msum, _mm256_madd_epi16(m16[p], bs[c][p]));
                const __m256 xd = _mm256_set1_ps(X[c][b].d);
                acc[g][c] = _mm256_fmadd_ps(_mm256_mul_ps(wd, xd), _mm256_cvtepi32_ps(isum[g][c]), acc[g][c]);
                acc[g][c] = _mm256_fnmadd_ps(_mm256_mul_ps(wm, xd), _mm256_cvtepi32_ps(msum), acc[g][c]);
            }
        }
    }
    store(a, acc);
}

// A type's tile: T<G, C> for G <= kPassGroups groups and C <= kPassCols activation rows.
template <template <int, int> class T>
void run(int64_t k, const uint8_t* w, size_t gb, const uint8_t* x, size_t xs, float* y, int64_t ldy, int ng, int nc) {
    static_assert(kPassGroups == 2 && kPassCols == 2, "run covers passes of up to 2 x 2");
    const TileArgs a{k, w, gb, x, xs, y, ldy};
    if (ng == 2) return nc == 2 ? T<2, 2>::run(a) : T<2, 1>::run(a);
    return nc == 2 ? T<1, 2>::run(a) : T<1, 1>::run(a);
}
template <int G, int C>
using Q4_0Tile = SignedTile<Q4_0Packed, G, C>;
template <int G, int C>
using Q5_0Tile = SignedTile<Q5_0Packed, G, C>;
template <int G, int C>
using Q8_0Tile = SignedTile<Q8_0Packed, G, C>;

}  // namespace

packed_tile_fn packed_tile_avx2(Type wtype) {
    switch (wtype) {
        case Type::Q4_0: return run<Q4_0Tile>;
        case Type::Q4_1: return run<Q4_1Tile>;
        case Type::Q5_0: return run<Q5_0Tile>;
        case Type::Q8_0: return run<Q8_0Tile>;
        case Type::Q4_K: return run<Q4_KTile>;
        default: return nullptr;
    }
}

}  // namespace rz
