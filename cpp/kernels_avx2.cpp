// AVX2 (+FMA, F16C) kernels. Compiled with -mavx2 -mfma -mf16c; only reached when cpuid says so.
//
// Dequantizers and activation quantizers are bit-exact with the scalar reference: the same float operations
// in the same order, roundf and nearest_int reproduced exactly. A multiply then an add must stay two roundings
// (the scalar unit has no FMA): the build passes -ffp-contract=off, and opaque() keeps it so where it matters
// even without that flag.
// Every dot product is a tile of R weight rows × C activation rows (gemm.h): a weight block is unpacked once
// for C activations. vec_dot is the 1×1 tile; the matmul uses the larger ones.
//
// Nothing here may instantiate a std:: template or define an external inline function: a copy built with
// these flags could be the one the linker keeps for baseline callers. Everything is in an anonymous namespace.
#include <immintrin.h>

#include <cstring>

#include "gemm.h"
#include "quants.h"

namespace rz {
namespace {

// ---- helpers ---------------------------------------------------------------------------------------------

inline __m256 opaque(__m256 v) {
    __asm__("" : "+x"(v));
    return v;
}
inline float h2f(f16_t h) { return _cvtsh_ss(h); }
// Round to nearest even, as f32_to_f16; the two agree on every finite float.
inline f16_t f2h(float f) { return f16_t(_cvtss_sh(f, 0)); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles (elements 0..15), then the high ones (16..31).
inline __m256i nibbles32(const uint8_t* p) {
    const __m128i t = load128(p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Bit j of x -> byte j: 0xFF where set, 0 where clear.
inline __m256i bits_to_bytes(uint32_t x) {
    const __m256i spread = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                              0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(x)), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// A Q5 block's quants as 32 unsigned bytes 0..31.
inline __m256i q5_bytes(const uint8_t* qs, const uint8_t* qh) {
    uint32_t h;
    std::memcpy(&h, qh, 4);
    return _mm256_or_si256(nibbles32(qs), _mm256_and_si256(bits_to_bytes(h), _mm256_set1_epi8(0x10)));
}

// 8 signed 32-bit integers from sum_j a_j * b_j over 32 unsigned bytes a and signed bytes b
// (pairs through int16, which cannot saturate for |a| <= 128 with |b| <= 127 or a <= 63).
inline __m256i dot_u8_i8(__m256i a, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

// roundf (halves away from zero) on 8 floats, exactly; v must be opaque (see nearest_int).
inline __m256 round_away(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));  // exact
    const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.f), _mm256_and_ps(v, sign));
    return _mm256_add_ps(t, _mm256_and_ps(up, one));
}

// Four vectors of 8 int32 in [-128, 127] -> 32 int8 in order.
inline __m256i pack_i32_to_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// ---- dequantize --------------------------------------------------------------------------------------------

enum Op { kMul, kMulAdd, kMulSub };

// y[0..31] from 32 signed bytes q: d*q (then + m or - m), d0/m0 for elements 0..15, d1/m1 for 16..31.
template <int O>
inline void store32(float* y, __m256i q, __m256 d0, __m256 d1, __m256 m0, __m256 m1) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        const __m256 d = i < 2 ? d0 : d1, m = i < 2 ? m0 : m1;
        __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])));
        if (O == kMulAdd) v = _mm256_add_ps(opaque(v), m);
        if (O == kMulSub) v = _mm256_sub_ps(opaque(v), m);
        _mm256_storeu_ps(y + 8 * i, v);
    }
}
inline void store32_mul(float* y, __m256i q, __m256 d) {
    const __m256 z = _mm256_setzero_ps();
    store32<kMul>(y, q, d, d, z, z);
}

void dequantize_row_q4_0(const void* src, float* y, int64_t k) {
    const block_q4_0* x = static_cast<const block_q4_0*>(src);
    for (int64_t i = 0; i < k / QK4_0; ++i, y += QK4_0)
        store32_mul(y, _mm256_sub_epi8(nibbles32(x[i].qs), _mm256_set1_epi8(8)), _mm256_set1_ps(h2f(x[i].d)));
}

void dequantize_row_q4_1(const void* src, float* y, int64_t k) {
    const block_q4_1* x = static_cast<const block_q4_1*>(src);
    for (int64_t i = 0; i < k / QK4_1; ++i, y += QK4_1) {
        const __m256 d = _mm256_set1_ps(h2f(x[i].d)), m = _mm256_set1_ps(h2f(x[i].m));
        store32<kMulAdd>(y, nibbles32(x[i].qs), d, d, m, m);
    }
}

void dequantize_row_q5_0(const void* src, float* y, int64_t k) {
    const block_q5_0* x = static_cast<const block_q5_0*>(src);
    for (int64_t i = 0; i < k / QK5_0; ++i, y += QK5_0)
        store32_mul(y, _mm256_sub_epi8(q5_bytes(x[i].qs, x[i].qh), _mm256_set1_epi8(16)), _mm256_set1_ps(h2f(x[i].d)));
}

void dequantize_row_q5_1(const void* src, float* y, int64_t k) {
    const block_q5_1* x = static_cast<const block_q5_1*>(src);
    for (int64_t i = 0; i < k / QK5_1; ++i, y += QK5_1) {
        const __m256 d = _mm256_set1_ps(h2f(x[i].d)), m = _mm256_set1_ps(h2f(x[i].m));
        store32<kMulAdd>(y, q5_bytes(x[i].qs, x[i].qh), d, d, m, m);
    }
}

