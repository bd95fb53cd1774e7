// Shared by the CUDA translation units: error checks, small device helpers, and the per-type block traits
// that read GGUF blocks (cpp/quants.h structs, byte for byte) in registers.
//
// Every function of the block traits is __host__ __device__: the host copies are what the `_cuda` module's
// CPU self-tests run (tests/test_cuda.py, no GPU needed), so the bit layouts are checked on every CI run.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "api.h"
#include "quants.h"

namespace rz::cu {

void throw_cuda(cudaError_t e, const char* what, const char* file, int line);  // throws CudaError
#define RZ_CUDA_CHECK(expr)                                                                    \
    do {                                                                                       \
        cudaError_t rz_e_ = (expr);                                                            \
        if (rz_e_ != cudaSuccess) ::rz::cu::throw_cuda(rz_e_, #expr, __FILE__, __LINE__);      \
    } while (0)
#define RZ_CUDA_LAUNCHED(what) RZ_CUDA_CHECK(cudaGetLastError())

#define RZ_HD __host__ __device__ __forceinline__

// ---- portable intrinsics (device intrinsic on the GPU, plain C++ in the host self-test) ---------------------
RZ_HD float h2f(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    return rz::f16_to_f32(h);
#endif
}
RZ_HD float bf2f(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(uint32_t(h) << 16);
#else
    return rz::bf16_to_f32(h);
#endif
}
// Round a float to half precision and back (the precision of Q and of the K/V cache).
RZ_HD float round_f16(float x) {
#ifdef __CUDA_ARCH__
    return __half2float(__float2half_rn(x));
#else
    return rz::f16_to_f32(rz::f32_to_f16(x));
#endif
}
RZ_HD int dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a(a, b, c);
#else
    for (int i = 0; i < 4; ++i) c += int(int8_t(uint32_t(a) >> (8 * i))) * int(int8_t(uint32_t(b) >> (8 * i)));
    return c;
#endif
}
// Per-byte a - b, wrapping (the results used fit in int8).
RZ_HD uint32_t vsub4(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    return __vsub4(a, b);
#else
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFF) << (8 * i);
    return r;
#endif
}
// Loads at their natural alignment on the GPU; memcpy in the host self-test (numpy buffers, any alignment).
#ifdef __CUDA_ARCH__
RZ_HD uint16_t ld16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
RZ_HD uint32_t ld32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
RZ_HD int ldi32(const int8_t* p) { return *reinterpret_cast<const int*>(p); }
// 16 bytes at a 16-aligned address.
RZ_HD void ld128(const uint8_t* p, uint32_t* w) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
// 16 (8) activation bytes at a 16- (8-) aligned address as four (two) int words.
RZ_HD void lda128(const int8_t* p, int* w) {
    const int4 v = *reinterpret_cast<const int4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
RZ_HD void lda64(const int8_t* p, int* w) {
    const int2 v = *reinterpret_cast<const int2*>(p);
    w[0] = v.x; w[1] = v.y;
}
// 8 floats at a 32-aligned address.
RZ_HD void ldf256(const float* p, float* x) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
#else
inline void ldf256(const float* p, float* x) { std::memcpy(x, p, 32); }
inline void lda128(const int8_t* p, int* w) { std::memcpy(w, p, 16); }
inline void lda64(const int8_t* p, int* w) { std::memcpy(w, p, 8); }
inline uint16_t ld16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t ld32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline int ldi32(const int8_t* p) { int v; std::memcpy(&v, p, 4); return v; }
inline void ld128(const uint8_t* p, uint32_t* w) { std::memcpy(w, p, 16); }
#endif
// Four bytes at a 2-aligned address.
RZ_HD uint32_t ld16x2(const uint8_t* p) { return uint32_t(ld16(p)) | uint32_t(ld16(p + 2)) << 16; }
// Byte i of 16 bytes held as four little-endian words. dequant16() loads its 16 quant bytes as words (at the
// widest alignment the block allows) rather than byte by byte: a tile's weight fetch is then 4-8 loads, not 16+.
RZ_HD int byte_of(const uint32_t* w, int i) { return int((w[i >> 2] >> (8 * (i & 3))) & 0xFF); }
RZ_HD void ld16x2x4(const uint8_t* p, uint32_t* w) {
    for (int i = 0; i < 4; ++i) w[i] = ld16x2(p + 4 * i);
}
RZ_HD void ld32x4(const uint8_t* p, uint32_t* w) {
    for (int i = 0; i < 4; ++i) w[i] = ld32(p + 4 * i);
}
// a * b + c rounded twice, as the CPU dequantizers compute it (no fused multiply-add), so the device's
// dequantized values equal the CPU's bit for bit.
RZ_HD float mul_add_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(__fmul_rn(a, b), c);
#else
    return a * b + c;
#endif
}
RZ_HD float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Byte k (0..11) of three little-endian words.
RZ_HD uint32_t byte_of3(uint32_t w0, uint32_t w1, uint32_t w2, int k) {
    const uint32_t w = k < 4 ? w0 : (k < 8 ? w1 : w2);
    return (w >> (8 * (k & 3))) & 0xFF;
}
// Q4_K / Q5_K: 6-bit scale and min of sub-block j from the 12 packed bytes (see kernels_scalar.cpp).
RZ_HD void scale_min_k4(uint32_t w0, uint32_t w1, uint32_t w2, int j, int& sc, int& m) {
    if (j < 4) {
        sc = int(byte_of3(w0, w1, w2, j) & 63);
        m = int(byte_of3(w0, w1, w2, j + 4) & 63);
    } else {
        sc = int((byte_of3(w0, w1, w2, j + 4) & 0x0F) | ((byte_of3(w0, w1, w2, j - 4) >> 6) << 4));
        m = int((byte_of3(w0, w1, w2, j + 4) >> 4) | ((byte_of3(w0, w1, w2, j) >> 6) << 4));
    }
}
// Bits 0..3 of x to bit 4 of bytes 0..3 (the fifth bit of four Q5_0/Q5_1 quants).
RZ_HD uint32_t spread4(uint32_t x) {
    return ((x & 1) | ((x & 2) << 7) | ((x & 4) << 14) | ((x & 8) << 21)) << 4;
}

