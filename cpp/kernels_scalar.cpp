// Scalar reference kernels for every GGUF block format: dequantize, quantize and the quantized dot product.
//
// These are the specification the SIMD levels are tested against. Dequantizers use float32 arithmetic in
// the same order as ggml's C reference (scale * quant, then minus the min), so they match the `gguf`
// package's numpy dequantize bit for bit. Quantizers follow ggml's reference algorithms (roundf for the
// 32-blocks, nearest_int for the K-quants, the iterative scale searches of make_qkx2_quants/make_qx_quants).
// Dot products sum integers inside a block and floats across blocks.
//
// Bit-exactness needs IEEE float32 with no contraction into FMA: this file must be built without
// -ffast-math; should FMA be enabled (-mfma / -march), contraction is switched off below.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__) && defined(__FMA__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "quants.h"

namespace rz {
namespace {

// ---- shared helpers --------------------------------------------------------------------------------------

// Round to nearest, ties to even, by letting the FPU do it: adding 1.5 * 2^23 leaves the rounded integer in
// the low mantissa bits. Exact for |f| <= 2^22, which finite inputs of sane magnitude keep to; beyond it the
// result is still a defined (meaningless) int, as in ggml, and callers clamp it.
inline int nearest_int(float f) {
    const float v = f + 12582912.f;
    int32_t i;
    std::memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

// ggml's `d ? 1/d : 0`, also 0 where 1/d overflows (|d| below ~3e-39): C would then convert inf or NaN to an
// integer (undefined); the block's half scale rounds to zero either way, so nothing observable changes.
inline float inverse_or_zero(float d) {
    const float id = d != 0.f ? 1.f / d : 0.f;
    return std::isfinite(id) ? id : 0.f;
}

// Groups whose largest |x| is below this quantize to all zeros (ggml's GROUP_MAX_EPS).
constexpr float kGroupMaxEps = 1e-15f;

// Q3_K packs 16 signed 6-bit scales (stored +32) into 12 bytes:
//   bytes 0-7: low nibble = bits 0-3 of scale j (j < 8), high nibble = bits 0-3 of scale j+8
//   bytes 8-11: 2-bit fields; scale j's bits 4-5 are at byte 8 + j%4, shift 2*(j/4)
inline void unpack_scales_q3_K(const uint8_t* s, int8_t out[16]) {
    for (int j = 0; j < 16; ++j) {
        const int lo = j < 8 ? (s[j] & 0x0F) : (s[j - 8] >> 4);
        const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = int8_t((lo | (hi << 4)) - 32);
    }
}

// ---- float formats -----------------------------------------------------------------------------------------

void dequantize_row_f32(const void* src, float* y, int64_t k) { std::memcpy(y, src, size_t(k) * sizeof(float)); }

// A signalling NaN comes out quiet (quiet bit set, payload kept), as x86's F16C conversion and ggml's
// GGML_FP16_TO_FP32 make it, so every ISA level agrees. (numpy's astype keeps it signalling.)
void dequantize_row_f16(const void* src, float* y, int64_t k) {
    const f16_t* x = static_cast<const f16_t*>(src);
    for (int64_t i = 0; i < k; ++i) {
        const f16_t h = (x[i] & 0x7C00) == 0x7C00 && (x[i] & 0x03FF) ? f16_t(x[i] | 0x0200) : x[i];
        y[i] = f16_to_f32(h);
    }
}

void dequantize_row_bf16(const void* src, float* y, int64_t k) {
    const bf16_t* x = static_cast<const bf16_t*>(src);
    for (int64_t i = 0; i < k; ++i) y[i] = bf16_to_f32(x[i]);
}

void quantize_row_f32(const float* x, void* dst, int64_t k) { std::memcpy(dst, x, size_t(k) * sizeof(float)); }

void quantize_row_f16(const float* x, void* dst, int64_t k) {
    f16_t* y = static_cast<f16_t*>(dst);
    for (int64_t i = 0; i < k; ++i) y[i] = f32_to_f16(x[i]);
}

void quantize_row_bf16(const float* x, void* dst, int64_t k) {
    bf16_t* y = static_cast<bf16_t*>(dst);
    for (int64_t i = 0; i < k; ++i) y[i] = f32_to_bf16(x[i]);
}

// Float weights pair with float activations: products in float, the running sum in double (as ggml's
// ggml_vec_dot_f32 does), so a long row loses nothing to accumulation.
void vec_dot_f32_f32(int64_t n, float* s, const void* vx, const void* vy) {
    const float* x = static_cast<const float*>(vx);
    const float* y = static_cast<const float*>(vy);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += double(x[i] * y[i]);
    *s = float(sum);
}

void vec_dot_f16_f32(int64_t n, float* s, const void* vx, const void* vy) {
    const f16_t* x = static_cast<const f16_t*>(vx);
    const float* y = static_cast<const float*>(vy);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += double(f16_to_f32(x[i]) * y[i]);
    *s = float(sum);
}

void vec_dot_bf16_f32(int64_t n, float* s, const void* vx, const void* vy) {
    const bf16_t* x = static_cast<const bf16_t*>(vx);
    const float* y = static_cast<const float*>(vy);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += double(bf16_to_f32(x[i]) * y[i]);
    *s = float(sum);
}

// ---- 32-element blocks: dequantize ---------------------------------------------------------------------------
// In Q4_* and Q5_* blocks byte j holds element j in its low nibble and element j+16 in its high nibble;
// Q5_* keep the fifth bit of element j in bit j of the little-endian 32-bit qh.

void dequantize_row_q4_0(const void* src, float* y, int64_t k) {
    const block_q4_0* x = static_cast<const block_q4_0*>(src);
    for (int64_t i = 0; i < k / QK4_0; ++i, y += QK4_0) {
        const float d = f16_to_f32(x[i].d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            y[j] = d * float((x[i].qs[j] & 0x0F) - 8);
            y[j + QK4_0 / 2] = d * float((x[i].qs[j] >> 4) - 8);
        }
    }
}

void dequantize_row_q4_1(const void* src, float* y, int64_t k) {
    const block_q4_1* x = static_cast<const block_q4_1*>(src);
    for (int64_t i = 0; i < k / QK4_1; ++i, y += QK4_1) {
        const float d = f16_to_f32(x[i].d), m = f16_to_f32(x[i].m);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            y[j] = d * float(x[i].qs[j] & 0x0F) + m;
            y[j + QK4_1 / 2] = d * float(x[i].qs[j] >> 4) + m;
        }
    }
}

void dequantize_row_q5_0(const void* src, float* y, int64_t k) {
    const block_q5_0* x = static_cast<const block_q5_0*>(src);
    for (int64_t i = 0; i < k / QK5_0; ++i, y += QK5_0) {
        const float d = f16_to_f32(x[i].d);
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        for (int j = 0; j < QK5_0 / 2; ++j) {
            const int h0 = int((qh >> j) & 1) << 4;
            const int h1 = int((qh >> (j + 16)) & 1) << 4;
            y[j] = d * float(((x[i].qs[j] & 0x0F) | h0) - 16);
            y[j + QK5_0 / 2] = d * float(((x[i].qs[j] >> 4) | h1) - 16);
        }
    }
}

void dequantize_row_q5_1(const void* src, float* y, int64_t k) {
    const block_q5_1* x = static_cast<const block_q5_1*>(src);
    for (int64_t i = 0; i < k / QK5_1; ++i, y += QK5_1) {
        const float d = f16_to_f32(x[i].d), m = f16_to_f32(x[i].m);
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        for (int j = 0; j < QK5_1 / 2; ++j) {
            const int h0 = int((qh >> j) & 1) << 4;
            const int h1 = int((qh >> (j + 16)) & 1) << 4;
            y[j] = d * float((x[i].qs[j] & 0x0F) | h0) + m;
            y[j + QK5_1 / 2] = d * float((x[i].qs[j] >> 4) | h1) + m;
        }
    }
}

void dequantize_row_q8_0(const void* src, float* y, int64_t k) {
    const block_q8_0* x = static_cast<const block_q8_0*>(src);
    for (int64_t i = 0; i < k / QK8_0; ++i, y += QK8_0) {
        const float d = f16_to_f32(x[i].d);
        for (int j = 0; j < QK8_0; ++j) y[j] = d * float(x[i].qs[j]);
    }
}

// Q8_1 is an activation format; its dequantizer ignores s (s only feeds the Q4_1/Q5_1 dot products).
void dequantize_row_q8_1(const void* src, float* y, int64_t k) {
    const block_q8_1* x = static_cast<const block_q8_1*>(src);
    for (int64_t i = 0; i < k / QK8_1; ++i, y += QK8_1) {
        const float d = f16_to_f32(x[i].d);
        for (int j = 0; j < QK8_1; ++j) y[j] = d * float(x[i].qs[j]);
    }
}

// ---- 32-element blocks: quantize -----------------------------------------------------------------------------

// Symmetric 4/5-bit: the element of largest magnitude (first one on ties) maps to -2^(bits-1) exactly,
// d = max / -2^(bits-1); quants are trunc(x/d + 2^(bits-1) + 0.5) clamped to the top code.
void quantize_row_q4_0(const float* x, void* dst, int64_t k) {
    block_q4_0* y = static_cast<block_q4_0*>(dst);
    for (int64_t i = 0; i < k / QK4_0; ++i, x += QK4_0) {
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < QK4_0; ++j) {
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
        }
        const float d = max / -8.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            const int q0 = std::min(15, int(int8_t(x[j] * id + 8.5f)));
            const int q1 = std::min(15, int(int8_t(x[j + QK4_0 / 2] * id + 8.5f)));
            y[i].qs[j] = uint8_t(q0 | (q1 << 4));
        }
    }
}

