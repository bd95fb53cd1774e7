// AVX-512 VNNI kernels for packed weights (packed.h). Compiled with the AVX-512 flags; only reached when cpuid
// says so. As in kernels_avx2.cpp, nothing here may instantiate a std:: template or define an external inline
// function.
//
// The same products as kernels_packed_avx2.cpp, bit for bit: each block's integer sum per row and activation row
// is the same integer (vpdpbusd adds four byte products into an int32 lane exactly), and the float operations
// that follow are the AVX2 tiles' ones, lane for lane. What changes is the cost: one vpdpbusd does 64 byte
// products into int32 where AVX2 needs vpmaddubsw, an int16 add and, every block, a widening vpmaddwd for 32.
//
// A zmm holds 16 rows: the same 32-byte chunk of two consecutive groups (group 2z in lanes 0-7, 2z + 1 in 8-15),
// so its 16 float results are 16 consecutive outputs. A pass that ends on an odd group reads that group in both
// halves and stores the low one only.
//
// vpdpbusd multiplies unsigned bytes by signed ones. Q4_1's and Q4_K's nibbles are unsigned already. The signed
// types (Q8_0, Q4_0, Q5_0) multiply w + o (o = 128, 8, 16: unsigned) and start each block's sum at -o * sum(x),
// the activation block's quant sum that quantize_packed_row stores after the scales.
#include <immintrin.h>

#include <cstring>

#include "packed.h"