// ---- activations -----------------------------------------------------------------------------------------
// The quantized products take activations as int8 q (row stride K) and, per 32-group, float2 (d, s) with
// s = d * sum(q) of the group. q and d are exactly the CPU core's activation blocks for the weight type
// (its vec_dot_type), so a GPU dot product's integer sums equal the CPU's:
//   Q8_0 (Q4_0, Q5_0, Q8_0 weights): per 32, d = amax / 127 kept as half, q = round(x / d) (f32 d)
//   Q8_1 (Q4_1, Q5_1):               Q8_0, and s = half(sum(q) * d) (f32 d)
//   Q8_K (Q4_K, Q5_K, Q6_K):         per 256, the element of largest |x| (first on ties) maps to -127:
//                                     iscale = -127 / max, q = nearest-even(iscale * x), d = 1 / iscale (f32)
// F16 / BF16 weights take the float activations instead.
enum ActFmt : int { kActF32 = -1, kActQ8_0 = 0, kActQ8_1 = 1, kActQ8_K = 2 };

inline ActFmt act_format(Type t) {
    switch (t) {
        case Type::Q4_0: case Type::Q5_0: case Type::Q8_0: return kActQ8_0;
        case Type::Q4_1: case Type::Q5_1: return kActQ8_1;
        case Type::Q4_K: case Type::Q5_K: case Type::Q6_K: return kActQ8_K;
        default: return kActF32;
    }
}

struct Act {
    const int8_t* q;    // this block's first element
    const float2* ds;   // this block's first 32-group
    const float* f;     // float activations at this block's first element (F16/BF16 weights)
};

// ---- block traits -----------------------------------------------------------------------------------------
// For each weight type:
//   QK, BYTES   elements and bytes of one block (F16/BF16: pseudo-blocks of 32 elements)
//   UPB         lane units per block; a unit is the work of one lane (16 or 32 elements)
//   W           a unit's weights in registers; fetch() loads and unpacks them
//   dot()       the unit's dot product with one activation row (int8 and dp4a, or float for F16/BF16)
//   dequant16() elements [16 e, 16 e + 16) of a block as floats (prefill tiles, embedding rows)
template <int T> struct BT;

