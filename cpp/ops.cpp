// Portable ops and their AVX2 twins. The AVX2 versions are compiled through function target attributes so this
// file builds at the baseline ISA; they are only entered when the dispatcher's ISA level is avx2 or higher.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RZ_X86 1
#define RZ_AVX2 __attribute__((target("avx2,fma,f16c")))
// The same 256-bit operations with AVX-512VL's 32 vector registers (for kernels whose tiles need more than 16).
#define RZ_AVX2_32REGS __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
#endif

namespace rz {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool use_avx2(Isa isa) {
#ifdef RZ_X86
    return int(isa) >= int(Isa::Avx2);
#else
    (void)isa;
    return false;
#endif
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Cache blocks per online-softmax step of the AVX2 kernel: about 32 keys, so the per-step costs (max, rescale,
// exp of the correction) are shared by more keys. The same for every call: steps never depend on the batch.
inline int steps_blocks(int block_size) { return std::max(1, 32 / block_size); }

// Queries with the same keys that the AVX-512 level's attention takes through one step together (a KV group's
// heads of one token in decode, consecutive queries in prefill): at most 3, so their accumulators fit 32 registers.
constexpr int kQueryTile = 3;

// ---- portable ------------------------------------------------------------------------------------------------

void rmsnorm_generic(float* y, const float* x, const float* w, int64_t n, float eps) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += double(x[i] * x[i]);
        s1 += double(x[i + 1] * x[i + 1]);
        s2 += double(x[i + 2] * x[i + 2]);
        s3 += double(x[i + 3] * x[i + 3]);
    }
    for (; i < n; ++i) s0 += double(x[i] * x[i]);
    const float mean = float((s0 + s1 + s2 + s3) / double(n));
    const float scale = 1.0f / std::sqrt(mean + eps);
    for (i = 0; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

ArgMax argmax_generic(const float* x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(x[i])) return {x[i], i};
        if (x[i] > x[best]) best = i;
    }
    return n > 0 ? ArgMax{x[best], best} : ArgMax{0.f, -1};
}

void swiglu_generic(float* h, const float* g, const float* u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// The first `rows` rows of one KV head of a cache block (KVSeqView::k_rows / v_rows) -> rows x hd floats: F16
// widened, Q8_0 dequantized (d * q, as llama.cpp).
void kv_head_rows_generic(const KVSeqView& kv, const uint8_t* head, int rows, int hd, float* dst) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t* row = head + size_t(r) * kv.head_row_bytes();
        if (kv.type() == Type::F16) {
            const f16_t* h = reinterpret_cast<const f16_t*>(row);
            for (int d = 0; d < hd; ++d) dst[r * hd + d] = f16_to_f32(h[d]);
        } else {
            const block_q8_0* q = reinterpret_cast<const block_q8_0*>(row);
            for (int d = 0; d < hd; ++d) dst[r * hd + d] = f16_to_f32(q[d / QK8_0].d) * float(q[d / QK8_0].qs[d % QK8_0]);
        }
    }
}