void quantize_row_q5_0(const float* x, void* dst, int64_t k) {
    block_q5_0* y = static_cast<block_q5_0*>(dst);
    for (int64_t i = 0; i < k / QK5_0; ++i, x += QK5_0) {
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < QK5_0; ++j) {
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
        }
        const float d = max / -16.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        uint32_t qh = 0;
        for (int j = 0; j < QK5_0 / 2; ++j) {
            const int q0 = std::min(31, int(int8_t(x[j] * id + 16.5f)));
            const int q1 = std::min(31, int(int8_t(x[j + QK5_0 / 2] * id + 16.5f)));
            y[i].qs[j] = uint8_t((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= uint32_t(q0 >> 4) << j;
            qh |= uint32_t(q1 >> 4) << (j + QK5_0 / 2);
        }
        std::memcpy(y[i].qh, &qh, 4);
    }
}

// Asymmetric 4/5-bit: d = (max - min) / (2^bits - 1), m = min, quants trunc((x - min)/d + 0.5).
void quantize_row_q4_1(const float* x, void* dst, int64_t k) {
    block_q4_1* y = static_cast<block_q4_1*>(dst);
    for (int64_t i = 0; i < k / QK4_1; ++i, x += QK4_1) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK4_1; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 15.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        y[i].m = f32_to_f16(min);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            const int q0 = std::min(15, int(int8_t((x[j] - min) * id + 0.5f)));
            const int q1 = std::min(15, int(int8_t((x[j + QK4_1 / 2] - min) * id + 0.5f)));
            y[i].qs[j] = uint8_t(q0 | (q1 << 4));
        }
    }
}

