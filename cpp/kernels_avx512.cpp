// AVX-512 (F, BW, VL, DQ, VNNI) kernels. Compiled with their flags; only reached when cpuid says so.
//
// Dot-product tiles, and the Q8_0 / Q8_1 activation quantizers that every matmul's input goes through (the
// other quantizers and the dequantizers of the AVX2 unit are inherited through the table). A 512-bit register holds two 32-element
// blocks or one 64-element chunk of a K-quant super-block; VNNI's vpdpbusd multiplies unsigned weight bytes by
// signed activation bytes straight into int32 (no int16 saturation), vpdpwssd applies int16 sub-block scales.
//
// As in the AVX2 unit: no std:: templates, no external inline functions, everything in an anonymous namespace.
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* placeholders (GCC bug 105593);
// silence it for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstddef>
#include <cstring>

#include "gemm.h"
#include "quants.h"

namespace rz {
namespace {

// ---- helpers ---------------------------------------------------------------------------------------------

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline float h2f(f16_t h) { return _cvtsh_ss(h); }
inline uint32_t load_u32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Two 32-byte groups as one register: a in bytes 0..31, b in 32..63.
inline __m512i join(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }

// int32 lanes of -c * (sum of each group of 4 activation bytes): the correction for unsigned weights stored
// with an offset c (q_stored = q + c).
inline __m512i offset_correction(__m512i p, int c) {
    return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(char(c)), p));
}

struct TileArgs {
    int64_t k;
    const uint8_t* w;
    size_t ws;
    const uint8_t* x;
    size_t xs;
    float* y;
    int64_t ldy;
};

// A tile's preferred passes: kRows weight rows x kCols activation rows, and kDecodeRows weight rows when there is
// a single activation row.
template <int R, int C, int D>
struct Shape {
    static constexpr int kRows = R, kCols = C, kDecodeRows = D;
};

template <int U, int R, int C>
inline void zero(__m512 (&acc)[U][R][C]) {
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[u][r][c] = _mm512_setzero_ps();
}

template <int U, int R, int C>
inline void store_tile(const TileArgs& a, __m512 (&acc)[U][R][C], float extra[R][C] = nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            __m512 v = acc[0][r][c];
            for (int u = 1; u < U; ++u) v = _mm512_add_ps(v, acc[u][r][c]);
            a.y[c * a.ldy + r] = _mm512_reduce_add_ps(v) + (extra ? extra[r][c] : 0.f);
        }
}

// ---- 32-element blocks, four per step -----------------------------------------------------------------------
// A register holds two blocks. For the 4-bit types the 64 bytes are "interleaved" so the nibbles need no
// lane shuffle: [block 0 elements 0..15, block 1 elements 0..15, block 0 16..31, block 1 16..31]; the
// activations are shuffled to match once per activation row, not once per weight row.
// A layout names the weight and activation blocks, forms two blocks' 64 unsigned quant bytes, the offset
// (q_stored - q) corrected through the activations, and whether there is a min (then the activations are
// Q8_1, whose s = d * sum(p) carries the min term).

// [qs0, qs1, qs0 >> 4, qs1 >> 4] & 0x0F: two 16-byte nibble groups in the interleaved order.
inline __m512i nibbles64(const uint8_t* qs0, const uint8_t* qs1) {
    const __m256i t = _mm256_set_m128i(load128(qs1), load128(qs0));
    return _mm512_and_si512(join(t, _mm256_srli_epi16(t, 4)), _mm512_set1_epi8(0x0F));
}