namespace rz {
namespace {

constexpr int kMaxZ = kPassGroupsAvx512 / 2;  // zmm row blocks per pass
constexpr int kAhead = 4;                     // blocks ahead a decode prefetches (as the AVX2 tiles)

inline __m256i load2x128(const void* lo, const void* hi) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(lo))),
                                   _mm_loadu_si128(static_cast<const __m128i*>(hi)), 1);
}
inline __m512i load2x256(const void* lo, const void* hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(lo))),
                              _mm256_loadu_si256(static_cast<const __m256i*>(hi)), 1);
}
// 8 + 8 f16 values -> 16 floats
inline __m512 load2xf16(const f16_t* lo, const f16_t* hi) { return _mm512_cvtph_ps(load2x128(lo, hi)); }
inline __m512i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
inline __m512i nibbles(__m512i v, int high) {
    return _mm512_and_si512(high ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0F));
}
template <typename P>
inline void prefetch_block(const P* p) {
    const char* c = reinterpret_cast<const char*>(p);
    for (size_t i = 0; i < sizeof(P); i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

struct TileArgs {
    int64_t k;
    const uint8_t* w;
    size_t gb;  // bytes between groups
    const uint8_t* x;
    size_t xs;  // bytes between activation rows
    float* y;
    int64_t ldy;
    int ng;  // groups in this pass
};

// Row block z's two groups (the second is the first again past the pass's last group) and the C activation rows,
// addressed from the pass's bases (separate pointers per row would take more registers than x86 has).
template <typename P, typename B, int Z, int C>
struct Operands {
    const uint8_t* w;
    size_t gb;
    int ng;
    const uint8_t* x;
    size_t xs;
    size_t tail_offset;  // of an activation row's floats (packed.h), after its quants
    Operands(const TileArgs& a, int64_t nb)
        : w(a.w), gb(a.gb), ng(a.ng), x(a.x), xs(a.xs), tail_offset(packed_scales_offset(size_t(nb) * sizeof(B))) {}
    const P& lo(int z, int64_t b) const { return reinterpret_cast<const P*>(w + size_t(2 * z) * gb)[b]; }
    const P& hi(int z, int64_t b) const {
        return reinterpret_cast<const P*>(w + size_t(2 * z + 1 < ng ? 2 * z + 1 : 2 * z) * gb)[b];
    }
    const B& xb(int c, int64_t b) const { return reinterpret_cast<const B*>(x + size_t(c) * xs)[b]; }
    const float* tail(int c) const { return reinterpret_cast<const float*>(x + size_t(c) * xs + tail_offset); }
    // decode streams the weights from memory once: ask for block b + ahead ahead of the hardware prefetcher
    void prefetch(int64_t b, int64_t ahead = kAhead) const {
        for (int z = 0; z < Z; ++z) {
            prefetch_block(&lo(z, b + ahead));
            prefetch_block(&hi(z, b + ahead));
        }
    }
};

// Float accumulators or integer sums, all zero.
template <typename V, int Z, int C>
inline void zero(V (&acc)[Z][C]) {
    for (int z = 0; z < Z; ++z)
        for (int c = 0; c < C; ++c) acc[z][c] = V{};
}
template <int Z, int C>
inline void store(const TileArgs& a, const __m512 (&acc)[Z][C]) {
    for (int z = 0; z < Z; ++z)
        for (int c = 0; c < C; ++c) {
            float* out = a.y + c * a.ldy + z * 2 * kPackRows;
            if (2 * z + 1 < a.ng)
                _mm512_storeu_ps(out, acc[z][c]);
            else
                _mm512_mask_storeu_ps(out, 0x00FF, acc[z][c]);
        }
}

// Q4_1 x Q8_1: per block and lane the 32 products q x in int32, then acc = fma(d_w d_x, sum, acc) and
// acc = fma(m_w, s_x, acc), as the AVX2 tile.
template <int Z, int C>
void q4_1_tile(const TileArgs& a) {
    const int64_t nb = a.k / 32;
    const Operands<block_q4_1x8, block_q8_1, Z, C> o(a, nb);  // tails: d, s per block
    __m512 acc[Z][C];
    zero(acc);
    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1) o.prefetch(b);
        __m512i s[Z][C];
        zero(s);
#pragma GCC unroll 16
        for (int j = 0; j < 4; ++j) {
            __m512i v[Z];
            for (int z = 0; z < Z; ++z) v[z] = load2x256(o.lo(z, b).qs + 32 * j, o.hi(z, b).qs + 32 * j);
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                __m512i q[Z];
                for (int z = 0; z < Z; ++z) q[z] = nibbles(v[z], h);
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) {
                    const __m512i p = bcast4(o.xb(c, b).qs + 16 * h + 4 * j);
                    for (int z = 0; z < Z; ++z) s[z][c] = _mm512_dpbusd_epi32(s[z][c], q[z], p);
                }
            }
        }
        for (int z = 0; z < Z; ++z) {
            const __m512 wd = load2xf16(o.lo(z, b).d, o.hi(z, b).d), wm = load2xf16(o.lo(z, b).m, o.hi(z, b).m);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) {
                const __m512 sum = _mm512_cvtepi32_ps(s[z][c]);
                acc[z][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, _mm512_set1_ps(o.tail(c)[2 * b])), sum, acc[z][c]);
                acc[z][c] = _mm512_fmadd_ps(wm, _mm512_set1_ps(o.tail(c)[2 * b + 1]), acc[z][c]);
            }
        }
    }
    store(a, acc);
}

// The signed types' unsigned weights w + L::kOffset for elements first(h) + i, h = 0..7.
struct Q8_0Unsigned {
    using P = block_q8_0x8;
    static constexpr int kOffset = 128;
    static int first(int h) { return 4 * h; }
    static __m512i weights(const P& lo, const P& hi, int h) {
        return _mm512_xor_si512(load2x256(lo.qs + 32 * h, hi.qs + 32 * h), _mm512_set1_epi8(char(0x80)));
    }
};
struct Q4_0Unsigned {  // q = w + 8: the nibbles as stored
    using P = block_q4_0x8;
    static constexpr int kOffset = 8;
    static int first(int h) { return 16 * (h % 2) + 4 * (h / 2); }
    static __m512i weights(const P& lo, const P& hi, int h) {
        return nibbles(load2x256(lo.qs + 32 * (h / 2), hi.qs + 32 * (h / 2)), h % 2);
    }
};
struct Q5_0Unsigned : Q4_0Unsigned {  // w + 16: the nibble, plus 16 where bit h of nq is clear (packed.h)
    using P = block_q5_0x8;
    static constexpr int kOffset = 16;
    static __m512i weights(const P& lo, const P& hi, int h) {
        const __m512i nq = load2x256(lo.nq, hi.nq);
        const __m512i t = h <= 4 ? _mm512_slli_epi16(nq, 4 - h) : _mm512_srli_epi16(nq, h - 4);
        const __m512i q = nibbles(load2x256(lo.qs + 32 * (h / 2), hi.qs + 32 * (h / 2)), h % 2);
        return _mm512_or_si512(q, _mm512_andnot_si512(t, _mm512_set1_epi8(0x10)));
    }
};

