// GGUF block formats and the kernel contract shared by every ISA level.
//
// Block structs are byte-identical to GGUF's (the file's bytes are used in place); every kernel comes in a
// scalar reference (kernels_scalar.cpp) and optional AVX2 / AVX-512 versions with the same signature.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace rz {

// GGML type ids as stored in GGUF tensor infos.
enum class Type : int32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
constexpr int kNumTypeIds = 31;

using f16_t = uint16_t;   // IEEE half, stored bits
using bf16_t = uint16_t;  // bfloat16, stored bits

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK8_1 = 32;
constexpr int QK_K = 256;
constexpr int K_SCALE_SIZE = 12;

struct block_q4_0 { f16_t d; uint8_t qs[QK4_0 / 2]; };
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
struct block_q4_1 { f16_t d; f16_t m; uint8_t qs[QK4_1 / 2]; };
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");
struct block_q5_0 { f16_t d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
struct block_q5_1 { f16_t d; f16_t m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; };
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");
struct block_q8_0 { f16_t d; int8_t qs[QK8_0]; };
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
struct block_q8_1 { f16_t d; f16_t s; int8_t qs[QK8_1]; };  // s = d * sum(qs)
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 size");

struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; f16_t d; f16_t dmin; };
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");
struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; f16_t d; };
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
struct block_q4_K { f16_t d; f16_t dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
struct block_q5_K { f16_t d; f16_t dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; f16_t d; };
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
struct block_q8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };
static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");

// Q4_K / Q5_K pack 8 (scale, min) pairs of 6 bits into 12 bytes:
//   bytes 0-3: low 6 bits = scale j (j < 4),   top 2 bits = bits 4-5 of scale j+4
//   bytes 4-7: low 6 bits = min j   (j < 4),   top 2 bits = bits 4-5 of min j+4
//   bytes 8-11: low nibble = bits 0-3 of scale j+4, high nibble = bits 0-3 of min j+4
static inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = uint8_t((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
        *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// ---- half / bfloat16 conversions (exact, round-to-nearest-even) -------------------------------------------
// static: internal linkage, so a copy compiled with AVX-512 flags can never be picked for scalar callers.
static inline float f16_to_f32(f16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) { bits = sign; }
        else {  // subnormal: normalise
            int e = -1;
            do { mant <<= 1; ++e; } while (!(mant & 0x400));
            bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f; std::memcpy(&f, &bits, 4); return f;
}
static inline f16_t f32_to_f16(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return f16_t(sign | 0x7e00 | ((ax & 0x7fffff) >> 13));  // nan: quiet, keep payload top
    if (ax == 0x7f800000u) return f16_t(sign | 0x7c00);                              // inf
    if (ax >= 0x477ff000u) return f16_t(sign | 0x7c00);                                   // overflow -> inf
    if (ax < 0x38800000u) {                                                               // subnormal or zero
        if (ax < 0x33000000u) return f16_t(sign);
        const uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e;  // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        return f16_t(sign | r);
    }
    uint32_t r = ((ax >> 13) - ((127 - 15) << 10));
    const uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
    return f16_t(sign | r);
}
static inline float bf16_to_f32(bf16_t h) { uint32_t b = uint32_t(h) << 16; float f; std::memcpy(&f, &b, 4); return f; }
static inline bf16_t f32_to_bf16(float f) {
    uint32_t x; std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return bf16_t((x >> 16) | 64);  // quiet nan, as ggml does
    return bf16_t((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

// ---- kernel contract -----------------------------------------------------------------------------------
// k and n count elements and are multiples of the type's block size.
using dequantize_fn = void (*)(const void* src, float* dst, int64_t k);
using quantize_fn = void (*)(const float* src, void* dst, int64_t k);
// s = dot(x, y) over n elements, x in a weight type, y in that type's vec_dot_type.
using vec_dot_fn = void (*)(int64_t n, float* s, const void* x, const void* y);

struct TypeTraits {
    const char* name = nullptr;       // 'Q4_K', nullptr for ids that are not a supported type
    int64_t block_size = 0;           // elements per block
    size_t type_size = 0;             // bytes per block
    bool is_quantized = false;
    Type vec_dot_type = Type::F32;    // activation format this weight type's dot product pairs with
    dequantize_fn dequantize = nullptr;
    quantize_fn quantize = nullptr;   // nullptr where no quantizer exists for the type
    vec_dot_fn vec_dot = nullptr;     // nullptr for pure activation formats
};

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kNumIsa = 3;

using KernelTable = TypeTraits[kNumTypeIds];

// Each ISA translation unit overrides the entries it accelerates; the scalar one fills every entry.
void fill_kernels_scalar(KernelTable& t);
void fill_kernels_avx2(KernelTable& t);
void fill_kernels_avx512(KernelTable& t);

}  // namespace rz