void attention_generic(const AttentionShape& a, const KVSeqView& kv, const float* q, int64_t ldq,
                       const int32_t* last_pos, int n_tok, float* out, int64_t ldo, float* scratch) {
    const int hd = a.head_dim, bs = kv.block_size();
    const int G = a.n_group, nq = n_tok * G;  // query i: token i / G, head i % G of the group
    const int bsp = round_up(bs, 8);
    float* kf = scratch;          // [bsp][hd] one block of K, float
    float* vf = kf + bsp * hd;    // [bsp][hd] one block of V, float
    float* qf = vf + bsp * hd;    // [nq][hd] queries at f16 precision
    float* acc = qf + nq * hd;    // [nq][hd] unnormalised outputs
    float* m = acc + nq * hd;     // [nq] running max score
    float* l = m + nq;            // [nq] running sum of exp(score - m)
    float* s = l + nq;            // [bsp] scores of one block, then their exps

    int32_t max_last = 0;
    for (int i = 0; i < nq; ++i) {
        max_last = std::max(max_last, last_pos[i / G]);
        const float* qi = q + (i / G) * ldq + (i % G) * hd;
        for (int d = 0; d < hd; ++d) qf[i * hd + d] = f16_to_f32(f32_to_f16(qi[d]));
        std::fill(acc + i * hd, acc + (i + 1) * hd, 0.f);
        m[i] = kNegInf;
        l[i] = 0.f;
    }
    const int n_blk = max_last / bs + 1;
    for (int b = 0; b < n_blk; ++b) {
        const int p0 = b * bs, rows = std::min(bs, max_last - p0 + 1);
        kv_head_rows_generic(kv, kv.k_rows(b, a.kv_head), rows, hd, kf);
        kv_head_rows_generic(kv, kv.v_rows(b, a.kv_head), rows, hd, vf);
        for (int i = 0; i < nq; ++i) {
            if (last_pos[i / G] < p0) continue;
            const int n = std::min(rows, last_pos[i / G] - p0 + 1);
            const float* qi = qf + i * hd;
            float mb = kNegInf;
            for (int j = 0; j < n; ++j) {
                float d0 = 0.f;
                for (int d = 0; d < hd; ++d) d0 += qi[d] * kf[j * hd + d];
                s[j] = d0 * a.scale;
                mb = std::max(mb, s[j]);
            }
            const float m_new = std::max(m[i], mb);
            const float corr = m[i] == kNegInf ? 0.f : std::exp(m[i] - m_new);
            float sum = 0.f;
            for (int j = 0; j < n; ++j) {
                s[j] = std::exp(s[j] - m_new);
                sum += s[j];
            }
            l[i] = l[i] * corr + sum;
            float* ai = acc + i * hd;
            if (corr != 1.f)
                for (int d = 0; d < hd; ++d) ai[d] *= corr;
            for (int j = 0; j < n; ++j)
                for (int d = 0; d < hd; ++d) ai[d] += s[j] * vf[j * hd + d];
            m[i] = m_new;
        }
    }
    for (int i = 0; i < nq; ++i) {
        const float inv = 1.f / l[i];
        float* oi = out + (i / G) * ldo + (i % G) * hd;
        for (int d = 0; d < hd; ++d) oi[d] = acc[i * hd + d] * inv;
    }
}

// ---- AVX2 + FMA + F16C ------------------------------------------------------------------------------------------
#ifdef RZ_X86

RZ_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

RZ_AVX2 inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// exp(x) to about 2 ulp (Cephes' polynomial after reduction by ln 2); inputs are clamped to [-88, 88], so
// exp(-inf) is 0 and large inputs stay finite.
RZ_AVX2 inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Eight sums of eight vectors, in order: [hsum(v0), ..., hsum(v7)].
RZ_AVX2 inline __m256 hsum8(const __m256* v) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