void dequantize_row_q8_0(const void* src, float* y, int64_t k) {
    const block_q8_0* x = static_cast<const block_q8_0*>(src);
    for (int64_t i = 0; i < k / QK8_0; ++i, y += QK8_0) store32_mul(y, load256(x[i].qs), _mm256_set1_ps(h2f(x[i].d)));
}

void dequantize_row_q8_1(const void* src, float* y, int64_t k) {
    const block_q8_1* x = static_cast<const block_q8_1*>(src);
    for (int64_t i = 0; i < k / QK8_1; ++i, y += QK8_1) store32_mul(y, load256(x[i].qs), _mm256_set1_ps(h2f(x[i].d)));
}

void dequantize_row_q8_K(const void* src, float* y, int64_t k) {
    const block_q8_K* x = static_cast<const block_q8_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const __m256 d = _mm256_set1_ps(x[i].d);
        for (int j = 0; j < QK_K; j += 32, y += 32) store32_mul(y, load256(x[i].qs + j), d);
    }
}

// Q4_K / Q5_K's 12 packed bytes -> 8 six-bit scales (bytes 0..7) and 8 mins (bytes 8..15).
inline void unpack_scale_min_k4(const uint8_t* packed, uint8_t out[16]) {
    uint32_t u[4];
    std::memcpy(u, packed, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);  // mins 4..7
    const uint32_t mins03 = u[1] & low6;
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);  // scales 4..7
    u[2] = mins03;
    u[0] &= low6;  // scales 0..3
    std::memcpy(out, u, 16);
}

void dequantize_row_q4_K(const void* src, float* y, int64_t k) {
    const block_q4_K* x = static_cast<const block_q4_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = h2f(x[i].d), dmin = h2f(x[i].dmin);
        uint8_t sm[16];
        unpack_scale_min_k4(x[i].scales, sm);
        for (int j = 0; j < 4; ++j, y += 64) {
            const __m256i q = load256(x[i].qs + 32 * j);
            const __m256 d1 = _mm256_set1_ps(d * float(sm[2 * j])), m1 = _mm256_set1_ps(dmin * float(sm[8 + 2 * j]));
            const __m256 d2 = _mm256_set1_ps(d * float(sm[2 * j + 1])), m2 = _mm256_set1_ps(dmin * float(sm[9 + 2 * j]));
            store32<kMulSub>(y, _mm256_and_si256(q, _mm256_set1_epi8(0x0F)), d1, d1, m1, m1);
            store32<kMulSub>(y + 32, _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0F)), d2, d2, m2, m2);
        }
    }
}

void dequantize_row_q5_K(const void* src, float* y, int64_t k) {
    const block_q5_K* x = static_cast<const block_q5_K*>(src);
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = h2f(x[i].d), dmin = h2f(x[i].dmin);
        uint8_t sm[16];
        unpack_scale_min_k4(x[i].scales, sm);
        const __m256i qh = load256(x[i].qh);
        for (int j = 0; j < 4; ++j, y += 64) {
            const __m256i q = load256(x[i].qs + 32 * j);
            const __m256i h = _mm256_srli_epi16(qh, 2 * j);  // bit 0: low sub-block, bit 1: high sub-block
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4),
                                               _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
            const __m256 d1 = _mm256_set1_ps(d * float(sm[2 * j])), m1 = _mm256_set1_ps(dmin * float(sm[8 + 2 * j]));
            const __m256 d2 = _mm256_set1_ps(d * float(sm[2 * j + 1])), m2 = _mm256_set1_ps(dmin * float(sm[9 + 2 * j]));
            store32<kMulSub>(y, lo, d1, d1, m1, m1);
            store32<kMulSub>(y + 32, hi, d2, d2, m2, m2);
        }
    }
}

// The four 32-byte groups of 6-bit quants (0..63) of one 128-element half of a Q6_K block:
// q[0] elements 0..31, q[1] 32..63, q[2] 64..95, q[3] 96..127.
inline void q6_half(const uint8_t* ql, const uint8_t* qh, __m256i q[4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), hi2 = _mm256_set1_epi8(0x30);
    const __m256i l0 = load256(ql), l1 = load256(ql + 32), h = load256(qh);
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), hi2));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), hi2));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(h, hi2));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), _mm256_and_si256(_mm256_srli_epi16(h, 2), hi2));
}

void dequantize_row_q6_K(const void* src, float* y, int64_t k) {
    const block_q6_K* x = static_cast<const block_q6_K*>(src);
    const __m256 z = _mm256_setzero_ps();
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = h2f(x[i].d);
        for (int h = 0; h < 2; ++h, y += 128) {
            __m256i q[4];
            q6_half(x[i].ql + 64 * h, x[i].qh + 32 * h, q);
            const int8_t* sc = x[i].scales + 8 * h;
            for (int g = 0; g < 4; ++g) {
                // (d * sc) * q, as the reference evaluates d * float(sc) * float(q)
                const __m256 d0 = _mm256_set1_ps(d * float(sc[2 * g])), d1 = _mm256_set1_ps(d * float(sc[2 * g + 1]));
                store32<kMul>(y + 32 * g, _mm256_sub_epi8(q[g], _mm256_set1_epi8(32)), d0, d1, z, z);
            }
        }
    }
}

void dequantize_row_q2_K(const void* src, float* y, int64_t k) {
    const block_q2_K* x = static_cast<const block_q2_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = h2f(x[i].d), dmin = h2f(x[i].dmin);
        const uint8_t* sc = x[i].scales;
        for (int half = 0; half < 2; ++half) {
            const __m256i q = load256(x[i].qs + 32 * half);
            for (int shift = 0; shift < 8; shift += 2, y += 32, sc += 2) {
                const __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, shift), _mm256_set1_epi8(3));
                store32<kMulSub>(y, v, _mm256_set1_ps(d * float(sc[0] & 0x0F)), _mm256_set1_ps(d * float(sc[1] & 0x0F)),
                                 _mm256_set1_ps(dmin * float(sc[0] >> 4)), _mm256_set1_ps(dmin * float(sc[1] >> 4)));
            }
        }
    }
}