template <> struct BT<int(Type::Q4_0)> {
    static constexpr int QK = 32, BYTES = 18, UPB = 1;
    struct W { uint32_t q[4]; float d; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int) {
        w.d = h2f(ld16(b));
        for (int i = 0; i < 4; ++i) w.q[i] = ld16x2(b + 2 + 4 * i);
    }
    static RZ_HD float dot(const W& w, int, const Act& a) {
        int lo[4], hi[4], s = 0;
        lda128(a.q, lo);
        lda128(a.q + 16, hi);
        for (int i = 0; i < 4; ++i) {
            s = dp4a(int(w.q[i] & 0x0F0F0F0F), lo[i], s);
            s = dp4a(int((w.q[i] >> 4) & 0x0F0F0F0F), hi[i], s);
        }
        const float2 ds = a.ds[0];
        return w.d * (ds.x * float(s) - 8.0f * ds.y);
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const float d = h2f(ld16(b));
        uint32_t qw[4];
        ld16x2x4(b + 2, qw);
        for (int i = 0; i < 16; ++i) {
            const int q = e ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F;
            out[i] = d * float(q - 8);
        }
    }
};

template <> struct BT<int(Type::Q4_1)> {
    static constexpr int QK = 32, BYTES = 20, UPB = 1;
    struct W { uint32_t q[4]; float d, m; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int) {
        const uint32_t dm = ld32(b);
        w.d = h2f(uint16_t(dm & 0xFFFF));
        w.m = h2f(uint16_t(dm >> 16));
        for (int i = 0; i < 4; ++i) w.q[i] = ld32(b + 4 + 4 * i);
    }
    static RZ_HD float dot(const W& w, int, const Act& a) {
        int lo[4], hi[4], s = 0;
        lda128(a.q, lo);
        lda128(a.q + 16, hi);
        for (int i = 0; i < 4; ++i) {
            s = dp4a(int(w.q[i] & 0x0F0F0F0F), lo[i], s);
            s = dp4a(int((w.q[i] >> 4) & 0x0F0F0F0F), hi[i], s);
        }
        const float2 ds = a.ds[0];
        return w.d * ds.x * float(s) + w.m * ds.y;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const uint32_t dm = ld32(b);
        const float d = h2f(uint16_t(dm & 0xFFFF)), m = h2f(uint16_t(dm >> 16));
        uint32_t qw[4];
        ld32x4(b + 4, qw);
        for (int i = 0; i < 16; ++i) {
            const int q = e ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F;
            out[i] = mul_add_rn(d, float(q), m);
        }
    }
};

template <> struct BT<int(Type::Q5_0)> {
    static constexpr int QK = 32, BYTES = 22, UPB = 1;
    struct W { uint32_t q[4]; uint32_t qh; float d; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int) {
        w.d = h2f(ld16(b));
        w.qh = ld16x2(b + 2);
        for (int i = 0; i < 4; ++i) w.q[i] = ld16x2(b + 6 + 4 * i);
    }
    static RZ_HD float dot(const W& w, int, const Act& a) {
        int xl[4], xh[4], s = 0;
        lda128(a.q, xl);
        lda128(a.q + 16, xh);
        for (int i = 0; i < 4; ++i) {
            const uint32_t lo = (w.q[i] & 0x0F0F0F0F) | spread4(w.qh >> (4 * i));
            const uint32_t hi = ((w.q[i] >> 4) & 0x0F0F0F0F) | spread4(w.qh >> (16 + 4 * i));
            s = dp4a(int(lo), xl[i], s);
            s = dp4a(int(hi), xh[i], s);
        }
        const float2 ds = a.ds[0];
        return w.d * (ds.x * float(s) - 16.0f * ds.y);
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const float d = h2f(ld16(b));
        const uint32_t qh = ld16x2(b + 2);
        uint32_t qw[4];
        ld16x2x4(b + 6, qw);
        for (int i = 0; i < 16; ++i) {
            const int q = (e ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F) | int((qh >> (16 * e + i)) & 1) << 4;
            out[i] = d * float(q - 16);
        }
    }
};