RZ_AVX2 void rmsnorm_avx2(float* y, const float* x, const float* w, int64_t n, float eps) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 sq = _mm256_mul_ps(v, v);  // float squares, summed in double (as ggml)
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
    }
    alignas(32) double part[4];
    _mm256_store_pd(part, _mm256_add_pd(s0, s1));
    double sum = (part[0] + part[1]) + (part[2] + part[3]);
    for (; i < n; ++i) sum += double(x[i] * x[i]);
    const float mean = float(sum / double(n));
    const float scale = 1.0f / std::sqrt(mean + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

// Two passes: the maximum (and whether any NaN), then the first position that holds it.
RZ_AVX2 ArgMax argmax_avx2(const float* x, int64_t n) {
    const int64_t n8 = n / 8 * 8;
    if (n8 == 0) return argmax_generic(x, n);
    __m256 m0 = _mm256_loadu_ps(x), m1 = m0, nan = _mm256_cmp_ps(m0, m0, _CMP_UNORD_Q);
    int64_t i = 8;
    for (; i + 16 <= n8; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        m0 = _mm256_max_ps(m0, a);
        m1 = _mm256_max_ps(m1, b);
        nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    }
    for (; i < n8; i += 8) {
        const __m256 a = _mm256_loadu_ps(x + i);
        m0 = _mm256_max_ps(m0, a);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    float m = hmax(_mm256_max_ps(m0, m1));
    for (i = n8; i < n; ++i) {
        any_nan |= std::isnan(x[i]);
        m = std::max(m, x[i]);
    }
    if (any_nan) return argmax_generic(x, n);
    const __m256 mv = _mm256_set1_ps(m);
    for (i = 0; i < n8; i += 8) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
        if (mask) return {m, i + __builtin_ctz(unsigned(mask))};
    }
    for (; x[i] != m; ++i) {}
    return {m, i};
}

RZ_AVX2 void swiglu_avx2(float* h, const float* g, const float* u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

RZ_AVX2 void round_to_f16_avx2(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; ++i) x[i] = f16_to_f32(f32_to_f16(x[i]));
}

RZ_AVX2 void f32_to_f16_avx2(const float* x, f16_t* y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

// rows × hd halves (rows `stride` halves apart) -> rows × hd floats, packed. hd is a multiple of 8.
RZ_AVX2 inline void f16_block_to_f32(const f16_t* src, int stride, int rows, int hd, float* dst) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < hd; c += 8)
            _mm256_storeu_ps(dst + r * hd + c, _mm256_cvtph_ps(_mm_loadu_si128(
                                                   reinterpret_cast<const __m128i*>(src + size_t(r) * stride + c))));
}

// As kv_head_rows_generic, with AVX2 (the same values: F16 widening and d * q are exact either way).
RZ_AVX2 inline void kv_head_rows_avx2(const KVSeqView& kv, const uint8_t* head, int rows, int hd, float* dst) {
    if (kv.type() == Type::F16) return f16_block_to_f32(reinterpret_cast<const f16_t*>(head), hd, rows, hd, dst);
    // a head's row is hd / 32 consecutive blocks: every block of the `rows` rows in one loop
    const block_q8_0* q = reinterpret_cast<const block_q8_0*>(head);
    for (int i = 0; i < rows * (hd / QK8_0); ++i, dst += QK8_0) {
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(q[i].d));
#pragma GCC unroll 4
        for (int c = 0; c < QK8_0; c += 8) {
            const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[i].qs + c));
            _mm256_storeu_ps(dst + c, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8))));
        }
    }
}

// Eight K rows as floats, 8 dims at a time: from the cache's halves (F16 = true, rows `stride` halves apart)
// or from a converted block (rows `stride` floats apart).
template <bool F16>
RZ_AVX2 inline __m256 load8(const void* base, size_t offset) {
    if constexpr (F16)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const f16_t*>(base) + offset)));
    else
        return _mm256_loadu_ps(static_cast<const float*>(base) + offset);
}

// The keys of one online-softmax step: rows [0, n) of up to 32 blocks of `rows` rows each (block bb at
// k[bb] / v[bb], rows `stride` elements apart), halves straight from the cache or floats of a converted step.
struct StepRows {
    const void* k[32];
    const void* v[32];
    int rows;       // rows per block; a multiple of 8
    size_t stride;  // elements between consecutive rows
};