// Q3_K's 12 packed bytes -> 16 signed scales (stored +32, returned without the offset).
inline void unpack_scales_q3_K(const uint8_t* s, int8_t out[16]) {
    uint32_t u[3], r[4];
    std::memcpy(u, s, 12);
    const uint32_t low4 = 0x0f0f0f0f, low2 = 0x03030303;
    r[0] = (u[0] & low4) | (((u[2] >> 0) & low2) << 4);
    r[1] = (u[1] & low4) | (((u[2] >> 2) & low2) << 4);
    r[2] = ((u[0] >> 4) & low4) | (((u[2] >> 4) & low2) << 4);
    r[3] = ((u[1] >> 4) & low4) | (((u[2] >> 6) & low2) << 4);
    std::memcpy(out, r, 16);
    for (int j = 0; j < 16; ++j) out[j] = int8_t(out[j] - 32);
}

void dequantize_row_q3_K(const void* src, float* y, int64_t k) {
    const block_q3_K* x = static_cast<const block_q3_K*>(src);
    const __m256 z = _mm256_setzero_ps();
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = h2f(x[i].d);
        int8_t sc[16];
        unpack_scales_q3_K(x[i].scales, sc);
        const __m256i hm = load256(x[i].hmask);
        int is = 0, bit = 0;
        for (int half = 0; half < 2; ++half) {
            const __m256i q = load256(x[i].qs + 32 * half);
            for (int shift = 0; shift < 8; shift += 2, ++bit, is += 2, y += 32) {
                const __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, shift), _mm256_set1_epi8(3));
                const __m256i mb = _mm256_set1_epi8(char(1 << bit));
                const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, mb), _mm256_setzero_si256());
                const __m256i v = _mm256_sub_epi8(low, _mm256_and_si256(clear, _mm256_set1_epi8(4)));
                store32<kMul>(y, v, _mm256_set1_ps(d * float(sc[is])), _mm256_set1_ps(d * float(sc[is + 1])), z, z);
            }
        }
    }
}

void dequantize_row_f16(const void* src, float* y, int64_t k) {
    const f16_t* x = static_cast<const f16_t*>(src);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m128i h = load128(x + i);
        __m256i v = _mm256_castps_si256(_mm256_cvtph_ps(h));
        // The conversion quiets signalling NaNs; the reference keeps the payload as it is.
        const __m256i a = _mm256_and_si256(_mm256_cvtepu16_epi32(h), _mm256_set1_epi32(0x7fff));
        const __m256i snan = _mm256_and_si256(_mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7c00)),
                                              _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7e00), a));
        v = _mm256_xor_si256(v, _mm256_and_si256(snan, _mm256_set1_epi32(0x00400000)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), v);
    }
    for (; i < k; ++i) y[i] = f16_to_f32(x[i]);
}

void dequantize_row_bf16(const void* src, float* y, int64_t k) {
    const bf16_t* x = static_cast<const bf16_t*>(src);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(x + i)), 16));
    for (; i < k; ++i) y[i] = bf16_to_f32(x[i]);
}

// ---- activation quantizers ---------------------------------------------------------------------------------

// 1/d, or 0 where d is 0 or 1/d overflows (as the reference).
inline float inverse_or_zero(float d) {
    const float id = d != 0.f ? 1.f / d : 0.f;
    return __builtin_isfinite(id) ? id : 0.f;
}

// nearest_int of the reference on 8 floats, bit for bit (also where the input is out of its range): the
// rounded integer is left in the low mantissa bits by adding 1.5 * 2^23.
// v must be a rounded product (opaque), or GCC would fuse its multiply with this add.
inline __m256i nearest_int(__m256 v) {
    const __m256i bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12582912.f)));
    return _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x00400000));
}

// max |x| over 32 floats.
inline float absmax32(const float* x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
    for (int j = 8; j < 32; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    return hmax(m);
}

// 32 floats times id, rounded half away from zero, as int8 (and their sum, if asked).
inline __m256i round32(const float* x, float id, __m256i* sum) {
    const __m256 v = _mm256_set1_ps(id);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvttps_epi32(round_away(opaque(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), v))));
    if (sum) *sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    return pack_i32_to_i8(q[0], q[1], q[2], q[3]);
}

void quantize_row_q8_0(const float* x, void* dst, int64_t k) {
    block_q8_0* y = static_cast<block_q8_0*>(dst);
    for (int64_t i = 0; i < k / QK8_0; ++i, x += QK8_0) {
        const float d = absmax32(x) / 127.f;
        const float id = inverse_or_zero(d);
        y[i].d = f2h(d);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs), round32(x, id, nullptr));
    }
}

void quantize_row_q8_1(const float* x, void* dst, int64_t k) {
    block_q8_1* y = static_cast<block_q8_1*>(dst);
    for (int64_t i = 0; i < k / QK8_1; ++i, x += QK8_1) {
        const float d = absmax32(x) / 127.f;
        const float id = inverse_or_zero(d);
        y[i].d = f2h(d);
        __m256i sum;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs), round32(x, id, &sum));
        y[i].s = f2h(float(hsum_i32(sum)) * d);
    }
}