struct Q4_0L {
    using W = block_q4_0;
    using X = block_q8_0;
    static constexpr int kOffset = 8;
    static constexpr bool kMin = false, kInterleaved = true;
    static __m512i quants(const W& b0, const W& b1) { return nibbles64(b0.qs, b1.qs); }
};
struct Q4_1L {
    using W = block_q4_1;
    using X = block_q8_1;
    static constexpr int kOffset = 0;
    static constexpr bool kMin = true, kInterleaved = true;
    static __m512i quants(const W& b0, const W& b1) { return nibbles64(b0.qs, b1.qs); }
};
// Q5: the fifth bits (bit j of qh = element j) as a byte mask in the interleaved order.
inline __m512i q5_64(const uint8_t* qs0, const uint8_t* qh0, const uint8_t* qs1, const uint8_t* qh1) {
    const uint64_t h0 = load_u32(qh0), h1 = load_u32(qh1);
    const __mmask64 high = (h0 & 0xFFFF) | (h1 & 0xFFFF) << 16 | (h0 >> 16) << 32 | (h1 >> 16) << 48;
    const __m512i q = nibbles64(qs0, qs1);
    return _mm512_mask_add_epi8(q, high, q, _mm512_set1_epi8(0x10));
}
struct Q5_0L {
    using W = block_q5_0;
    using X = block_q8_0;
    static constexpr int kOffset = 16;
    static constexpr bool kMin = false, kInterleaved = true;
    static __m512i quants(const W& b0, const W& b1) { return q5_64(b0.qs, b0.qh, b1.qs, b1.qh); }
};
struct Q5_1L {
    using W = block_q5_1;
    using X = block_q8_1;
    static constexpr int kOffset = 0;
    static constexpr bool kMin = true, kInterleaved = true;
    static __m512i quants(const W& b0, const W& b1) { return q5_64(b0.qs, b0.qh, b1.qs, b1.qh); }
};
struct Q8_0L {
    using W = block_q8_0;
    using X = block_q8_0;
    static constexpr int kOffset = 128;  // signed bytes + 128 (a sign-bit flip) are unsigned
    static constexpr bool kMin = false, kInterleaved = false;
    static __m512i quants(const W& b0, const W& b1) {
        return _mm512_xor_si512(join(load256(b0.qs), load256(b1.qs)), _mm512_set1_epi8(char(0x80)));
    }
};

// The first two halves of four blocks (d and m, d and s, or d and two quant bytes) as [a0 b0 a1 b1 a2 b2 a3 b3],
// blocks j >= t (a tail) replaced by block t - 1 and zeroed.
inline __m256 halves4(const uint8_t* p, size_t stride, int t) {
    __m128i v = _mm_cvtsi32_si128(int(load_u32(p)));
    v = _mm_insert_epi32(v, int(load_u32(p + stride * size_t(t > 1 ? 1 : 0))), 1);
    v = _mm_insert_epi32(v, int(load_u32(p + stride * size_t(t > 2 ? 2 : t - 1))), 2);
    v = _mm_insert_epi32(v, int(load_u32(p + stride * size_t(t > 3 ? 3 : t - 1))), 3);
    return _mm256_maskz_mov_ps(__mmask8((1u << (2 * t)) - 1), _mm256_cvtph_ps(v));
}

// sum over blocks of d_w d_x sum(q p) (+ m_w s_x). Per step of four blocks and pair of (weight, activation)
// rows: one multiply of the scale vectors ([dd0 ms0 dd1 ms1 ...]), a masked add of its min products (odd
// lanes) into the accumulator, whose lanes are summed at the end, and per two blocks a permute of the dd's,
// one vpdpbusd into the offset correction, a conversion and an FMA.
template <typename L, typename S>
struct Tile32 : S {
    // Scale lanes for blocks 2i, 2i+1 from [dd0 ms0 dd1 ms1 dd2 ms2 dd3 ms3], in the quants' byte order.
    static __m512i scale_idx(int i) {
        alignas(64) int32_t v[16];
        for (int e = 0; e < 16; ++e) v[e] = 2 * (2 * i + (L::kInterleaved ? (e / 4) & 1 : e / 8));
        return _mm512_load_si512(v);
    }

    template <int R, int C>
    static void run(const TileArgs& a) {
        using W = typename L::W;
        using X = typename L::X;
        __m512 acc[1][R][C];
        zero(acc);
        const __m512i idx[2] = {scale_idx(0), scale_idx(1)};
        // t blocks from b (t = 4, or 1..3 for the tail, whose missing blocks repeat the last with zero scales)
        auto step = [&](int64_t b, int t) {
            __m256 ws[R];
            __m512 prod[R][C];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) ws[r] = halves4(a.w + size_t(r) * a.ws + size_t(b) * sizeof(W), sizeof(W), t);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const __m256 xs = halves4(a.x + size_t(c) * a.xs + size_t(b) * sizeof(X), sizeof(X), t);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    prod[r][c] = _mm512_zextps256_ps512(_mm256_mul_ps(ws[r], xs));
                    if (L::kMin) acc[0][r][c] = _mm512_mask_add_ps(acc[0][r][c], 0xAA, acc[0][r][c], prod[r][c]);
                }
            }