void quantize_row_q5_1(const float* x, void* dst, int64_t k) {
    block_q5_1* y = static_cast<block_q5_1*>(dst);
    for (int64_t i = 0; i < k / QK5_1; ++i, x += QK5_1) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK5_1; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 31.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        y[i].m = f32_to_f16(min);
        uint32_t qh = 0;
        for (int j = 0; j < QK5_1 / 2; ++j) {
            const int q0 = std::min(31, int(uint8_t((x[j] - min) * id + 0.5f)));
            const int q1 = std::min(31, int(uint8_t((x[j + QK5_1 / 2] - min) * id + 0.5f)));
            y[i].qs[j] = uint8_t((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= uint32_t(q0 >> 4) << j;
            qh |= uint32_t(q1 >> 4) << (j + QK5_1 / 2);
        }
        std::memcpy(y[i].qh, &qh, 4);
    }
}

// 8-bit: d = amax / 127, quants roundf(x / d) (halves away from zero).
void quantize_row_q8_0(const float* x, void* dst, int64_t k) {
    block_q8_0* y = static_cast<block_q8_0*>(dst);
    for (int64_t i = 0; i < k / QK8_0; ++i, x += QK8_0) {
        float amax = 0.f;
        for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = int8_t(std::round(x[j] * id));
    }
}

// As Q8_0, plus s = d * sum(q) (with the float32 d, before its rounding to half) for the min terms of the
// Q4_1 / Q5_1 dot products.
void quantize_row_q8_1(const float* x, void* dst, int64_t k) {
    block_q8_1* y = static_cast<block_q8_1*>(dst);
    for (int64_t i = 0; i < k / QK8_1; ++i, x += QK8_1) {
        float amax = 0.f;
        for (int j = 0; j < QK8_1; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        const float id = inverse_or_zero(d);
        y[i].d = f32_to_f16(d);
        int sum = 0;
        for (int j = 0; j < QK8_1; ++j) {
            y[i].qs[j] = int8_t(std::round(x[j] * id));
            sum += y[i].qs[j];
        }
        y[i].s = f32_to_f16(float(sum) * d);
    }
}

// ---- 32-element blocks: dot products -------------------------------------------------------------------------
// Per block: an exact integer sum of weight quant x activation quant, then scaled by both d's in float.

void vec_dot_q4_0_q8_0(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q4_0* x = static_cast<const block_q4_0*>(vx);
    const block_q8_0* y = static_cast<const block_q8_0*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK8_0 / 2; ++j) {
            sumi += ((x[i].qs[j] & 0x0F) - 8) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + QK8_0 / 2];
        }
        sumf += float(sumi) * f16_to_f32(x[i].d) * f16_to_f32(y[i].d);
    }
    *s = sumf;
}

// sum_j (d_x q_j + m_x) d_y p_j = d_x d_y sum(q p) + m_x s_y.
void vec_dot_q4_1_q8_1(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q4_1* x = static_cast<const block_q4_1*>(vx);
    const block_q8_1* y = static_cast<const block_q8_1*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK8_1; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK8_1 / 2; ++j) {
            sumi += (x[i].qs[j] & 0x0F) * y[i].qs[j];
            sumi += (x[i].qs[j] >> 4) * y[i].qs[j + QK8_1 / 2];
        }
        sumf += (f16_to_f32(x[i].d) * f16_to_f32(y[i].d)) * float(sumi) + f16_to_f32(x[i].m) * f16_to_f32(y[i].s);
    }
    *s = sumf;
}

void vec_dot_q5_0_q8_0(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q5_0* x = static_cast<const block_q5_0*>(vx);
    const block_q8_0* y = static_cast<const block_q8_0*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK8_0 / 2; ++j) {
            const int q0 = ((x[i].qs[j] & 0x0F) | int(((qh >> j) & 1) << 4)) - 16;
            const int q1 = ((x[i].qs[j] >> 4) | int(((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + QK8_0 / 2];
        }
        sumf += (f16_to_f32(x[i].d) * f16_to_f32(y[i].d)) * float(sumi);
    }
    *s = sumf;
}

void vec_dot_q5_1_q8_1(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q5_1* x = static_cast<const block_q5_1*>(vx);
    const block_q8_1* y = static_cast<const block_q8_1*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK8_1; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK8_1 / 2; ++j) {
            const int q0 = (x[i].qs[j] & 0x0F) | int(((qh >> j) & 1) << 4);
            const int q1 = (x[i].qs[j] >> 4) | int(((qh >> (j + 16)) & 1) << 4);
            sumi += q0 * y[i].qs[j] + q1 * y[i].qs[j + QK8_1 / 2];
        }
        sumf += (f16_to_f32(x[i].d) * f16_to_f32(y[i].d)) * float(sumi) + f16_to_f32(x[i].m) * f16_to_f32(y[i].s);
    }
    *s = sumf;
}