void quantize_row_q8_K(const float* x, void* dst, int64_t k) {
    block_q8_K* y = static_cast<block_q8_K*>(dst);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        const float amax = hmax(m);
        if (amax == 0.f) {
            std::memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        // The signed value of the first element of largest magnitude, as the reference's strict '>' scan.
        float max = 0.f;
        const __m256 va = _mm256_set1_ps(amax);
        for (int j = 0; j < QK_K; j += 8) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), va, _CMP_EQ_OQ));
            if (hit) {
                max = x[j + __builtin_ctz(unsigned(hit))];
                break;
            }
        }
        const float iscale = -127.f / max;
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-128);
        for (int j = 0; j < QK_K; j += 32) {
            __m256i q[4];
            for (int l = 0; l < 4; ++l)
                q[l] = _mm256_max_epi32(_mm256_min_epi32(nearest_int(opaque(_mm256_mul_ps(vs, _mm256_loadu_ps(x + j + 8 * l)))), top), bottom);
            const __m256i packed = pack_i32_to_i8(q[0], q[1], q[2], q[3]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs + j), packed);
            // Sums of each 16: per 128-bit lane, pairs then quads then the whole lane.
            __m256i s = dot_u8_i8(_mm256_set1_epi8(1), packed);
            s = _mm256_hadd_epi32(s, s);
            s = _mm256_hadd_epi32(s, s);
            y[i].bsums[j / 16] = int16_t(_mm256_extract_epi32(s, 0));
            y[i].bsums[j / 16 + 1] = int16_t(_mm256_extract_epi32(s, 4));
        }
        y[i].d = 1.f / iscale;
    }
}

// ---- dot-product tiles ---------------------------------------------------------------------------------------

struct TileArgs {
    int64_t k;
    const uint8_t* w;
    size_t ws;
    const uint8_t* x;
    size_t xs;
    float* y;
    int64_t ldy;
};

template <typename B>
inline const B* wrow(const TileArgs& a, int r) { return reinterpret_cast<const B*>(a.w + size_t(r) * a.ws); }
template <typename B>
inline const B* xrow(const TileArgs& a, int c) { return reinterpret_cast<const B*>(a.x + size_t(c) * a.xs); }

// A tile's preferred passes: kRows weight rows x kCols activation rows, and kDecodeRows weight rows when there is
// a single activation row.
template <int R, int C, int D>
struct Shape {
    static constexpr int kRows = R, kCols = C, kDecodeRows = D;
};

template <int U, int R, int C>
inline void store_tile(const TileArgs& a, __m256 (&acc)[U][R][C], float extra[R][C] = nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            __m256 v = acc[0][r][c];
            for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[u][r][c]);
            a.y[c * a.ldy + r] = hsum(v) + (extra ? extra[r][c] : 0.f);
        }
}

template <int U, int R, int C>
inline void zero(__m256 (&acc)[U][R][C]) {
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[u][r][c] = _mm256_setzero_ps();
}

// A decode tile (one activation row) streams its weight rows from memory once, faster than the hardware
// prefetcher alone fetches them: each step also asks for the same bytes of the next tile's rows (R rows on;
// rows are contiguous), [offset, offset + bytes) of each (the last step asks for the rest). Past the matrix's
// end a prefetch is a no-op.
inline void prefetch_next_tile(const TileArgs& a, int R, size_t offset, size_t bytes) {
    for (int r = 0; r < R; ++r) {
        const char* p = reinterpret_cast<const char*>(a.w) + size_t(R + r) * a.ws + offset;
        for (size_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
        _mm_prefetch(p + bytes - 1, _MM_HINT_T0);
    }
}

// ---- 32-element blocks ----------------------------------------------------------------------------------
// Two blocks a, b side by side: lo = [a 0..15 | b 0..15], hi = [a 16..31 | b 16..31] (bytes, 128-bit lanes).
inline void halves_pair(const void* a, const void* b, __m256i& lo, __m256i& hi) {
    const auto* pa = static_cast<const uint8_t*>(a);
    const auto* pb = static_cast<const uint8_t*>(b);
    lo = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(pb), reinterpret_cast<const __m128i*>(pa));
    hi = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(pb + 16), reinterpret_cast<const __m128i*>(pa + 16));
}
// The same for packed nibbles (low nibbles are elements 0..15, high ones 16..31).
inline void nibble_pair(const uint8_t* a, const uint8_t* b, __m256i& lo, __m256i& hi) {
    const __m256i v = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(b), reinterpret_cast<const __m128i*>(a));
    lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}
// And for Q5 blocks (bit j of qh is element j's fifth bit).
template <typename B>
inline void q5_pair(const B& a, const B& b, __m256i& lo, __m256i& hi) {
    uint32_t ha, hb;
    std::memcpy(&ha, a.qh, 4);
    std::memcpy(&hb, b.qh, 4);
    nibble_pair(a.qs, b.qs, lo, hi);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    lo = _mm256_or_si256(lo, _mm256_and_si256(bits_to_bytes((ha & 0xFFFF) | hb << 16), bit4));
    hi = _mm256_or_si256(hi, _mm256_and_si256(bits_to_bytes(ha >> 16 | (hb & 0xFFFF0000u)), bit4));
}