template <> struct BT<int(Type::Q5_1)> {
    static constexpr int QK = 32, BYTES = 24, UPB = 1;
    struct W { uint32_t q[4]; uint32_t qh; float d, m; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int) {
        const uint32_t dm = ld32(b);
        w.d = h2f(uint16_t(dm & 0xFFFF));
        w.m = h2f(uint16_t(dm >> 16));
        w.qh = ld32(b + 4);
        for (int i = 0; i < 4; ++i) w.q[i] = ld32(b + 8 + 4 * i);
    }
    static RZ_HD float dot(const W& w, int, const Act& a) {
        int xl[4], xh[4], s = 0;
        lda128(a.q, xl);
        lda128(a.q + 16, xh);
        for (int i = 0; i < 4; ++i) {
            const uint32_t lo = (w.q[i] & 0x0F0F0F0F) | spread4(w.qh >> (4 * i));
            const uint32_t hi = ((w.q[i] >> 4) & 0x0F0F0F0F) | spread4(w.qh >> (16 + 4 * i));
            s = dp4a(int(lo), xl[i], s);
            s = dp4a(int(hi), xh[i], s);
        }
        const float2 ds = a.ds[0];
        return w.d * ds.x * float(s) + w.m * ds.y;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const uint32_t dm = ld32(b), qh = ld32(b + 4);
        const float d = h2f(uint16_t(dm & 0xFFFF)), m = h2f(uint16_t(dm >> 16));
        uint32_t qw[4];
        ld32x4(b + 8, qw);
        for (int i = 0; i < 16; ++i) {
            const int q = (e ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F) | int((qh >> (16 * e + i)) & 1) << 4;
            out[i] = mul_add_rn(d, float(q), m);
        }
    }
};

template <> struct BT<int(Type::Q8_0)> {
    static constexpr int QK = 32, BYTES = 34, UPB = 2;  // unit h: elements [16h, 16h + 16)
    struct W { uint32_t q[4]; float d; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int h) {
        w.d = h2f(ld16(b));
        for (int i = 0; i < 4; ++i) w.q[i] = ld16x2(b + 2 + 16 * h + 4 * i);
    }
    static RZ_HD float dot(const W& w, int h, const Act& a) {
        int x[4], s = 0;
        lda128(a.q + 16 * h, x);
        for (int i = 0; i < 4; ++i) s = dp4a(int(w.q[i]), x[i], s);
        return w.d * a.ds[0].x * float(s);
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const float d = h2f(ld16(b));
        uint32_t qw[4];
        ld16x2x4(b + 2 + 16 * e, qw);
        for (int i = 0; i < 16; ++i) out[i] = d * float(int8_t(byte_of(qw, i)));
    }
};

// Q4_K: unit u = 2p + h covers qs bytes [32p + 16h, +16): their low nibbles are elements 64p + 16h + i of
// sub-block 2p, their high nibbles elements 64p + 32 + 16h + i of sub-block 2p + 1. The h = 0 unit adds both
// sub-blocks' min terms.
template <> struct BT<int(Type::Q4_K)> {
    static constexpr int QK = 256, BYTES = 144, UPB = 8;
    struct W { uint32_t q[4]; float d0, d1, m0, m1; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int u) {
        const int p = u >> 1, h = u & 1;
        uint32_t hd[4];
        ld128(b, hd);
        ld128(b + 16 + 32 * p + 16 * h, w.q);
        const uint32_t h0 = hd[0], s0 = hd[1], s1 = hd[2], s2 = hd[3];
        const float d = h2f(uint16_t(h0 & 0xFFFF)), dmin = h2f(uint16_t(h0 >> 16));
        int sc, m;
        scale_min_k4(s0, s1, s2, 2 * p, sc, m);
        w.d0 = d * float(sc);
        w.m0 = dmin * float(m);
        scale_min_k4(s0, s1, s2, 2 * p + 1, sc, m);
        w.d1 = d * float(sc);
        w.m1 = dmin * float(m);
    }
    static RZ_HD float dot(const W& w, int u, const Act& a) {
        const int p = u >> 1, h = u & 1;
        int xl[4], xh[4], s0 = 0, s1 = 0;
        lda128(a.q + 64 * p + 16 * h, xl);
        lda128(a.q + 64 * p + 32 + 16 * h, xh);
        for (int i = 0; i < 4; ++i) {
            s0 = dp4a(int(w.q[i] & 0x0F0F0F0F), xl[i], s0);
            s1 = dp4a(int((w.q[i] >> 4) & 0x0F0F0F0F), xh[i], s1);
        }
        const float2 a0 = a.ds[2 * p], a1 = a.ds[2 * p + 1];
        float r = w.d0 * a0.x * float(s0) + w.d1 * a1.x * float(s1);
        if (h == 0) r -= w.m0 * a0.y + w.m1 * a1.y;
        return r;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const int sb = e >> 1, half = e & 1, p = sb >> 1;  // sub-block of 32, which 16 of it, its pair
        int sc, m;
        scale_min_k4(ld32(b + 4), ld32(b + 8), ld32(b + 12), sb, sc, m);
        const uint32_t dm = ld32(b);
        const float d = h2f(uint16_t(dm & 0xFFFF)) * float(sc), mn = h2f(uint16_t(dm >> 16)) * float(m);
        uint32_t qw[4];
        ld128(b + 16 + 32 * p + 16 * half, qw);
        for (int i = 0; i < 16; ++i)
            out[i] = mul_add_rn(d, float((sb & 1) ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F), -mn);
    }
};