void vec_dot_q8_0_q8_0(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q8_0* x = static_cast<const block_q8_0*>(vx);
    const block_q8_0* y = static_cast<const block_q8_0*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; ++j) sumi += x[i].qs[j] * y[i].qs[j];
        sumf += float(sumi) * (f16_to_f32(x[i].d) * f16_to_f32(y[i].d));
    }
    *s = sumf;
}

// ---- K-quants (256-element super-blocks): dequantize ---------------------------------------------------------

// Q2_K: 16 sub-blocks of 16; scales[j] = 4-bit scale | 4-bit min << 4; y = d*sc*q - dmin*m.
// qs: 128 elements per 32 bytes, element (32*c + l) of a 128-half in bits 2c..2c+1 of byte l.
void dequantize_row_q2_K(const void* src, float* y, int64_t k) {
    const block_q2_K* x = static_cast<const block_q2_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        const uint8_t* q = x[i].qs;
        int is = 0;
        for (int half = 0; half < QK_K / 128; ++half, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 2; ++part) {  // two 16-element sub-blocks per 32 bytes
                    const uint8_t sc = x[i].scales[is++];
                    const float dl = d * float(sc & 0x0F), ml = dmin * float(sc >> 4);
                    for (int l = 0; l < 16; ++l) *y++ = dl * float((q[16 * part + l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

// Q3_K: 16 sub-blocks of 16 with signed 6-bit scales; quant = 2 low bits (qs, laid out as Q2_K)
// minus 4 where the hmask bit is clear. hmask bit b of byte l covers element 32*b + l.
void dequantize_row_q3_K(const void* src, float* y, int64_t k) {
    const block_q3_K* x = static_cast<const block_q3_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d_all = f16_to_f32(x[i].d);
        int8_t scales[16];
        unpack_scales_q3_K(x[i].scales, scales);
        const uint8_t* q = x[i].qs;
        const uint8_t* hm = x[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int half = 0; half < QK_K / 128; ++half, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int part = 0; part < 2; ++part) {
                    const float dl = d_all * float(scales[is++]);
                    for (int l = 16 * part; l < 16 * part + 16; ++l) {
                        *y++ = dl * float(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                    }
                }
            }
        }
    }
}

// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins; each 32 bytes of qs hold two sub-blocks (low
// nibbles, then high nibbles). y = (d*sc)*q - dmin*m.
void dequantize_row_q4_K(const void* src, float* y, int64_t k) {
    const block_q4_K* x = static_cast<const block_q4_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        const uint8_t* q = x[i].qs;
        for (int is = 0; is < QK_K / 32; is += 2, q += 32) {
            uint8_t sc, m;
            get_scale_min_k4(is, x[i].scales, &sc, &m);
            const float d1 = d * float(sc), m1 = dmin * float(m);
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * float(sc), m2 = dmin * float(m);
            for (int l = 0; l < 32; ++l) *y++ = d1 * float(q[l] & 0x0F) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * float(q[l] >> 4) - m2;
        }
    }
}

// Q5_K: Q4_K plus a fifth bit; qh bit 2p (2p+1) of byte l is the high bit of element l of the low (high)
// nibble sub-block of the p-th 64-element pair.
void dequantize_row_q5_K(const void* src, float* y, int64_t k) {
    const block_q5_K* x = static_cast<const block_q5_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        const uint8_t* ql = x[i].qs;
        const uint8_t* qh = x[i].qh;
        uint8_t u1 = 1, u2 = 2;
        for (int is = 0; is < QK_K / 32; is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t sc, m;
            get_scale_min_k4(is, x[i].scales, &sc, &m);
            const float d1 = d * float(sc), m1 = dmin * float(m);
            get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * float(sc), m2 = dmin * float(m);
            for (int l = 0; l < 32; ++l) *y++ = d1 * float((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * float((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        }
    }
}

// Q6_K: 16 sub-blocks of 16 with int8 scales; per 128 elements, ql holds 64 bytes (elements l and l+64 in
// byte l's nibbles, l+32 and l+96 in byte l+32's) and qh 32 bytes (2 bits for each of l, l+32, l+64, l+96).
// y = (d*sc)*(q - 32).
void dequantize_row_q6_K(const void* src, float* y, int64_t k) {
    const block_q6_K* x = static_cast<const block_q6_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i) {
        const float d = f16_to_f32(x[i].d);
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * float(sc[is]) * float(q1);
                y[l + 32] = d * float(sc[is + 2]) * float(q2);
                y[l + 64] = d * float(sc[is + 4]) * float(q3);
                y[l + 96] = d * float(sc[is + 6]) * float(q4);
            }
        }
    }
}

void dequantize_row_q8_K(const void* src, float* y, int64_t k) {
    const block_q8_K* x = static_cast<const block_q8_K*>(src);
    for (int64_t i = 0; i < k / QK_K; ++i, y += QK_K) {
        for (int j = 0; j < QK_K; ++j) y[j] = x[i].d * float(x[i].qs[j]);
    }
}

// ---- K-quants: quantize ----------------------------------------------------------------------------------------

// Activation format: the element of largest magnitude maps to -127 exactly (d = max / -127, kept as a
// float), quants nearest_int(x / d); bsums[j] = sum of the 16 quants of group j, for the min terms.
void quantize_row_q8_K(const float* x, void* dst, int64_t k) {
    block_q8_K* y = static_cast<block_q8_K*>(dst);
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < QK_K; ++j) {
            const float ax = std::fabs(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.f) {
            std::memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.f / max;
        // Only a block whose max is so small (< ~4e-37) that iscale overflows reaches below -127; clamping
        // there keeps the int8 conversion defined (d is then -0 and the block dequantizes to zeros anyway).
        for (int j = 0; j < QK_K; ++j) y[i].qs[j] = int8_t(std::max(-128, std::min(127, nearest_int(iscale * x[j]))));
        for (int g = 0; g < QK_K / 16; ++g) {
            int sum = 0;
            for (int l = 0; l < 16; ++l) sum += y[i].qs[16 * g + l];
            y[i].bsums[g] = int16_t(sum);
        }
        y[i].d = 1.f / iscale;
    }
}

// Fits x[i] ~ scale * L[i] - the_min with L in [0, nmax], minimising the weighted error (squared, or
// absolute when use_mad): a first guess from min/max, then nstep+1 trial scales whose (scale, min) are
// refitted by weighted least squares. Returns scale; *the_min receives the (non-negative) min.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = float(nmax) / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = uint8_t(std::max(0, std::min(nmax, l)));
        float diff = scale * float(L[i]) + min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * float(is) + float(nmax)) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = std::max(0, std::min(nmax, l));
            Laux[i] = uint8_t(l);
            const float w = weights[i];
            sum_l += w * float(l);
            sum_l2 += w * float(l) * float(l);
            sum_xl += w * float(l) * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * float(Laux[i]) + this_min - x[i];
                diff = use_mad ? std::fabs(diff) : diff * diff;
                error += weights[i] * diff;
            }
            if (error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// Fits x[i] ~ scale * (L[i] - nmax) with L in [0, 2*nmax): starts from the largest-magnitude element at
// -nmax and tries 18 nearby scales, keeping the one with the best x^2-weighted least-squares fit
// (ggml's make_qx_quants with rmse_type 1 and no importance weights). Returns scale.
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = float(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = std::max(-nmax, std::min(nmax - 1, l));
        L[i] = int8_t(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * float(l);
        suml2 += w * float(l) * float(l);
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(float(nmax) + 0.1f * float(is)) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = std::max(-nmax, std::min(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * float(l);
            suml2 += w * float(l) * float(l);
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = int8_t(nmax + std::max(-nmax, std::min(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// Q3_K's sub-block fit: the x^2-weighted least-squares start, then up to 5 rounds of moving single
// quants while that improves the fit (ggml's make_q3_quants with do_rmse). L in [0, 2*nmax).
float make_q3_quants(int n, int nmax, const float* x, int8_t* L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    const float iscale = float(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = std::max(-nmax, std::min(nmax - 1, l));
        L[i] = int8_t(l);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * float(l);
        suml2 += w * float(l) * float(l);
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * float(L[i]);
            if (slx > 0) {
                float sl2 = suml2 - w * float(L[i]) * float(L[i]);
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = std::max(-nmax, std::min(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * float(new_l);
                    sl2 += w * float(new_l) * float(new_l);
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = int8_t(new_l);
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = int8_t(L[i] + nmax);
    return sumlx / suml2;
}

// Packs 8 six-bit (scale, min) pairs in Q4_K / Q5_K's 12-byte layout (see get_scale_min_k4).
void pack_scale_min_k4(const uint8_t ls[8], const uint8_t lm[8], uint8_t* s) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = uint8_t((ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4));
            s[j - 4] |= uint8_t((ls[j] >> 4) << 6);
            s[j] |= uint8_t((lm[j] >> 4) << 6);
        }
    }
}

// Shared by Q4_K and Q5_K: per 32-element sub-block, make_qkx2_quants with weights av_x + |x| (av_x the
// sub-block's RMS), then the 8 scales and 8 mins quantized to 6 bits against their maxima, and the
// quants recomputed against the stored (rounded) scales. L receives 256 quants in [0, nmax].
void quantize_block_qkx_K(const float* x, int nmax, float rmin, int nstep, f16_t* out_d, f16_t* out_dmin,
                          uint8_t* out_scales, uint8_t* L) {
    float weights[32], mins[QK_K / 32], scales[QK_K / 32];
    uint8_t Laux[32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
        const float* xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
        scales[j] = make_qkx2_quants(32, nmax, xs, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, false);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < QK_K / 32; ++j) {
        // Through uint8_t before the clamp, as the reference does (a negative fit wraps, then clamps to 63).
        ls[j] = std::min<uint8_t>(63, uint8_t(nearest_int(inv_scale * scales[j])));
        lm[j] = std::min<uint8_t>(63, uint8_t(nearest_int(inv_min * mins[j])));
    }
    pack_scale_min_k4(ls, lm, out_scales);
    *out_d = f32_to_f16(max_scale / 63.f);
    *out_dmin = f32_to_f16(max_min / 63.f);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t sc, m;
        get_scale_min_k4(j, out_scales, &sc, &m);
        const float d = f16_to_f32(*out_d) * float(sc);
        if (d == 0.f) continue;
        const float dm = f16_to_f32(*out_dmin) * float(m);
        for (int l = 0; l < 32; ++l) {
            const int q = nearest_int((x[32 * j + l] + dm) / d);
            L[32 * j + l] = uint8_t(std::max(0, std::min(nmax, q)));
        }
    }
}

void quantize_row_q4_K(const float* x, void* dst, int64_t k) {
    block_q4_K* y = static_cast<block_q4_K*>(dst);
    uint8_t L[QK_K];
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        quantize_block_qkx_K(x, 15, -1.f, 20, &y[i].d, &y[i].dmin, y[i].scales, L);
        uint8_t* q = y[i].qs;
        for (int j = 0; j < QK_K; j += 64, q += 32) {
            for (int l = 0; l < 32; ++l) q[l] = uint8_t(L[j + l] | (L[j + l + 32] << 4));
        }
    }
}

void quantize_row_q5_K(const float* x, void* dst, int64_t k) {
    block_q5_K* y = static_cast<block_q5_K*>(dst);
    uint8_t L[QK_K];
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        quantize_block_qkx_K(x, 31, -0.5f, 15, &y[i].d, &y[i].dmin, y[i].scales, L);
        uint8_t* ql = y[i].qs;
        uint8_t* qh = y[i].qh;
        std::memset(qh, 0, QK_K / 8);
        uint8_t m1 = 1, m2 = 2;
        for (int n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j], l2 = L[n + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = uint8_t(l1 | (l2 << 4));
            }
        }
    }
}

// Q2_K: per 16-element sub-block, make_qkx2_quants (|x| weights, absolute error) to 2 bits, then scales
// and mins to 4 bits against their maxima, then quants recomputed against the stored values.
void quantize_row_q2_K(const float* x, void* dst, int64_t k) {
    block_q2_K* y = static_cast<block_q2_K*>(dst);
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 16; ++j) {
            for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = q4scale / max_scale;
            for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = uint8_t(nearest_int(iscale * scales[j]));
            y[i].d = f32_to_f16(max_scale / q4scale);
        } else {
            for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = 0;
            y[i].d = f32_to_f16(0.f);
        }
        if (max_min > 0) {
            const float iscale = q4scale / max_min;
            for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] |= uint8_t(nearest_int(iscale * mins[j]) << 4);
            y[i].dmin = f32_to_f16(max_min / q4scale);
        } else {
            y[i].dmin = f32_to_f16(0.f);
        }
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = f16_to_f32(y[i].d) * float(y[i].scales[j] & 0x0F);
            if (d == 0.f) continue;
            const float dm = f16_to_f32(y[i].dmin) * float(y[i].scales[j] >> 4);
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int((x[16 * j + l] + dm) / d);
                L[16 * j + l] = uint8_t(std::max(0, std::min(3, q)));
            }
        }
        for (int j = 0; j < QK_K; j += 128) {
            for (int l = 0; l < 32; ++l) {
                y[i].qs[j / 4 + l] =
                    uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
            }
        }
    }
}