// L's weights x Q8_0: per block and lane sum((w + o) x) - o sum(x) = sum(w x) in int32, then
// acc = fma(d_w d_x, sum, acc), as the AVX2 tile.
template <typename L, int Z, int C>
void signed_tile(const TileArgs& a) {
    using P = typename L::P;
    const int64_t nb = a.k / 32;
    const Operands<P, block_q8_0, Z, C> o(a, nb);  // tails: d per block, then the quant sums as int32
    __m512 acc[Z][C];
    zero(acc);
    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1) o.prefetch(b);
        __m512i s[Z][C];
        for (int c = 0; c < C; ++c) {
            const __m512i start = _mm512_set1_epi32(-L::kOffset * reinterpret_cast<const int32_t*>(o.tail(c) + nb)[b]);
            for (int z = 0; z < Z; ++z) s[z][c] = start;
        }
#pragma GCC unroll 8
        for (int h = 0; h < 8; ++h) {
            __m512i q[Z];
            for (int z = 0; z < Z; ++z) q[z] = L::weights(o.lo(z, b), o.hi(z, b), h);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) {
                const __m512i p = bcast4(o.xb(c, b).qs + L::first(h));
                for (int z = 0; z < Z; ++z) s[z][c] = _mm512_dpbusd_epi32(s[z][c], q[z], p);
            }
        }
        for (int z = 0; z < Z; ++z) {
            const __m512 wd = load2xf16(o.lo(z, b).d, o.hi(z, b).d);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c)
                acc[z][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, _mm512_set1_ps(o.tail(c)[b])), _mm512_cvtepi32_ps(s[z][c]),
                                            acc[z][c]);
        }
    }
    store(a, acc);
}