// Q5_K: Q4_K's units plus the fifth bits: qh byte l bit 2p (2p + 1) for element l of sub-block 2p (2p + 1).
template <> struct BT<int(Type::Q5_K)> {
    static constexpr int QK = 256, BYTES = 176, UPB = 8;
    struct W { uint32_t q[4]; uint32_t qh[4]; float d0, d1, m0, m1; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int u) {
        const int p = u >> 1, h = u & 1;
        uint32_t hd[4];
        ld128(b, hd);
        ld128(b + 48 + 32 * p + 16 * h, w.q);
        ld128(b + 16 + 16 * h, w.qh);
        const uint32_t h0 = hd[0], s0 = hd[1], s1 = hd[2], s2 = hd[3];
        const float d = h2f(uint16_t(h0 & 0xFFFF)), dmin = h2f(uint16_t(h0 >> 16));
        int sc, m;
        scale_min_k4(s0, s1, s2, 2 * p, sc, m);
        w.d0 = d * float(sc);
        w.m0 = dmin * float(m);
        scale_min_k4(s0, s1, s2, 2 * p + 1, sc, m);
        w.d1 = d * float(sc);
        w.m1 = dmin * float(m);
    }
    static RZ_HD float dot(const W& w, int u, const Act& a) {
        const int p = u >> 1, h = u & 1;
        int xl[4], xh[4], s0 = 0, s1 = 0;
        lda128(a.q + 64 * p + 16 * h, xl);
        lda128(a.q + 64 * p + 32 + 16 * h, xh);
        for (int i = 0; i < 4; ++i) {
            const uint32_t ql = (w.q[i] & 0x0F0F0F0F) | (((w.qh[i] >> (2 * p)) & 0x01010101) << 4);
            const uint32_t qh = ((w.q[i] >> 4) & 0x0F0F0F0F) | (((w.qh[i] >> (2 * p + 1)) & 0x01010101) << 4);
            s0 = dp4a(int(ql), xl[i], s0);
            s1 = dp4a(int(qh), xh[i], s1);
        }
        const float2 a0 = a.ds[2 * p], a1 = a.ds[2 * p + 1];
        float r = w.d0 * a0.x * float(s0) + w.d1 * a1.x * float(s1);
        if (h == 0) r -= w.m0 * a0.y + w.m1 * a1.y;
        return r;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const int sb = e >> 1, half = e & 1, p = sb >> 1;
        int sc, m;
        scale_min_k4(ld32(b + 4), ld32(b + 8), ld32(b + 12), sb, sc, m);
        const uint32_t dm = ld32(b);
        const float d = h2f(uint16_t(dm & 0xFFFF)) * float(sc), mn = h2f(uint16_t(dm >> 16)) * float(m);
        uint32_t qw[4], hw[4];
        ld128(b + 48 + 32 * p + 16 * half, qw);
        ld128(b + 16 + 16 * half, hw);
        for (int i = 0; i < 16; ++i) {
            const int v = ((sb & 1) ? byte_of(qw, i) >> 4 : byte_of(qw, i) & 0x0F) | (((byte_of(hw, i) >> sb) & 1) << 4);
            out[i] = mul_add_rn(d, float(v), -mn);
        }
    }
};