void quantize_row_q3_K(const float* x, void* dst, int64_t k) {
    block_q3_K* y = static_cast<block_q3_K*>(dst);
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < QK_K / 16; ++j) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            const float a = std::fabs(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        std::memset(y[i].scales, 0, 12);
        if (max_scale != 0.f) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < QK_K / 16; ++j) {
                int l = nearest_int(iscale * scales[j]);
                l = std::max(-32, std::min(31, l)) + 32;
                if (j < 8) y[i].scales[j] = uint8_t(l & 0x0F);
                else y[i].scales[j - 8] |= uint8_t((l & 0x0F) << 4);
                y[i].scales[j % 4 + 8] |= uint8_t((l >> 4) << (2 * (j / 4)));
            }
            y[i].d = f32_to_f16(1 / iscale);
        } else {
            y[i].d = f32_to_f16(0.f);
        }
        int8_t sc[16];
        unpack_scales_q3_K(y[i].scales, sc);
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = f16_to_f32(y[i].d) * float(sc[j]);
            if (d == 0.f) continue;
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = int8_t(std::max(-4, std::min(3, q)) + 4);
            }
        }
        // High bit of element 32*b + l goes to bit b of hmask[l]; the low 2 bits pack as in Q2_K.
        std::memset(y[i].hmask, 0, QK_K / 8);
        for (int j = 0; j < QK_K; ++j) {
            if (L[j] > 3) {
                y[i].hmask[j % 32] |= uint8_t(1 << (j / 32));
                L[j] = int8_t(L[j] - 4);
            }
        }
        for (int j = 0; j < QK_K; j += 128) {
            for (int l = 0; l < 32; ++l) {
                y[i].qs[j / 4 + l] =
                    uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
            }
        }
    }
}