#pragma GCC unroll 2
            for (int i = 0; i < 2; ++i) {
                const int64_t b0 = b + (2 * i < t ? 2 * i : t - 1), b1 = b + (2 * i + 1 < t ? 2 * i + 1 : t - 1);
                __m512i q[R];
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    const W* B = reinterpret_cast<const W*>(a.w + size_t(r) * a.ws);
                    q[r] = L::quants(B[b0], B[b1]);
                }
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const X* Y = reinterpret_cast<const X*>(a.x + size_t(c) * a.xs);
                    __m512i p = join(load256(Y[b0].qs), load256(Y[b1].qs));
                    if (L::kInterleaved) p = _mm512_shuffle_i64x2(p, p, _MM_SHUFFLE(3, 1, 2, 0));
                    const __m512i init = L::kOffset ? offset_correction(p, L::kOffset) : _mm512_setzero_si512();
#pragma GCC unroll 8
                    for (int r = 0; r < R; ++r) {
                        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, q[r], p));
                        acc[0][r][c] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[i], prod[r][c]), dot, acc[0][r][c]);
                    }
                }
            }
        };
        const int64_t nb = a.k / 32;
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) step(b, 4);
        if (b < nb) step(b, int(nb - b));
        store_tile(a, acc);
    }
};

// ---- K-quants ------------------------------------------------------------------------------------------------

// Q4_K / Q5_K's 12 packed bytes -> 8 six-bit scales (bytes 0..7) and 8 mins (bytes 8..15).
inline void unpack_scale_min_k4(const uint8_t* packed, uint8_t out[16]) {
    uint32_t u[4];
    std::memcpy(u, packed, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
    const uint32_t mins03 = u[1] & low6;
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
    u[2] = mins03;
    u[0] &= low6;
    std::memcpy(out, u, 16);
}

// int16 index vector: element e takes index base + e / group.
inline __m512i spread_idx(int base, int group) {
    alignas(64) int16_t idx[32];
    for (int e = 0; e < 32; ++e) idx[e] = int16_t(base + e / group);
    return _mm512_load_si512(idx);
}

template <bool kFive> struct Q45Block { using type = block_q4_K; };
template <> struct Q45Block<true> { using type = block_q5_K; };

// Q4_K / Q5_K x Q8_K: a 64-element chunk per register (the low nibbles are sub-block 2j, the high ones 2j+1);
// maddubs pairs, vpdpwssd applies the two sub-block scales; mins through the activation's bsums.
template <bool kFive>
struct TileQ45_K : Shape<2, 8, 2> {
    template <int R, int C>
    static void run(const TileArgs& a) {
        using BW = typename Q45Block<kFive>::type;
        __m512 acc[1][R][C];
        zero(acc);
        const __m512i idx[4] = {spread_idx(0, 16), spread_idx(2, 16), spread_idx(4, 16), spread_idx(6, 16)};
        const int64_t nb = a.k / QK_K;
        for (int64_t b = 0; b < nb; ++b) {
            __m512i sc[R], isum[R][C];
            __m128i mins[R];
            __m512i qh[R];
            float dw[R], mw[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const BW& B = reinterpret_cast<const BW*>(a.w + size_t(r) * a.ws)[b];
                uint8_t sm[16];
                unpack_scale_min_k4(B.scales, sm);
                const __m128i v = load128(sm);
                sc[r] = _mm512_castsi128_si512(_mm_cvtepu8_epi16(v));
                mins[r] = _mm_cvtepu8_epi16(_mm_srli_si128(v, 8));
                dw[r] = h2f(B.d);
                mw[r] = h2f(B.dmin);
                if constexpr (kFive) qh[r] = _mm512_broadcast_i64x4(load256(B.qh));
            }
            float dx[C];
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const block_q8_K& Y = reinterpret_cast<const block_q8_K*>(a.x + size_t(c) * a.xs)[b];
                dx[c] = Y.d;
                const __m256i bs = load256(Y.bsums);
                const __m128i bs2 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    // the min term, - dmin d_x sum_j m_j bsum_j, straight into the accumulator's low lanes
                    const __m128 m = _mm_cvtepi32_ps(_mm_madd_epi16(mins[r], bs2));
                    acc[0][r][c] = _mm512_fnmadd_ps(_mm512_zextps128_ps512(m), _mm512_set1_ps(mw[r] * dx[c]), acc[0][r][c]);
                    isum[r][c] = _mm512_setzero_si512();
                }
            }
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m512i q[R], s[R];
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    const BW& B = reinterpret_cast<const BW*>(a.w + size_t(r) * a.ws)[b];
                    const __m256i t = load256(B.qs + 32 * j);
                    q[r] = _mm512_and_si512(join(t, _mm256_srli_epi16(t, 4)), _mm512_set1_epi8(0x0F));
                    if constexpr (kFive) {
                        const __m512i bit = join(_mm256_set1_epi8(char(1 << (2 * j))), _mm256_set1_epi8(char(2 << (2 * j))));
                        q[r] = _mm512_mask_add_epi8(q[r], _mm512_test_epi8_mask(qh[r], bit), q[r], _mm512_set1_epi8(0x10));
                    }
                    s[r] = _mm512_permutexvar_epi16(idx[j], sc[r]);
                }
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const block_q8_K& Y = reinterpret_cast<const block_q8_K*>(a.x + size_t(c) * a.xs)[b];
                    const __m512i p = load512(Y.qs + 64 * j);
#pragma GCC unroll 8
                    for (int r = 0; r < R; ++r)
                        isum[r][c] = _mm512_dpwssd_epi32(isum[r][c], _mm512_maddubs_epi16(q[r], p), s[r]);
                }
            }
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
                    acc[0][r][c] = _mm512_fmadd_ps(_mm512_set1_ps(dw[r] * dx[c]), _mm512_cvtepi32_ps(isum[r][c]), acc[0][r][c]);
        }
        store_tile(a, acc);
    }
};