// Q4_K x Q8_K, per super-block and lane: each sub-block's products in int32, times its 6-bit scale, summed (isum);
// the mins' sum over sub-blocks of m[s] times x's sum over s (msum, vpmaddwd as the AVX2 tile). Then
// acc = fma(d_w d_x, isum, acc) and acc = fnmadd(dmin_w d_x, msum, acc).
template <int Z, int C>
void q4_K_tile(const TileArgs& a) {
    const int64_t nb = a.k / QK_K;
    const Operands<block_q4_Kx8, block_q8_K, Z, C> o(a, nb);
    __m512 acc[Z][C];
    zero(acc);
    for (int64_t b = 0; b < nb; ++b) {
        if (C == 1) o.prefetch(b, 1);  // (super-blocks of 1,184 bytes: one ahead, as the AVX2 tile)
        __m512i isum[Z][C];
        zero(isum);
        for (int sb = 0; sb < 8; ++sb) {
            __m512i s[Z][C];
            zero(s);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {
                __m512i q[Z];
                for (int z = 0; z < Z; ++z)
                    q[z] = nibbles(load2x256(o.lo(z, b).qs[sb / 2][j], o.hi(z, b).qs[sb / 2][j]), sb % 2);
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) {
                    const __m512i p = bcast4(o.xb(c, b).qs + 32 * sb + 4 * j);
                    for (int z = 0; z < Z; ++z) s[z][c] = _mm512_dpbusd_epi32(s[z][c], q[z], p);
                }
            }
            for (int z = 0; z < Z; ++z) {
                const __m128i sc8 = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(o.lo(z, b).sc[sb])),
                                                       _mm_loadl_epi64(reinterpret_cast<const __m128i*>(o.hi(z, b).sc[sb])));
                const __m512i sc = _mm512_cvtepu8_epi32(sc8);
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) isum[z][c] = _mm512_add_epi32(isum[z][c], _mm512_mullo_epi32(s[z][c], sc));
            }
        }
        // x's sums over sub-block pairs p as int16 pairs [sum(2p), sum(2p + 1)] in every lane
        __m512i bs[C][4];
        for (int c = 0; c < C; ++c) {
            const int16_t* q = o.xb(c, b).bsums;
            for (int p = 0; p < 4; ++p) {
                const int lo = q[4 * p] + q[4 * p + 1], hi = q[4 * p + 2] + q[4 * p + 3];
                bs[c][p] = _mm512_set1_epi32(int32_t(uint32_t(uint16_t(lo)) | (uint32_t(uint16_t(hi)) << 16)));
            }
        }
        for (int z = 0; z < Z; ++z) {
            const __m512 wd = load2xf16(o.lo(z, b).d, o.hi(z, b).d), wm = load2xf16(o.lo(z, b).dmin, o.hi(z, b).dmin);
            __m512i m16[4];
            for (int p = 0; p < 4; ++p) m16[p] = _mm512_cvtepu8_epi16(load2x128(o.lo(z, b).m[p], o.hi(z, b).m[p]));
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) {
                __m512i msum = _mm512_madd_epi16(m16[0], bs[c][0]);
                for (int p = 1; p < 4; ++p) msum = _mm512_add_epi32(msum, _mm512_madd_epi16(m16[p], bs[c][p]));
                const __m512 xd = _mm512_set1_ps(o.xb(c, b).d);
                acc[z][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, xd), _mm512_cvtepi32_ps(isum[z][c]), acc[z][c]);
                acc[z][c] = _mm512_fnmadd_ps(_mm512_mul_ps(wm, xd), _mm512_cvtepi32_ps(msum), acc[z][c]);
            }
        }
    }
    store(a, acc);
}

// A type's tile T<Z, C> for ng <= kPassGroupsAvx512 groups (Z = ng / 2 rounded up) and nc <= kPassColsAvx512
// activation rows.
template <template <int, int> class T, int Z, int C>
void run_cols(const TileArgs& a, int nc) {
    if constexpr (C == 1) {
        T<Z, 1>::run(a);
    } else {
        if (nc == C) return T<Z, C>::run(a);
        run_cols<T, Z, C - 1>(a, nc);
    }
}
template <template <int, int> class T, int Z>
void run_rows(const TileArgs& a, int nc) {
    if constexpr (Z == 1) {
        run_cols<T, 1, kPassColsAvx512>(a, nc);
    } else {
        if ((a.ng + 1) / 2 == Z) return run_cols<T, Z, kPassColsAvx512>(a, nc);
        run_rows<T, Z - 1>(a, nc);
    }
}
template <template <int, int> class T>
void run(int64_t k, const uint8_t* w, size_t gb, const uint8_t* x, size_t xs, float* y, int64_t ldy, int ng, int nc) {
    static_assert(kPassGroupsAvx512 % 2 == 0, "a pass is whole zmm row blocks");
    run_rows<T, kMaxZ>(TileArgs{k, w, gb, x, xs, y, ldy, ng}, nc);
}
template <int Z, int C>
struct Q4_1Tile {
    static void run(const TileArgs& a) { q4_1_tile<Z, C>(a); }
};
template <int Z, int C>
struct Q4_KTile {
    static void run(const TileArgs& a) { q4_K_tile<Z, C>(a); }
};
template <int Z, int C>
struct Q8_0Tile {
    static void run(const TileArgs& a) { signed_tile<Q8_0Unsigned, Z, C>(a); }
};
template <int Z, int C>
struct Q4_0Tile {
    static void run(const TileArgs& a) { signed_tile<Q4_0Unsigned, Z, C>(a); }
};
template <int Z, int C>
struct Q5_0Tile {
    static void run(const TileArgs& a) { signed_tile<Q5_0Unsigned, Z, C>(a); }
};

}  // namespace

packed_tile_fn packed_tile_avx512(Type wtype) {
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