// acc[t][d0, d0 + 8*CN) = acc[t] * corr[t] + sum_{j<n} p[t]_j v_j[d0, d0 + 8*CN) for QT queries (acc rows hd floats
// apart, p rows spanp apart), the accumulators held in registers and each V row loaded once for all of them.
template <int CN, bool F16, int QT>
RZ_AVX2 __attribute__((always_inline)) inline void pv_chunk(const StepRows& kv, const float* p, int spanp, int n,
                                                            const float* corr, float* acc, int hd, size_t d0) {
    __m256 av[QT][CN];
    for (int t = 0; t < QT; ++t) {
        const __m256 vcorr = _mm256_set1_ps(corr[t]);
        for (int c = 0; c < CN; ++c) av[t][c] = _mm256_mul_ps(_mm256_loadu_ps(acc + t * hd + d0 + 8 * c), vcorr);
    }
    for (int bb = 0, j0 = 0; j0 < n; ++bb, j0 += kv.rows) {
        const void* vb = kv.v[bb];
        for (int j = 0, jn = std::min(kv.rows, n - j0); j < jn; ++j) {
            __m256 pj[QT];
            for (int t = 0; t < QT; ++t) pj[t] = _mm256_broadcast_ss(p + t * spanp + j0 + j);
            for (int c = 0; c < CN; ++c) {
                const __m256 v = load8<F16>(vb, j * kv.stride + d0 + 8 * c);
                for (int t = 0; t < QT; ++t) av[t][c] = _mm256_fmadd_ps(pj[t], v, av[t][c]);
            }
        }
    }
    for (int t = 0; t < QT; ++t)
        for (int c = 0; c < CN; ++c) _mm256_storeu_ps(acc + t * hd + d0 + 8 * c, av[t][c]);
}

// The online-softmax update of a step's scores s[0, rows8) (their maximum vmax): s becomes exp(s - m'), l and m
// the running sum and maximum; returns the correction exp(m - m') the earlier accumulators take.
RZ_AVX2 inline float softmax_step(__m256 vmax, int rows8, float* s, float& m, float& l) {
    const float m_new = std::max(m, hmax(vmax));
    const float corr = m == kNegInf ? 0.f : std::exp(m - m_new);
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (int j0 = 0; j0 < rows8; j0 += 8) {
        const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j0), vm));
        _mm256_storeu_ps(s + j0, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    l = l * corr + hsum(vsum);
    m = m_new;
    return corr;
}

// The online-softmax step of QT queries (rows hd floats apart in q and acc; running maxima m[t] and sums l[t])
// that see the same n keys of the step (the rest of each 8-row group is finite or masked): the scores q·k_r eight
// rows at a time into s (QT rows spanp floats apart), the softmax update, then acc = acc * corr + sum_j p_j v_j in
// chunks of 64 dims. Each K and V row is loaded (and converted, from halves) once for all QT queries. A query's
// operations and their order depend only on it and its n, never on QT, the other queries, or whether K/V come as
// halves or converted floats, so a token's result does not depend on how a batch groups it.
// Inlined into attend_step (one query, AVX2's 16 registers) and attend_tile (up to kQueryTile, AVX-512VL's 32).
template <int HD, bool F16, int QT>
RZ_AVX2 __attribute__((always_inline)) inline void attend_queries(const float* q, const StepRows& kv, int n, int hd,
                                                                  float scale, float* acc, float* m, float* l,
                                                                  float* s, int spanp) {
    const int rows8 = round_up(n, 8);
    __m256 vmax[QT];
    for (int t = 0; t < QT; ++t) vmax[t] = _mm256_set1_ps(kNegInf);
    for (int j0 = 0; j0 < rows8; j0 += 8) {
        const void* kb = kv.k[j0 / kv.rows];
        const size_t first = size_t(j0 % kv.rows) * kv.stride;
        __m256 r8[QT][8];  // query t's products with rows j0..j0+7, 8 dims at a time
        __m256 qc[QT];
        for (int t = 0; t < QT; ++t) qc[t] = _mm256_loadu_ps(q + t * hd);
        for (int r = 0; r < 8; ++r) {
            const __m256 kr = load8<F16>(kb, first + r * kv.stride);
            for (int t = 0; t < QT; ++t) r8[t][r] = _mm256_mul_ps(qc[t], kr);
        }
        for (int c = 8; c < (HD ? HD : hd); c += 8) {
            for (int t = 0; t < QT; ++t) qc[t] = _mm256_loadu_ps(q + t * hd + c);
            for (int r = 0; r < 8; ++r) {
                const __m256 kr = load8<F16>(kb, first + r * kv.stride + c);
                for (int t = 0; t < QT; ++t) r8[t][r] = _mm256_fmadd_ps(qc[t], kr, r8[t][r]);
            }
        }
        for (int t = 0; t < QT; ++t) {
            __m256 sv = _mm256_mul_ps(hsum8(r8[t]), _mm256_set1_ps(scale));
            if (j0 + 8 > n) {  // keys past this query's last position
                const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - j0), idx));
                sv = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), sv, keep);
            }
            _mm256_storeu_ps(s + t * spanp + j0, sv);
            vmax[t] = _mm256_max_ps(vmax[t], sv);
        }
    }
    float corr[QT];
    for (int t = 0; t < QT; ++t) corr[t] = softmax_step(vmax[t], rows8, s + t * spanp, m[t], l[t]);
    size_t d0 = 0;
    for (; d0 + 64 <= size_t(hd); d0 += 64) pv_chunk<8, F16, QT>(kv, s, spanp, n, corr, acc, hd, d0);
    for (; d0 < size_t(hd); d0 += 8) pv_chunk<1, F16, QT>(kv, s, spanp, n, corr, acc, hd, d0);
}