// A weight type's layout for the shared tile: its block and activation block, how a block's 32 quants are
// formed, and how they multiply the activation bytes:
//   kOffset > 0: unsigned quants stored with an offset (q + kOffset); sum q p = maddubs(q, p) - kOffset sum p
//   kSigned:     signed quants; |q| times p with q's sign (maddubs needs one unsigned operand)
//   kMin:        w = d q + m with unsigned q, paired with Q8_1 whose s = d_x sum(p) carries the min term
struct Q4_0L {
    using W = block_q4_0;
    using X = block_q8_0;
    static constexpr int kOffset = 8;
    static constexpr bool kSigned = false, kMin = false;
    static __m256i quants(const W& b) { return nibbles32(b.qs); }
    static void pair(const W& a, const W& b, __m256i& lo, __m256i& hi) { nibble_pair(a.qs, b.qs, lo, hi); }
};
struct Q4_1L {
    using W = block_q4_1;
    using X = block_q8_1;
    static constexpr int kOffset = 0;
    static constexpr bool kSigned = false, kMin = true;
    static __m256i quants(const W& b) { return nibbles32(b.qs); }
    static void pair(const W& a, const W& b, __m256i& lo, __m256i& hi) { nibble_pair(a.qs, b.qs, lo, hi); }
};
struct Q5_0L {
    using W = block_q5_0;
    using X = block_q8_0;
    static constexpr int kOffset = 16;
    static constexpr bool kSigned = false, kMin = false;
    static __m256i quants(const W& b) { return q5_bytes(b.qs, b.qh); }
    static void pair(const W& a, const W& b, __m256i& lo, __m256i& hi) { q5_pair(a, b, lo, hi); }
};
struct Q5_1L {
    using W = block_q5_1;
    using X = block_q8_1;
    static constexpr int kOffset = 0;
    static constexpr bool kSigned = false, kMin = true;
    static __m256i quants(const W& b) { return q5_bytes(b.qs, b.qh); }
    static void pair(const W& a, const W& b, __m256i& lo, __m256i& hi) { q5_pair(a, b, lo, hi); }
};
struct Q8_0L {
    using W = block_q8_0;
    using X = block_q8_0;
    static constexpr int kOffset = 0;
    static constexpr bool kSigned = true, kMin = false;
    static __m256i quants(const W& b) { return load256(b.qs); }
};

inline uint32_t load_u32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// The first two halves of four blocks `stride` bytes apart (d and m, d and s, or d and two quant bytes), as
// floats [a0 b0 a1 b1 a2 b2 a3 b3]: one conversion for four blocks' scales.
inline __m256 halves4(const uint8_t* p, size_t stride) {
    __m128i v = _mm_cvtsi32_si128(int(load_u32(p)));
    v = _mm_insert_epi32(v, int(load_u32(p + stride)), 1);
    v = _mm_insert_epi32(v, int(load_u32(p + 2 * stride)), 2);
    v = _mm_insert_epi32(v, int(load_u32(p + 3 * stride)), 3);
    return _mm256_cvtph_ps(v);
}

// Q8_0's tile (the unsigned types use Quad32 below): sum over blocks of d_w d_x sum(q p) (+ m_w s_x). Four
// blocks per step: their scale products come from one vector multiply ([dd0 ms0 dd1 ms1 ...]); each dd is
// broadcast for its block's FMA, and the min products (odd lanes) are added to the accumulator, whose lanes are
// summed at the end. Remaining blocks one at a time.
template <typename L, typename S>
struct Tile32 : S {

    template <int R, int C>
    static inline void block(const TileArgs& a, int64_t b, const __m256 (&dd)[R][C], __m256 (&acc)[R][C]) {
        using W = typename L::W;
        using X = typename L::X;
        __m256i q[R], sq[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            q[r] = L::quants(wrow<W>(a, r)[b]);
            if (L::kSigned) {
                sq[r] = q[r];
                q[r] = _mm256_abs_epi8(q[r]);
            }
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            const __m256i p = load256(xrow<X>(a, c)[b].qs);
            const __m256i off = L::kOffset ? _mm256_maddubs_epi16(_mm256_set1_epi8(L::kOffset), p) : _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                __m256i t = _mm256_maddubs_epi16(q[r], L::kSigned ? _mm256_sign_epi8(p, sq[r]) : p);
                if (L::kOffset) t = _mm256_sub_epi16(t, off);
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, _mm256_set1_epi16(1)));
                acc[r][c] = _mm256_fmadd_ps(dd[r][c], dot, acc[r][c]);
            }
        }
    }

    template <int R, int C>
    static void run(const TileArgs& a) {
        using W = typename L::W;
        using X = typename L::X;
        __m256 acc[R][C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
        const int64_t nb = a.k / 32;
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) {
            if (C == 1) prefetch_next_tile(a, R, size_t(b) * sizeof(W), size_t(b + 8 > nb ? nb - b : 4) * sizeof(W));
            __m256 ws[R], prod[R][C];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) ws[r] = halves4(reinterpret_cast<const uint8_t*>(wrow<W>(a, r) + b), sizeof(W));
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const __m256 xs = halves4(reinterpret_cast<const uint8_t*>(xrow<X>(a, c) + b), sizeof(X));
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    prod[r][c] = _mm256_mul_ps(ws[r], xs);
                    if (L::kMin) acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_blend_ps(_mm256_setzero_ps(), prod[r][c], 0xAA));
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {
                __m256 dd[R][C];
                const __m256i idx = _mm256_set1_epi32(2 * i);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
                    for (int c = 0; c < C; ++c) dd[r][c] = _mm256_permutevar8x32_ps(prod[r][c], idx);
                block<R, C>(a, b + i, dd, acc);
            }
        }
        for (; b < nb; ++b) {
            __m256 dd[R][C];
            float mins[R][C];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const W& B = wrow<W>(a, r)[b];
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const X& Y = xrow<X>(a, c)[b];
                    dd[r][c] = _mm256_set1_ps(h2f(B.d) * h2f(Y.d));
                    if constexpr (L::kMin) mins[r][c] = h2f(B.m) * h2f(Y.s);
                }
            }
            block<R, C>(a, b, dd, acc);
            if constexpr (L::kMin)
                for (int r = 0; r < R; ++r)
                    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_setr_ps(mins[r][c], 0, 0, 0, 0, 0, 0, 0));
        }
        __m256 out[1][R][C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) out[0][r][c] = acc[r][c];
        store_tile(a, out);
    }
};