// Q6_K x Q8_K: per 128-element half, two registers of 6-bit quants (elements 0..63 and 64..127), each 16
// elements (a 128-bit lane of maddubs' output) under its own int8 scale; the -32 offset through bsums.
struct TileQ6_K : Shape<2, 8, 2> {
    template <int R, int C>
    static void run(const TileArgs& a) {
        __m512 acc[1][R][C];
        zero(acc);
        const __m512i idx[4] = {spread_idx(0, 8), spread_idx(4, 8), spread_idx(8, 8), spread_idx(12, 8)};
        const __m512i low4 = _mm512_set1_epi8(0x0F), bits = _mm512_set1_epi8(0x33);
        const int64_t nb = a.k / QK_K;
        for (int64_t b = 0; b < nb; ++b) {
            __m512i sc[R], isum[R][C];
            __m256i sc32[R];
            float dw[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const block_q6_K& B = reinterpret_cast<const block_q6_K*>(a.w + size_t(r) * a.ws)[b];
                const __m256i s16 = _mm256_cvtepi8_epi16(load128(B.scales));
                sc[r] = _mm512_castsi256_si512(s16);
                sc32[r] = _mm256_slli_epi16(s16, 5);
                dw[r] = h2f(B.d);
            }
            float dx[C];
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const block_q8_K& Y = reinterpret_cast<const block_q8_K*>(a.x + size_t(c) * a.xs)[b];
                dx[c] = Y.d;
                const __m256i nbs = _mm256_sub_epi16(_mm256_setzero_si256(), load256(Y.bsums));
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) isum[r][c] = _mm512_zextsi256_si512(_mm256_madd_epi16(sc32[r], nbs));
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                __m512i qa[R], qb[R], sa[R], sb[R];
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    const block_q6_K& B = reinterpret_cast<const block_q6_K*>(a.w + size_t(r) * a.ws)[b];
                    const __m512i l = load512(B.ql + 64 * h);
                    const __m256i hv = load256(B.qh + 32 * h);
                    // bits 0-1 of hh feed elements 0..63, bits 4-5 elements 64..127 (qh >> 2 for the upper 32s)
                    const __m512i hh = _mm512_and_si512(join(hv, _mm256_srli_epi16(hv, 2)), bits);
                    qa[r] = _mm512_ternarylogic_epi32(l, _mm512_slli_epi16(hh, 4), low4, 0xE4);  // low4 ? l : hh<<4
                    qb[r] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), hh, low4, 0xE4);
                    sa[r] = _mm512_permutexvar_epi16(idx[2 * h], sc[r]);
                    sb[r] = _mm512_permutexvar_epi16(idx[2 * h + 1], sc[r]);
                }
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const block_q8_K& Y = reinterpret_cast<const block_q8_K*>(a.x + size_t(c) * a.xs)[b];
                    const __m512i pa = load512(Y.qs + 128 * h), pb = load512(Y.qs + 128 * h + 64);