// Q6_K: per 128-element half n, byte l < 32 of ql/qh gives elements l, l+32, l+64, l+96 (scale index
// l/16 + 0, 2, 4, 6). Unit u = 4n + j covers l in [8j, 8j + 8) of half n: 32 elements, 4 groups of 8.
template <> struct BT<int(Type::Q6_K)> {
    static constexpr int QK = 256, BYTES = 210, UPB = 8;
    struct W { uint32_t ql0[2], ql1[2], qh[2]; float d[4]; };
    static RZ_HD void fetch(W& w, const uint8_t* b, int u) {
        const int n = u >> 2, j = u & 3;
        const uint8_t* ql = b + 64 * n + 8 * j;
        const uint8_t* qh = b + 128 + 32 * n + 8 * j;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * n + (j >> 1));
        for (int k = 0; k < 2; ++k) {
            w.ql0[k] = ld16x2(ql + 4 * k);
            w.ql1[k] = ld16x2(ql + 32 + 4 * k);
            w.qh[k] = ld16x2(qh + 4 * k);
        }
        const float d = h2f(ld16(b + 208));
        for (int g = 0; g < 4; ++g) w.d[g] = d * float(sc[2 * g]);
    }
    static RZ_HD float dot(const W& w, int u, const Act& a) {
        const int n = u >> 2, j = u & 3;
        const int8_t* x = a.q + 128 * n + 8 * j;
        int x0[2], x1[2], x2[2], x3[2];
        lda64(x, x0);
        lda64(x + 32, x1);
        lda64(x + 64, x2);
        lda64(x + 96, x3);
        int s[4] = {0, 0, 0, 0};
        for (int k = 0; k < 2; ++k) {
            const uint32_t e0 = (w.ql0[k] & 0x0F0F0F0F) | ((w.qh[k] & 0x03030303) << 4);
            const uint32_t e1 = (w.ql1[k] & 0x0F0F0F0F) | (((w.qh[k] >> 2) & 0x03030303) << 4);
            const uint32_t e2 = ((w.ql0[k] >> 4) & 0x0F0F0F0F) | (((w.qh[k] >> 4) & 0x03030303) << 4);
            const uint32_t e3 = ((w.ql1[k] >> 4) & 0x0F0F0F0F) | (((w.qh[k] >> 6) & 0x03030303) << 4);
            s[0] = dp4a(int(vsub4(e0, 0x20202020)), x0[k], s[0]);
            s[1] = dp4a(int(vsub4(e1, 0x20202020)), x1[k], s[1]);
            s[2] = dp4a(int(vsub4(e2, 0x20202020)), x2[k], s[2]);
            s[3] = dp4a(int(vsub4(e3, 0x20202020)), x3[k], s[3]);
        }
        float r = 0.f;
        for (int g = 0; g < 4; ++g) r += w.d[g] * a.ds[4 * n + g].x * float(s[g]);
        return r;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        const int E = 16 * e, n = E >> 7, r = E & 127, g = r >> 5, l0 = r & 31;
        const uint8_t* ql = b + 64 * n + (g & 1) * 32 + l0;
        const uint8_t* qh = b + 128 + 32 * n + l0;
        const int8_t sc = reinterpret_cast<const int8_t*>(b + 192)[8 * n + (l0 >> 4) + 2 * g];
        const float d = h2f(ld16(b + 208)) * float(sc);
        uint32_t lw[4], hw[4];
        ld16x2x4(ql, lw);
        ld16x2x4(qh, hw);
        for (int i = 0; i < 16; ++i) {
            const int lo = g >= 2 ? byte_of(lw, i) >> 4 : byte_of(lw, i) & 0x0F;
            const int q = lo | (((byte_of(hw, i) >> (2 * g)) & 3) << 4);
            out[i] = d * float(q - 32);
        }
    }
};