// Quad32's scale lanes from four blocks' first two halves h = [a0 b0 a1 b1 a2 b2 a3 b3] (f16): d = [a0 a0 a2 a2 a1
// a1 a3 a3], the lanes of each block's sums, and m = [b0 0 b2 0 b1 0 b3 0], one lane per block. Lanes of blocks
// >= t are zero.
inline void quad_scales(__m128i h, int t, __m256& d, __m256& m) {
    d = _mm256_cvtph_ps(_mm_shuffle_epi8(h, _mm_setr_epi8(0, 1, 0, 1, 8, 9, 8, 9, 4, 5, 4, 5, 12, 13, 12, 13)));
    m = _mm256_cvtph_ps(_mm_shuffle_epi8(h, _mm_setr_epi8(2, 3, -1, -1, 10, 11, -1, -1, 6, 7, -1, -1, 14, 15, -1, -1)));
    if (t < 4) {
        const __m256 keep = _mm256_cmp_ps(_mm256_setr_ps(0, 0, 2, 2, 1, 1, 3, 3), _mm256_set1_ps(float(t)), _CMP_LT_OQ);
        d = _mm256_and_ps(d, keep);
        m = _mm256_and_ps(m, keep);
    }
}

// The first two halves (d and m, d and s, or d and two quant bytes) of blocks i[0..3], `stride` bytes apart.
inline __m128i halves_at(const uint8_t* p, size_t stride, const int64_t (&i)[4]) {
    __m128i v = _mm_cvtsi32_si128(int(load_u32(p + size_t(i[0]) * stride)));
    v = _mm_insert_epi32(v, int(load_u32(p + size_t(i[1]) * stride)), 1);
    v = _mm_insert_epi32(v, int(load_u32(p + size_t(i[2]) * stride)), 2);
    return _mm_insert_epi32(v, int(load_u32(p + size_t(i[3]) * stride)), 3);
}

// sum over blocks of d_w d_x sum(q p) (+ m_w s_x), four blocks A B C D per step, for unsigned quants (Q4_0, Q4_1,
// Q5_0, Q5_1). Quants and activations are paired as [A | B], [C | D] (L::pair, halves_pair), so one int16
// horizontal add of the two pairs' sums (8 products each, at most 8 * 31 * 128 < 2^15) and one madd give int32
// lanes [A A C C | B B D D], and one FMA applies the four scale products; the min products take a second FMA.
// A last step of t < 4 blocks repeats block t - 1 with zero scales. (Q8_0's signed products, up to 2 * 128 * 127
// per pair, cannot share int16 sums: it keeps Tile32, which decodes faster for it.)
template <typename L, typename S>
struct Quad32 : S {
    template <int R, int C>
    static inline void step(const TileArgs& a, int64_t b, int t, __m256 (&acc)[1][R][C]) {
        using W = typename L::W;
        using X = typename L::X;
        const __m256i ones = _mm256_set1_epi16(1);
        const int64_t blk[4] = {b, b + (t > 1 ? 1 : 0), b + (t > 2 ? 2 : t - 1), b + (t > 3 ? 3 : t - 1)};
        static_assert(!L::kSigned, "Quad32 sums 8 products in int16: unsigned quants only");
        __m256i lo[R][2], hi[R][2];
        __m256 wd[R], wm[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const W* B = wrow<W>(a, r);
            for (int h = 0; h < 2; ++h) L::pair(B[blk[2 * h]], B[blk[2 * h + 1]], lo[r][h], hi[r][h]);
            quad_scales(halves_at(reinterpret_cast<const uint8_t*>(B), sizeof(W), blk), t, wd[r], wm[r]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            const X* Y = xrow<X>(a, c);
            __m256i plo[2], phi[2];
            for (int h = 0; h < 2; ++h) halves_pair(Y[blk[2 * h]].qs, Y[blk[2 * h + 1]].qs, plo[h], phi[h]);
            __m256 xd, xm;
            quad_scales(halves_at(reinterpret_cast<const uint8_t*>(Y), sizeof(X), blk), t, xd, xm);
            __m256i off = _mm256_setzero_si256();
            if (L::kOffset) {
                const __m256i o = _mm256_set1_epi8(L::kOffset);
                __m256i s[2];
                for (int h = 0; h < 2; ++h) s[h] = _mm256_add_epi16(_mm256_maddubs_epi16(o, plo[h]), _mm256_maddubs_epi16(o, phi[h]));
                off = _mm256_hadd_epi16(s[0], s[1]);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                __m256i s[2];
                for (int h = 0; h < 2; ++h)
                    s[h] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r][h], plo[h]), _mm256_maddubs_epi16(hi[r][h], phi[h]));
                __m256i h16 = _mm256_hadd_epi16(s[0], s[1]);
                if (L::kOffset) h16 = _mm256_sub_epi16(h16, off);
                const __m256i sums = _mm256_madd_epi16(h16, ones);
                acc[0][r][c] = _mm256_fmadd_ps(_mm256_mul_ps(wd[r], xd), _mm256_cvtepi32_ps(sums), acc[0][r][c]);
                if (L::kMin) acc[0][r][c] = _mm256_fmadd_ps(wm[r], xm, acc[0][r][c]);
            }
        }
    }

    template <int R, int C>
    static void run(const TileArgs& a) {
        using W = typename L::W;
        __m256 acc[1][R][C];
        zero(acc);
        const int64_t nb = a.k / 32;
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) {
            if (C == 1) prefetch_next_tile(a, R, size_t(b) * sizeof(W), size_t(b + 8 > nb ? nb - b : 4) * sizeof(W));
            step<R, C>(a, b, 4, acc);
        }
        if (b < nb) step<R, C>(a, b, int(nb - b), acc);
        store_tile(a, acc);
    }
};