// Q6_K: per 16-element sub-block, make_qx_quants to 6 bits signed, then the 16 scales to int8 with the
// largest-magnitude one at -128 (d = its scale / -128; the other sign clamps at 127), then the quants
// recomputed against the stored scales.
void quantize_row_q6_K(const float* x, void* dst, int64_t k) {
    block_q6_K* y = static_cast<block_q6_K*>(dst);
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < QK_K / 16; ++ib) {
            scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            const float a = std::fabs(scales[ib]);
            if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
        }
        if (max_abs_scale < kGroupMaxEps) {
            std::memset(&y[i], 0, sizeof(block_q6_K));
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = f32_to_f16(1 / iscale);
        for (int ib = 0; ib < QK_K / 16; ++ib) y[i].scales[ib] = int8_t(std::min(127, nearest_int(iscale * scales[ib])));
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = f16_to_f32(y[i].d) * float(y[i].scales[j]);
            if (d == 0.f) continue;
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = int8_t(std::max(-32, std::min(31, q)) + 32);
            }
        }
        uint8_t* ql = y[i].ql;
        uint8_t* qh = y[i].qh;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const int q1 = L[j + l], q2 = L[j + l + 32], q3 = L[j + l + 64], q4 = L[j + l + 96];
                ql[l] = uint8_t((q1 & 0x0F) | ((q3 & 0x0F) << 4));
                ql[l + 32] = uint8_t((q2 & 0x0F) | ((q4 & 0x0F) << 4));
                qh[l] = uint8_t((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
        }
    }
}