// Float weights: pseudo-blocks of 32 elements, 4 units of 8; the activations stay float (rounded to half,
// the precision the tensor-core path multiplies with, so both paths compute the same products).
template <int T, bool BF> struct BTFloat {
    static constexpr int QK = 32, BYTES = 64, UPB = 4;
    struct W { uint32_t h[4]; };
    static RZ_HD float cvt(uint32_t bits16) { return BF ? bf2f(uint16_t(bits16)) : h2f(uint16_t(bits16)); }
    static RZ_HD void fetch(W& w, const uint8_t* b, int u) { ld128(b + 16 * u, w.h); }
    static RZ_HD float dot(const W& w, int u, const Act& a) {
        float x[8];
        ldf256(a.f + 8 * u, x);
        float r = 0.f;
        for (int i = 0; i < 4; ++i) {
            r += cvt(w.h[i] & 0xFFFF) * round_f16(x[2 * i]);
            r += cvt(w.h[i] >> 16) * round_f16(x[2 * i + 1]);
        }
        return r;
    }
    static RZ_HD void dequant16(const uint8_t* b, int e, float* out) {
        uint32_t hw[8];
        ld128(b + 32 * e, hw);
        ld128(b + 32 * e + 16, hw + 4);
        for (int i = 0; i < 8; ++i) {
            out[2 * i] = cvt(hw[i] & 0xFFFF);
            out[2 * i + 1] = cvt(hw[i] >> 16);
        }
    }
};
template <> struct BT<int(Type::F16)> : BTFloat<int(Type::F16), false> {};
template <> struct BT<int(Type::BF16)> : BTFloat<int(Type::BF16), true> {};

// The weight types with CUDA kernels, for switch statements: RZ_CUDA_TYPES(CASE) with CASE(Q4_0) etc.
#define RZ_CUDA_TYPES(X) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0) X(Q4_K) X(Q5_K) X(Q6_K) X(F16) X(BF16)

// ---- device-only helpers ----------------------------------------------------------------------------------
#ifdef __CUDACC__
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Programmatic dependent launch (sm_90): a kernel may be scheduled while its predecessor still runs.
// pdl_wait() blocks until the predecessor has completed and its memory is visible, then lets the next kernel
// be scheduled. Every kernel calls it before its first global memory access, so no two kernels' memory
// accesses ever overlap (and completion is transitive down the stream); what overlaps is launch latency and
// block scheduling. No-ops below sm_90 and for launches without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// One 32-group in Q8_0 or Q8_1, lanes [base, base + GL) holding DPL consecutive values each (GL * DPL = 32):
// writes the lane's quants to q[0..DPL) and, from the group's first lane, its (d, s) to *ds.
template <int DPL>
__device__ __forceinline__ void quant32(const float* v, int lane, int fmt, int8_t* q, float2* ds) {
    constexpr int GL = 32 / DPL;
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int off = GL / 2; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    id = isfinite(id) ? id : 0.0f;
    int sum = 0;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        const int qi = int(roundf(v[i] * id));
        q[i] = int8_t(qi);
        sum += qi;
    }
#pragma unroll
    for (int off = GL / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane % GL == 0) {
        const float dh = round_f16(d);
        *ds = make_float2(dh, fmt == kActQ8_1 ? round_f16(float(sum) * d) : dh * float(sum));
    }
}

// One 256-group in Q8_K by a whole block of 256 threads, thread i holding element i (every thread calls it).
// q: the group's quants; ds: its 8 (d, s) pairs. red: 16 floats of shared memory.
__device__ __forceinline__ void quant256(float v, int8_t* q, float2* ds, float* red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float a = fabsf(v), x = v;
    int idx = tid;
    for (int off = 16; off > 0; off >>= 1) {  // largest |x|, the first one on ties
        const float a2 = __shfl_xor_sync(0xffffffffu, a, off), x2 = __shfl_xor_sync(0xffffffffu, x, off);
        const int i2 = __shfl_xor_sync(0xffffffffu, idx, off);
        if (a2 > a || (a2 == a && i2 < idx)) {
            a = a2;
            x = x2;
            idx = i2;
        }
    }
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) {
        red[warp] = a;
        red[8 + warp] = x;
    }
    __syncthreads();
    float amax = red[0], mx = red[8];
#pragma unroll
    for (int w = 1; w < 8; ++w)
        if (red[w] > amax) {  // strictly greater: the earlier warp wins ties
            amax = red[w];
            mx = red[8 + w];
        }
    int qi = 0;
    float d = 0.f;
    if (amax != 0.f) {
        const float iscale = -127.f / mx;
        qi = max(-128, min(127, __float2int_rn(iscale * v)));
        d = 1.f / iscale;
    }
    q[tid] = int8_t(qi);
    const int sum = warp_sum_int(qi);
    if (lane == 0) ds[warp] = make_float2(d, d * float(sum));
}
#endif

}  // namespace rz::cu