using TileQ4_0 = Quad32<Q4_0L, Shape<4, 4, 4>>;
using TileQ4_1 = Quad32<Q4_1L, Shape<4, 4, 4>>;
using TileQ5_0 = Quad32<Q5_0L, Shape<4, 4, 4>>;
using TileQ5_1 = Quad32<Q5_1L, Shape<4, 4, 4>>;
using TileQ8_0 = Tile32<Q8_0L, Shape<2, 4, 2>>;

// Per-chunk scale broadcasts: from 8 int16 scales repeated in both 128-bit lanes, lane 0 gets scale i and
// lane 1 scale j.
inline __m256i scale_pair(__m256i s16x2, int i, int j) {
    const __m256i idx = _mm256_setr_epi8(
        char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1),
        char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1), char(2 * i), char(2 * i + 1),
        char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1),
        char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1), char(2 * j), char(2 * j + 1));
    return _mm256_shuffle_epi8(s16x2, idx);
}

// Q8_K's 16 bsums summed in pairs: the 8 sums over 32-element sub-blocks (as int16; |sum| <= 4064).
inline __m128i bsums_pairs(const block_q8_K& Y) {
    const __m256i b = load256(Y.bsums);
    return _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

// Q4_K / Q5_K x Q8_K: per super-block, sum_j sc_j sum(q p) over 8 sub-blocks of 32 in int32 and the min
// term sum_j m_j bsum_j, then d*d_y and dmin*d_y in float.
template <bool kFive> struct Q45Block { using type = block_q4_K; };
template <> struct Q45Block<true> { using type = block_q5_K; };

template <bool kFive>
struct TileQ45_K : Shape<2, 8, 2> {
    template <int R, int C>
    static void run(const TileArgs& a) {
        using BW = typename Q45Block<kFive>::type;
        __m256 acc[1][R][C];
        zero(acc);
        const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
        const int64_t nb = a.k / QK_K;
        for (int64_t b = 0; b < nb; ++b) {
            __m256i sc[R], isum[R][C];
            __m128i mins[R];
            float dw[R], mw[R];
            __m256i qh[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const BW& B = wrow<BW>(a, r)[b];
                uint8_t sm[16];
                unpack_scale_min_k4(B.scales, sm);
                const __m128i v = load128(sm);
                sc[r] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(v));
                mins[r] = _mm_cvtepu8_epi16(_mm_srli_si128(v, 8));
                dw[r] = h2f(B.d);
                mw[r] = h2f(B.dmin);
                if constexpr (kFive) qh[r] = load256(B.qh);
            }
            float dy[C];
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const block_q8_K& Y = xrow<block_q8_K>(a, c)[b];
                dy[c] = Y.d;
                const __m128i bs = bsums_pairs(Y);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    // the min term, - dmin d_y sum_j m_j bsum_j, straight into the accumulator's low lanes
                    const __m128 m = _mm_cvtepi32_ps(_mm_madd_epi16(mins[r], bs));
                    acc[0][r][c] = _mm256_fnmadd_ps(_mm256_zextps128_ps256(m), _mm256_set1_ps(mw[r] * dy[c]), acc[0][r][c]);
                    isum[r][c] = _mm256_setzero_si256();
                }
            }
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                __m256i lo[R], hi[R], slo[R], shi[R];
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    const BW& B = wrow<BW>(a, r)[b];
                    const __m256i q = load256(B.qs + 32 * j);
                    lo[r] = _mm256_and_si256(q, low4);
                    hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
                    if constexpr (kFive) {
                        const __m256i h = _mm256_srli_epi16(qh[r], 2 * j);
                        lo[r] = _mm256_or_si256(lo[r], _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
                        hi[r] = _mm256_or_si256(hi[r], _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
                    }
                    slo[r] = scale_pair(sc[r], 2 * j, 2 * j);
                    shi[r] = scale_pair(sc[r], 2 * j + 1, 2 * j + 1);
                }
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const block_q8_K& Y = xrow<block_q8_K>(a, c)[b];
                    const __m256i p0 = load256(Y.qs + 64 * j), p1 = load256(Y.qs + 64 * j + 32);
#pragma GCC unroll 8
                    for (int r = 0; r < R; ++r) {
                        const __m256i t0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], p0), slo[r]);
                        const __m256i t1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], p1), shi[r]);
                        isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_add_epi32(t0, t1));
                    }
                }
            }
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
                    acc[0][r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dy[c]), _mm256_cvtepi32_ps(isum[r][c]), acc[0][r][c]);
        }
        store_tile(a, acc);
    }
};