#pragma GCC unroll 8
                    for (int r = 0; r < R; ++r) {
                        isum[r][c] = _mm512_dpwssd_epi32(isum[r][c], _mm512_maddubs_epi16(qa[r], pa), sa[r]);
                        isum[r][c] = _mm512_dpwssd_epi32(isum[r][c], _mm512_maddubs_epi16(qb[r], pb), sb[r]);
                    }
                }
            }
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
                    acc[0][r][c] = _mm512_fmadd_ps(_mm512_set1_ps(dw[r] * dx[c]), _mm512_cvtepi32_ps(isum[r][c]), acc[0][r][c]);
        }
        store_tile(a, acc);
    }
};

// ---- float weights x F32 activations ---------------------------------------------------------------------

enum FloatFmt { kF32, kF16, kBF16 };

template <int F>
inline __m512 load16(const uint8_t* p, int64_t i) {
    if (F == kF32) return _mm512_loadu_ps(reinterpret_cast<const float*>(p) + i);
    const __m256i h = load256(reinterpret_cast<const uint16_t*>(p) + i);
    if (F == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <int F>
inline float load1(const uint8_t* p, int64_t i) {
    if (F == kF32) return reinterpret_cast<const float*>(p)[i];
    if (F == kF16) return f16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
    return bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
}

template <int F>
struct TileFloat : Shape<4, 4, 4> {
    template <int R, int C>
    static void run(const TileArgs& a) {
        // One accumulator per (row, column) pair whatever the tile shape, so a product does not depend on
        // the batch it was computed in.
        __m512 acc[1][R][C];
        zero(acc);
        const int64_t steps = a.k / 16;
        for (int64_t b = 0; b < steps; ++b) {
            __m512 wv[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) wv[r] = load16<F>(a.w + size_t(r) * a.ws, 16 * b);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const __m512 xv = _mm512_loadu_ps(reinterpret_cast<const float*>(a.x + size_t(c) * a.xs) + 16 * b);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) acc[0][r][c] = _mm512_fmadd_ps(wv[r], xv, acc[0][r][c]);
            }
        }
        float extra[R][C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) {
                float t = 0.f;
                for (int64_t i = 16 * steps; i < a.k; ++i)
                    t += load1<F>(a.w + size_t(r) * a.ws, i) * reinterpret_cast<const float*>(a.x + size_t(c) * a.xs)[i];
                extra[r][c] = t;
            }
        store_tile(a, acc, extra);
    }
};

// ---- dispatch of tile shapes -----------------------------------------------------------------------------

template <typename K, int R, int C>
inline void run_cols(const TileArgs& a, int nc) {
    if constexpr (C > 0) {
        if (nc == C) K::template run<R, C>(a);
        else run_cols<K, R, C - 1>(a, nc);
    }
}

// nr rows in passes of R (then single rows), each pass over all nc columns.
template <typename K, int R>
inline void run_rows(TileArgs a, int nr, int nc) {
    for (; nr >= R; nr -= R, a.w += R * a.ws, a.y += R) run_cols<K, R, K::kCols>(a, nc);
    for (; nr > 0; --nr, a.w += a.ws, a.y += 1) run_cols<K, 1, K::kCols>(a, nc);
}

// One activation row (decode) has nothing to share across columns: its own row count, kDecodeRows.
template <typename K>
void gemm_tile(int64_t k, const void* w, size_t ws, const void* x, size_t xs, float* y, int64_t ldy, int nr, int nc) {
    const TileArgs a{k, static_cast<const uint8_t*>(w), ws, static_cast<const uint8_t*>(x), xs, y, ldy};
    if (nc == 1) run_rows<K, K::kDecodeRows>(a, nr, 1);
    else run_rows<K, K::kRows>(a, nr, nc);
}