// ---- K-quants: dot products with Q8_K -------------------------------------------------------------------------
// Per super-block: integer sums (scale-weighted over sub-blocks), times d_x * d_y in float; the min terms use
// the activation's bsums: sum_j dmin*m_j*d_y*p_j = dmin*d_y * sum_g m_g * bsums_g.

void vec_dot_q2_K_q8_K(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q2_K* x = static_cast<const block_q2_K*>(vx);
    const block_q8_K* y = static_cast<const block_q8_K*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        int summs = 0;
        for (int j = 0; j < QK_K / 16; ++j) summs += y[i].bsums[j] * (x[i].scales[j] >> 4);
        const float dall = y[i].d * f16_to_f32(x[i].d);
        const float dmin = y[i].d * f16_to_f32(x[i].dmin);
        const uint8_t* q2 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        int isum = 0, is = 0;
        for (int half = 0; half < QK_K / 128; ++half, q2 += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 2; ++part, q8 += 16) {
                    int sub = 0;
                    for (int l = 0; l < 16; ++l) sub += q8[l] * ((q2[16 * part + l] >> shift) & 3);
                    isum += (x[i].scales[is++] & 0x0F) * sub;
                }
            }
        }
        sumf += dall * float(isum) - dmin * float(summs);
    }
    *s = sumf;
}

void vec_dot_q3_K_q8_K(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q3_K* x = static_cast<const block_q3_K*>(vx);
    const block_q8_K* y = static_cast<const block_q8_K*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        int8_t scales[16];
        unpack_scales_q3_K(x[i].scales, scales);
        const uint8_t* q3 = x[i].qs;
        const uint8_t* hm = x[i].hmask;
        const int8_t* q8 = y[i].qs;
        uint8_t m = 1;
        int isum = 0, is = 0;
        for (int half = 0; half < QK_K / 128; ++half, q3 += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int part = 0; part < 2; ++part, q8 += 16) {
                    int sub = 0;
                    for (int l = 16 * part; l < 16 * part + 16; ++l) {
                        const int q = ((q3[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4);
                        sub += q8[l - 16 * part] * q;
                    }
                    isum += scales[is++] * sub;
                }
            }
        }
        sumf += (f16_to_f32(x[i].d) * y[i].d) * float(isum);
    }
    *s = sumf;
}

void vec_dot_q4_K_q8_K(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q4_K* x = static_cast<const block_q4_K*>(vx);
    const block_q8_K* y = static_cast<const block_q8_K*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; ++j) get_scale_min_k4(j, x[i].scales, &sc[j], &mn[j]);
        int summs = 0;
        for (int g = 0; g < QK_K / 16; ++g) summs += y[i].bsums[g] * mn[g / 2];
        const uint8_t* q4 = x[i].qs;
        const int8_t* q8 = y[i].qs;
        int isum = 0;
        for (int j = 0; j < QK_K / 32; j += 2, q4 += 32, q8 += 64) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                lo += q8[l] * (q4[l] & 0x0F);
                hi += q8[l + 32] * (q4[l] >> 4);
            }
            isum += sc[j] * lo + sc[j + 1] * hi;
        }
        const float d = f16_to_f32(x[i].d) * y[i].d;
        const float dmin = f16_to_f32(x[i].dmin) * y[i].d;
        sumf += d * float(isum) - dmin * float(summs);
    }
    *s = sumf;
}