template <int HD, bool F16>
RZ_AVX2 inline void attend_step(const float* q, const StepRows& kv, int n, int hd, float scale, float* acc, float* m,
                                float* l, float* s, int spanp) {
    attend_queries<HD, F16, 1>(q, kv, n, hd, scale, acc, m, l, s, spanp);
}

template <int HD, bool F16, int QT>
RZ_AVX2_32REGS __attribute__((noinline)) void attend_tile(const float* q, const StepRows& kv, int n, int hd,
                                                          float scale, float* acc, float* m, float* l, float* s,
                                                          int spanp) {
    attend_queries<HD, F16, QT>(q, kv, n, hd, scale, acc, m, l, s, spanp);
}

// HD: head_dim when known at compile time, 0 for any multiple of 8. With few queries K and V are read as
// halves straight from the cache (decode); with more, each block is converted to floats once for all of them.
// wide (the AVX-512 level): queries that see the same keys go through a step in tiles (attend_tile), with the same
// results: in decode a token's KV-group heads, in prefill consecutive queries.
template <int HD>
RZ_AVX2 void attention_avx2(const AttentionShape& a, const KVSeqView& kv, const float* q, int64_t ldq,
                            const int32_t* last_pos, int n_tok, float* out, int64_t ldo, float* scratch, bool wide) {
    const int hd = HD ? HD : a.head_dim, nc = hd / 8;
    const int bs = kv.block_size(), stride = hd;  // (F16: halves between a head's rows)
    const int G = a.n_group, nq = n_tok * G;  // query i: token i / G, head i % G of the group
    // few queries (decode): read F16 K/V halves in place, the step stays in L1 for the group's heads; Q8_0
    // blocks are always dequantized into the step's floats first
    const bool direct = kv.type() == Type::F16 && nq <= 4 && bs % 8 == 0;  // (8-row groups then lie in one block)
    const int step_blocks = steps_blocks(bs), span = step_blocks * bs, spanp = round_up(span, 8);
    float* s = scratch;                   // [kQueryTile][spanp] scores of one step's keys, then their exps
    float* kf = s + kQueryTile * spanp;   // [spanp][hd] the step's K rows as floats; rows past the last zeroed
    float* vf = kf + spanp * hd;  // [spanp][hd] the step's V rows as floats
    float* qf = vf + spanp * hd;  // [nq][hd] queries at f16 precision
    float* acc = qf + nq * hd;    // [nq][hd] unnormalised outputs
    float* m = acc + nq * hd;     // [nq] running max score
    float* l = m + nq;            // [nq] running sum of exp(score - m)

    int32_t max_last = 0;
    for (int i = 0; i < nq; ++i) {
        max_last = std::max(max_last, last_pos[i / G]);
        const float* qi = q + (i / G) * ldq + (i % G) * hd;
        for (int c = 0; c < nc; ++c) {
            const __m256 v = _mm256_loadu_ps(qi + 8 * c);
            _mm256_storeu_ps(qf + i * hd + 8 * c, _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)));
            _mm256_storeu_ps(acc + i * hd + 8 * c, _mm256_setzero_ps());
        }
        m[i] = kNegInf;
        l[i] = 0.f;
    }
    const int n_blk = max_last / bs + 1;
    StepRows cached, converted;  // the step's keys: in the cache (halves) or in kf/vf (floats)
    cached.rows = bs;
    cached.stride = size_t(stride);
    converted.k[0] = kf;
    converted.v[0] = vf;
    converted.rows = spanp;
    converted.stride = size_t(hd);
    for (int b = 0; b < n_blk; b += step_blocks) {
        const int p0 = b * bs, rows = std::min(span, max_last - p0 + 1), rows8 = round_up(rows, 8);
        if (direct) {
            for (int bb = 0; bb < step_blocks && b + bb < n_blk; ++bb) {
                cached.k[bb] = kv.k_rows(b + bb, a.kv_head);
                cached.v[bb] = kv.v_rows(b + bb, a.kv_head);
            }
        } else {
            for (int bb = 0; bb * bs < rows; ++bb) {
                const int r = std::min(bs, rows - bb * bs);
                kv_head_rows_avx2(kv, kv.k_rows(b + bb, a.kv_head), r, hd, kf + bb * bs * hd);
                kv_head_rows_avx2(kv, kv.v_rows(b + bb, a.kv_head), r, hd, vf + bb * bs * hd);
            }
            for (int r = rows; r < rows8; ++r) std::memset(kf + r * hd, 0, sizeof(float) * hd);
        }
        auto keys = [&](int i) { return last_pos[i / G] < p0 ? 0 : std::min(rows, last_pos[i / G] - p0 + 1); };
        for (int i = 0, t; i < nq; i += t) {
            const int n = keys(i);
            t = 1;
            if (n == 0) continue;
            while (wide && t < kQueryTile && i + t < nq && keys(i + t) == n) ++t;
            const StepRows& rows_in = direct ? cached : converted;
            float *qi = qf + i * hd, *ai = acc + i * hd;
            if (t == 3)
                direct ? attend_tile<HD, true, 3>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp)
                       : attend_tile<HD, false, 3>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp);
            else if (t == 2)
                direct ? attend_tile<HD, true, 2>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp)
                       : attend_tile<HD, false, 2>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp);
            else if (direct)
                attend_step<HD, true>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp);
            else
                attend_step<HD, false>(qi, rows_in, n, hd, a.scale, ai, m + i, l + i, s, spanp);
        }
    }
    for (int i = 0; i < nq; ++i) {
        const __m256 inv = _mm256_set1_ps(1.f / l[i]);
        float* oi = out + (i / G) * ldo + (i % G) * hd;
        for (int c = 0; c < nc; ++c)
            _mm256_storeu_ps(oi + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(acc + i * hd + 8 * c), inv));
    }
}