template <typename K>
void vec_dot(int64_t n, float* s, const void* x, const void* y) {
    K::template run<1, 1>(TileArgs{n, static_cast<const uint8_t*>(x), 0, static_cast<const uint8_t*>(y), 0, s, 0});
}

// ---- activation quantizers ---------------------------------------------------------------------------------
//
// Q8_0 and Q8_1 rows, 16 blocks at a time. A block's max |x| and quant sum are horizontal reductions: one block
// at a time (the AVX2 quantizers) each is a chain of dependent shuffles, divisions and conversions that leaves
// the core waiting, ~60 cycles a block. Here the 16 blocks' reductions share one transposing tree and their scales
// are computed in one register. Each value goes through the AVX2 quantizers' operations, so the bytes are theirs.

inline __m512 opaque(__m512 v) {  // a rounded product GCC may not fuse into the subtraction that follows
    __asm__("" : "+v"(v));
    return v;
}

struct MaxOp {
    __m512i operator()(__m512i a, __m512i b) const {
        return _mm512_castps_si512(_mm512_max_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)));
    }
};
struct AddOp {
    __m512i operator()(__m512i a, __m512i b) const { return _mm512_add_epi32(a, b); }
};

// Lane b: op over the 16 lanes of v[b] (op associative and commutative on the values at hand).
template <typename Op>
inline __m512i reduce16(const __m512i (&v)[16], Op op) {
    __m512i w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i)  // blocks 2i, 2i + 1: 8 lanes each
        w[i] = op(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                  _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; ++i)  // blocks 4i .. 4i + 3: a 128-bit lane each
        x[i] = op(_mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)  // 128-bit lane j: blocks 8i + j and 8i + j + 4, 2 lanes each
        y[i] = op(_mm512_unpacklo_epi64(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_epi64(x[2 * i], x[2 * i + 1]));
    const __m512 a = _mm512_castsi512_ps(y[0]), b = _mm512_castsi512_ps(y[1]);
    const __m512i z = op(_mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                         _mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
    // lane 4j + i of z holds block j + 4i
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// roundf (halves away from zero) on 16 floats, as the AVX2 unit's round_away; v must be opaque.
inline __m512 round_away(__m512 v) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_andnot_ps(sign, _mm512_sub_ps(v, t));  // exact
    const __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.f), _mm512_and_ps(v, sign));
    return _mm512_mask_add_ps(t, up, t, one);
}

// Blocks [0, n) (n <= 16) of a Q8_0 (kSum false) or Q8_1 row: d = max|x| / 127, q = roundf(x / d) through
// id = 1 / d (0 where d is 0 or 1 / d is not finite), and for Q8_1 s = d * sum(q), d and s rounded to half.
template <bool kSum>
inline void quantize_q8_blocks(const float* x, int n, uint8_t* y) {
    constexpr size_t stride = kSum ? sizeof(block_q8_1) : sizeof(block_q8_0);
    constexpr size_t qs = kSum ? offsetof(block_q8_1, qs) : offsetof(block_q8_0, qs);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512i v[16];
    for (int b = 0; b < 16; ++b)
        v[b] = b < n ? _mm512_castps_si512(_mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + 32 * b)),
                                                         _mm512_andnot_ps(sign, _mm512_loadu_ps(x + 32 * b + 16))))
                     : _mm512_setzero_si512();
    const __m512 d = _mm512_div_ps(_mm512_castsi512_ps(reduce16(v, MaxOp{})), _mm512_set1_ps(127.f));
    __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ), _mm512_set1_ps(1.f), d);
    id = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_andnot_ps(sign, id), _mm512_set1_ps(__builtin_inff()), _CMP_LT_OQ), id);
    alignas(64) float ids[16];
    _mm512_store_ps(ids, id);
    for (int b = 0; b < 16; ++b) {
        if (b >= n) {
            v[b] = _mm512_setzero_si512();
            continue;
        }
        const __m512 s = _mm512_set1_ps(ids[b]);
        const __m512i q0 = _mm512_cvttps_epi32(round_away(opaque(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * b), s))));
        const __m512i q1 = _mm512_cvttps_epi32(round_away(opaque(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * b + 16), s))));
        uint8_t* out = y + size_t(b) * stride + qs;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(q1));
        v[b] = _mm512_add_epi32(q0, q1);
    }
    alignas(32) f16_t dh[16], sh[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(dh), _mm512_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT));
    if (kSum) {
        const __m512 sum = _mm512_cvtepi32_ps(reduce16(v, AddOp{}));
        _mm256_store_si256(reinterpret_cast<__m256i*>(sh), _mm512_cvtps_ph(_mm512_mul_ps(sum, d), _MM_FROUND_TO_NEAREST_INT));
    }
    for (int b = 0; b < n; ++b) {
        std::memcpy(y + size_t(b) * stride, &dh[b], sizeof(f16_t));
        if (kSum) std::memcpy(y + size_t(b) * stride + offsetof(block_q8_1, s), &sh[b], sizeof(f16_t));
    }
}