// Q6_K x Q8_K: sum sc_g (q - 32) p = sum sc_g q p - 32 sum sc_g bsum_g, q the unsigned 6-bit quant.
struct TileQ6_K : Shape<1, 8, 1> {
    template <int R, int C>
    static void run(const TileArgs& a) {
        __m256 acc[1][R][C];
        zero(acc);
        const int64_t nb = a.k / QK_K;
        for (int64_t b = 0; b < nb; ++b) {
            __m256i sc[R], isum[R][C];
            float dw[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const block_q6_K& B = wrow<block_q6_K>(a, r)[b];
                sc[r] = _mm256_cvtepi8_epi16(load128(B.scales));
                dw[r] = h2f(B.d);
            }
            float dy[C];
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const block_q8_K& Y = xrow<block_q8_K>(a, c)[b];
                dy[c] = Y.d;
                const __m256i bs = load256(Y.bsums);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
                    isum[r][c] = _mm256_madd_epi16(_mm256_slli_epi16(sc[r], 5), _mm256_sub_epi16(_mm256_setzero_si256(), bs));
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                __m256i q[R][4], s[R][4];
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    const block_q6_K& B = wrow<block_q6_K>(a, r)[b];
                    q6_half(B.ql + 64 * h, B.qh + 32 * h, q[r]);
                    const __m256i half = h ? _mm256_permute2x128_si256(sc[r], sc[r], 0x11)
                                           : _mm256_permute2x128_si256(sc[r], sc[r], 0x00);
                    for (int g = 0; g < 4; ++g) s[r][g] = scale_pair(half, 2 * g, 2 * g + 1);
                }
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) {
                    const block_q8_K& Y = xrow<block_q8_K>(a, c)[b];
#pragma GCC unroll 4
                    for (int g = 0; g < 4; ++g) {
                        const __m256i p = load256(Y.qs + 128 * h + 32 * g);
#pragma GCC unroll 8
                        for (int r = 0; r < R; ++r)
                            isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[r][g], p), s[r][g]));
                    }
                }
            }
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r)
                    acc[0][r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dy[c]), _mm256_cvtepi32_ps(isum[r][c]), acc[0][r][c]);
        }
        store_tile(a, acc);
    }
};

// Float weights (F32, F16, BF16) x F32 activations; k need not be a multiple of 8.
enum FloatFmt { kF32, kF16, kBF16 };

template <int F>
inline __m256 load8(const uint8_t* p, int64_t i) {
    if (F == kF32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + i);
    const __m128i h = load128(reinterpret_cast<const uint16_t*>(p) + i);
    if (F == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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
        __m256 acc[1][R][C];
        zero(acc);
        const int64_t steps = a.k / 8;
        for (int64_t b = 0; b < steps; ++b) {
            __m256 wv[R];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) wv[r] = load8<F>(a.w + size_t(r) * a.ws, 8 * b);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                const __m256 xv = _mm256_loadu_ps(reinterpret_cast<const float*>(a.x + size_t(c) * a.xs) + 8 * b);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) acc[0][r][c] = _mm256_fmadd_ps(wv[r], xv, acc[0][r][c]);
            }
        }
        float extra[R][C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) {
                float t = 0.f;
                for (int64_t i = 8 * steps; i < a.k; ++i)
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

}  // namespace

#define RZ_BASELINE __attribute__((target("no-avx,no-avx2,no-fma,no-f16c")))

RZ_BASELINE void fill_kernels_avx2(KernelTable& t) {
    t[int(Type::F16)].dequantize = dequantize_row_f16;
    t[int(Type::F16)].vec_dot = vec_dot<TileFloat<kF16>>;
    t[int(Type::BF16)].dequantize = dequantize_row_bf16;
    t[int(Type::BF16)].vec_dot = vec_dot<TileFloat<kBF16>>;
    t[int(Type::F32)].vec_dot = vec_dot<TileFloat<kF32>>;
    t[int(Type::Q4_0)].dequantize = dequantize_row_q4_0;
    t[int(Type::Q4_0)].vec_dot = vec_dot<TileQ4_0>;
    t[int(Type::Q4_1)].dequantize = dequantize_row_q4_1;
    t[int(Type::Q4_1)].vec_dot = vec_dot<TileQ4_1>;
    t[int(Type::Q5_0)].dequantize = dequantize_row_q5_0;
    t[int(Type::Q5_0)].vec_dot = vec_dot<TileQ5_0>;
    t[int(Type::Q5_1)].dequantize = dequantize_row_q5_1;
    t[int(Type::Q5_1)].vec_dot = vec_dot<TileQ5_1>;
    t[int(Type::Q8_0)].dequantize = dequantize_row_q8_0;
    t[int(Type::Q8_0)].quantize = quantize_row_q8_0;
    t[int(Type::Q8_0)].vec_dot = vec_dot<TileQ8_0>;
    t[int(Type::Q8_1)].dequantize = dequantize_row_q8_1;
    t[int(Type::Q8_1)].quantize = quantize_row_q8_1;
    t[int(Type::Q2_K)].dequantize = dequantize_row_q2_K;
    t[int(Type::Q3_K)].dequantize = dequantize_row_q3_K;
    t[int(Type::Q4_K)].dequantize = dequantize_row_q4_K;
    t[int(Type::Q4_K)].vec_dot = vec_dot<TileQ45_K<false>>;
    t[int(Type::Q5_K)].dequantize = dequantize_row_q5_K;
    t[int(Type::Q5_K)].vec_dot = vec_dot<TileQ45_K<true>>;
    t[int(Type::Q6_K)].dequantize = dequantize_row_q6_K;
    t[int(Type::Q6_K)].vec_dot = vec_dot<TileQ6_K>;
    t[int(Type::Q8_K)].dequantize = dequantize_row_q8_K;
    t[int(Type::Q8_K)].quantize = quantize_row_q8_K;
}

namespace {
template <typename K>
RZ_BASELINE void set_tile(GemmTable& t, Type type) {
    t[int(type)] = GemmKernel{gemm_tile<K>, K::kRows > K::kDecodeRows ? K::kRows : K::kDecodeRows, K::kCols};
}
}  // namespace

RZ_BASELINE void fill_gemm_avx2(GemmTable& t) {
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