#endif  // RZ_X86

}  // namespace

void rmsnorm(float* y, const float* x, const float* w, int64_t n, float eps, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa)) return rmsnorm_avx2(y, x, w, n, eps);
#endif
    rmsnorm_generic(y, x, w, n, eps);
}

void swiglu(float* h, const float* g, const float* u, int64_t n, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa)) return swiglu_avx2(h, g, u, n);
#endif
    swiglu_generic(h, g, u, n);
}

ArgMax argmax(const float* x, int64_t n, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa)) return argmax_avx2(x, n);
#endif
    return argmax_generic(x, n);
}

void round_to_f16(float* x, int64_t n, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa)) return round_to_f16_avx2(x, n);
#endif
    for (int64_t i = 0; i < n; ++i) x[i] = f16_to_f32(f32_to_f16(x[i]));
}

void f32_to_f16_row(const float* x, f16_t* y, int64_t n, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa)) return f32_to_f16_avx2(x, y, n);
#endif
    for (int64_t i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

// Angles as llama.cpp computes them (theta = pos * base^(-2i/n_rot), by repeated multiplication in float),
// with linear scaling (freq_scale), per-pair frequency factors and YaRN's ramp between interpolation and
// extrapolation.
void rope_angles(const RopeParams& p, int32_t pos, float* cos_out, float* sin_out) {
    const int half = p.n_rot / 2;
    const float theta_scale = std::pow(p.freq_base, -2.0f / float(p.n_rot));
    float corr_lo = 0.f, corr_hi = 0.f;
    if (p.ext_factor != 0.f) {
        // dimension index at which a rotation makes `n_rot_turns` turns over the original context
        auto corr_dim = [&](float turns) {
            return float(p.n_rot) * std::log(float(p.n_ctx_orig) / (turns * 2.f * float(M_PI))) /
                   (2.f * std::log(p.freq_base));
        };
        corr_lo = std::max(0.f, std::floor(corr_dim(p.beta_fast)));
        corr_hi = std::min(float(p.n_rot - 1), std::ceil(corr_dim(p.beta_slow)));
    }
    float theta_extrap = float(pos);
    for (int i = 0; i < half; ++i) {
        const float te = p.freq_factors ? theta_extrap / p.freq_factors[i] : theta_extrap;
        const float theta_interp = p.freq_scale * te;
        float theta = theta_interp, mscale = p.attn_factor;
        if (p.ext_factor != 0.f) {
            const float y = (float(i) - corr_lo) / std::max(0.001f, corr_hi - corr_lo);
            const float ramp_mix = (1.f - std::min(1.f, std::max(0.f, y))) * p.ext_factor;
            theta = theta_interp * (1.f - ramp_mix) + te * ramp_mix;
            mscale *= 1.0f + 0.1f * std::log(1.0f / p.freq_scale);
        }
        cos_out[i] = std::cos(theta) * mscale;
        sin_out[i] = std::sin(theta) * mscale;
        theta_extrap *= theta_scale;
    }
}

void rope_apply(const RopeParams& p, float* x, const float* cos_t, const float* sin_t) {
    const int half = p.n_rot / 2;
    if (p.neox) {
        for (int i = 0; i < half; ++i) {
            const float x0 = x[i], x1 = x[i + half];
            x[i] = x0 * cos_t[i] - x1 * sin_t[i];
            x[i + half] = x0 * sin_t[i] + x1 * cos_t[i];
        }
    } else {
        for (int i = 0; i < half; ++i) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i] = x0 * cos_t[i] - x1 * sin_t[i];
            x[2 * i + 1] = x0 * sin_t[i] + x1 * cos_t[i];
        }
    }
}