template <bool kSum>
void quantize_row_q8(const float* x, void* dst, int64_t k) {
    constexpr size_t stride = kSum ? sizeof(block_q8_1) : sizeof(block_q8_0);
    uint8_t* y = static_cast<uint8_t*>(dst);
    const int64_t nb = k / 32;
    for (int64_t i = 0; i < nb; i += 16)
        quantize_q8_blocks<kSum>(x + 32 * i, nb - i < 16 ? int(nb - i) : 16, y + size_t(i) * stride);
}

using TileQ4_0 = Tile32<Q4_0L, Shape<4, 4, 4>>;
using TileQ4_1 = Tile32<Q4_1L, Shape<4, 4, 4>>;
using TileQ5_0 = Tile32<Q5_0L, Shape<4, 4, 4>>;
using TileQ5_1 = Tile32<Q5_1L, Shape<4, 4, 4>>;
using TileQ8_0 = Tile32<Q8_0L, Shape<4, 4, 4>>;

}  // namespace

#define RZ_BASELINE __attribute__((target("no-avx,no-avx2,no-fma,no-f16c")))

RZ_BASELINE void fill_kernels_avx512(KernelTable& t) {
    t[int(Type::Q8_0)].quantize = quantize_row_q8<false>;
    t[int(Type::Q8_1)].quantize = quantize_row_q8<true>;
    t[int(Type::F32)].vec_dot = vec_dot<TileFloat<kF32>>;
    t[int(Type::F16)].vec_dot = vec_dot<TileFloat<kF16>>;
    t[int(Type::BF16)].vec_dot = vec_dot<TileFloat<kBF16>>;
    t[int(Type::Q4_0)].vec_dot = vec_dot<TileQ4_0>;
    t[int(Type::Q4_1)].vec_dot = vec_dot<TileQ4_1>;
    t[int(Type::Q5_0)].vec_dot = vec_dot<TileQ5_0>;
    t[int(Type::Q5_1)].vec_dot = vec_dot<TileQ5_1>;
    t[int(Type::Q8_0)].vec_dot = vec_dot<TileQ8_0>;
    t[int(Type::Q4_K)].vec_dot = vec_dot<TileQ45_K<false>>;
    t[int(Type::Q5_K)].vec_dot = vec_dot<TileQ45_K<true>>;
    t[int(Type::Q6_K)].vec_dot = vec_dot<TileQ6_K>;
}

namespace {
template <typename K>
RZ_BASELINE void set_tile(GemmTable& t, Type type) {
    t[int(type)] = GemmKernel{gemm_tile<K>, K::kRows > K::kDecodeRows ? K::kRows : K::kDecodeRows, K::kCols};
}
}  // namespace

RZ_BASELINE void fill_gemm_avx512(GemmTable& t) {
    set_tile<TileFloat<kF32>>(t, Type::F32);
    set_tile<TileFloat<kF16>>(t, Type::F16);
    set_tile<TileFloat<kBF16>>(t, Type::BF16);
    set_tile<TileQ4_0>(t, Type::Q4_0);
    set_tile<TileQ4_1>(t, Type::Q4_1);
    set_tile<TileQ5_0>(t, Type::Q5_0);
    set_tile<TileQ5_1>(t, Type::Q5_1);
    set_tile<TileQ8_0>(t, Type::Q8_0);
    set_tile<TileQ45_K<false>>(t, Type::Q4_K);
    set_tile<TileQ45_K<true>>(t, Type::Q5_K);
    set_tile<TileQ6_K>(t, Type::Q6_K);
}

}  // namespace rz