void vec_dot_q5_K_q8_K(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q5_K* x = static_cast<const block_q5_K*>(vx);
    const block_q8_K* y = static_cast<const block_q8_K*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; ++j) get_scale_min_k4(j, x[i].scales, &sc[j], &mn[j]);
        int summs = 0;
        for (int g = 0; g < QK_K / 16; ++g) summs += y[i].bsums[g] * mn[g / 2];
        const uint8_t* ql = x[i].qs;
        const uint8_t* qh = x[i].qh;
        const int8_t* q8 = y[i].qs;
        uint8_t u1 = 1, u2 = 2;
        int isum = 0;
        for (int j = 0; j < QK_K / 32; j += 2, ql += 32, q8 += 64, u1 <<= 2, u2 <<= 2) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                lo += q8[l] * ((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0));
                hi += q8[l + 32] * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0));
            }
            isum += sc[j] * lo + sc[j + 1] * hi;
        }
        const float d = f16_to_f32(x[i].d) * y[i].d;
        const float dmin = f16_to_f32(x[i].dmin) * y[i].d;
        sumf += d * float(isum) - dmin * float(summs);
    }
    *s = sumf;
}

void vec_dot_q6_K_q8_K(int64_t n, float* s, const void* vx, const void* vy) {
    const block_q6_K* x = static_cast<const block_q6_K*>(vx);
    const block_q8_K* y = static_cast<const block_q8_K*>(vy);
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        const int8_t* q8 = y[i].qs;
        int isum = 0;
        for (int h = 0; h < QK_K / 128; ++h, ql += 64, qh += 32, sc += 8, q8 += 128) {
            int sub[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // the 8 sixteen-element sub-blocks of this 128
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                sub[is + 0] += q1 * q8[l];
                sub[is + 2] += q2 * q8[l + 32];
                sub[is + 4] += q3 * q8[l + 64];
                sub[is + 6] += q4 * q8[l + 96];
            }
            for (int j = 0; j < 8; ++j) isum += sc[j] * sub[j];
        }
        sumf += (f16_to_f32(x[i].d) * y[i].d) * float(isum);
    }
    *s = sumf;
}

// ---- table -----------------------------------------------------------------------------------------------------

void set(KernelTable& t, Type id, const char* name, int64_t block_size, size_t type_size, bool is_quantized,
         Type vec_dot_type, dequantize_fn deq, quantize_fn quant, vec_dot_fn dot) {
    TypeTraits& e = t[int(id)];
    e.name = name;
    e.block_size = block_size;
    e.type_size = type_size;
    e.is_quantized = is_quantized;
    e.vec_dot_type = vec_dot_type;
    e.dequantize = deq;
    e.quantize = quant;
    e.vec_dot = dot;
}

}  // namespace

void fill_kernels_scalar(KernelTable& t) {
    for (int i = 0; i < kNumTypeIds; ++i) t[i] = TypeTraits{};
    set(t, Type::F32, "F32", 1, sizeof(float), false, Type::F32, dequantize_row_f32, quantize_row_f32, vec_dot_f32_f32);
    set(t, Type::F16, "F16", 1, sizeof(f16_t), false, Type::F32, dequantize_row_f16, quantize_row_f16, vec_dot_f16_f32);
    set(t, Type::BF16, "BF16", 1, sizeof(bf16_t), false, Type::F32, dequantize_row_bf16, quantize_row_bf16,
        vec_dot_bf16_f32);
    set(t, Type::Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0), true, Type::Q8_0, dequantize_row_q4_0, quantize_row_q4_0,
        vec_dot_q4_0_q8_0);
    set(t, Type::Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1), true, Type::Q8_1, dequantize_row_q4_1, quantize_row_q4_1,
        vec_dot_q4_1_q8_1);
    set(t, Type::Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0), true, Type::Q8_0, dequantize_row_q5_0, quantize_row_q5_0,
        vec_dot_q5_0_q8_0);
    set(t, Type::Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1), true, Type::Q8_1, dequantize_row_q5_1, quantize_row_q5_1,
        vec_dot_q5_1_q8_1);
    set(t, Type::Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0), true, Type::Q8_0, dequantize_row_q8_0, quantize_row_q8_0,
        vec_dot_q8_0_q8_0);
    set(t, Type::Q8_1, "Q8_1", QK8_1, sizeof(block_q8_1), true, Type::Q8_1, dequantize_row_q8_1, quantize_row_q8_1,
        nullptr);
    set(t, Type::Q2_K, "Q2_K", QK_K, sizeof(block_q2_K), true, Type::Q8_K, dequantize_row_q2_K, quantize_row_q2_K,
        vec_dot_q2_K_q8_K);
    set(t, Type::Q3_K, "Q3_K", QK_K, sizeof(block_q3_K), true, Type::Q8_K, dequantize_row_q3_K, quantize_row_q3_K,
        vec_dot_q3_K_q8_K);
    set(t, Type::Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), true, Type::Q8_K, dequantize_row_q4_K, quantize_row_q4_K,
        vec_dot_q4_K_q8_K);
    set(t, Type::Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), true, Type::Q8_K, dequantize_row_q5_K, quantize_row_q5_K,
        vec_dot_q5_K_q8_K);
    set(t, Type::Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), true, Type::Q8_K, dequantize_row_q6_K, quantize_row_q6_K,
        vec_dot_q6_K_q8_K);
    set(t, Type::Q8_K, "Q8_K", QK_K, sizeof(block_q8_K), true, Type::Q8_K, dequantize_row_q8_K, quantize_row_q8_K,
        nullptr);
}

}  // namespace rz