size_t attention_scratch_floats(int head_dim, int block_size, int max_queries) {
    const size_t bsp = size_t(round_up(block_size, 8));                              // generic layout
    const size_t span = size_t(round_up(steps_blocks(block_size) * block_size, 8));  // AVX2 layout
    return 2 * std::max(bsp, span) * head_dim + 2 * size_t(max_queries) * head_dim + 2 * size_t(max_queries) +
           kQueryTile * std::max(bsp, span);
}

void attention(const AttentionShape& a, const KVSeqView& kv, const float* q, int64_t ldq, const int32_t* last_pos,
               int n_tok, float* out, int64_t ldo, float* scratch, Isa isa) {
#ifdef RZ_X86
    if (use_avx2(isa) && a.head_dim % 8 == 0) {
        const bool wide = isa == Isa::Avx512;
        switch (a.head_dim) {
            case 64: return attention_avx2<64>(a, kv, q, ldq, last_pos, n_tok, out, ldo, scratch, wide);
            case 128: return attention_avx2<128>(a, kv, q, ldq, last_pos, n_tok, out, ldo, scratch, wide);
            default: return attention_avx2<0>(a, kv, q, ldq, last_pos, n_tok, out, ldo, scratch, wide);
        }
    }
#endif
    attention_generic(a, kv, q, ldq, last_pos, n_tok, out, ldo, scratch);
}

}  // namespace rz
