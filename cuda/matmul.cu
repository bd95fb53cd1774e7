// Quantized matrix products on the GPU, reading GGUF blocks in place:
//   - matrix-vector (decode, up to kMatvecMaxRows activation rows): each warp computes two weight rows, each
//     lane a unit of 16-32 elements per step, weights unpacked in registers, Q8 activations and dp4a;
//   - matrix-matrix (prefill, large batches): 128 x 64 tiles, weights dequantized to half in shared memory,
//     tensor cores through WMMA with float accumulation;
// plus the activation quantizer and the embedding-row dequantizer. The host copies of the block traits
// (host_row_dot, host_dequantize) let the CPU check the bit layouts without a GPU.
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels.cuh"

namespace rz::cu {

bool weight_type_has_kernels(Type t) {
    switch (t) {
#define RZ_CASE(name) case Type::name:
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        return true;
        default: return false;
    }
}
bool cuda_type_supported(Type t) { return weight_type_has_kernels(t); }
bool act_is_quantized(Type t) { return act_format(t) != kActF32; }

// ---- activation quantization ------------------------------------------------------------------------------
// grid (ceil(K / 256), n), 256 threads: a block quantizes 256 elements of a row (Q8_K: one group; K is then a
// multiple of 256), a warp a 32-group.
__global__ void __launch_bounds__(256) quantize_q8_kernel(const float* x, int64_t ldx, int K, int fmt, int8_t* q,
                                                          float2* ds, int64_t ldq, int64_t ldds) {
    __shared__ float red[16];
    pdl_wait();
    const int row = blockIdx.y, lane = threadIdx.x & 31;
    const int i = blockIdx.x * 256 + threadIdx.x;
    if (fmt == kActQ8_K) {
        quant256(x[row * ldx + i], q + row * ldq + blockIdx.x * 256, ds + row * ldds + blockIdx.x * 8, red);
        return;
    }
    if (i >= K) return;  // whole warps: K is a multiple of 32
    const float v = x[row * ldx + i];
    quant32<1>(&v, lane, fmt, q + row * ldq + i, ds + row * ldds + i / 32);
}

void launch_quantize_q8(const float* x, int64_t ldx, int n, int K, int fmt, int8_t* q, float2* ds, int64_t ldq,
                        int64_t ldds, cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    if (K % (fmt == kActQ8_K ? 256 : 32)) throw std::invalid_argument("launch_quantize_q8: K is not a multiple of the group");
    launch(quantize_q8_kernel, dim3((K + 255) / 256, n), dim3(256), 0, s, pdl, x, ldx, K, fmt, q, ds, ldq, ldds);
}

// ---- matrix-vector ------------------------------------------------------------------------------------------
struct MatvecArgs {
    const uint8_t* w;
    size_t row_bytes;
    int rows, K;
    ActView a;
    int n;
    float* y;
    int64_t ldy;
    int epi;
    const float* bias;
};

constexpr int kMvWarps = 4;

__device__ __forceinline__ void matvec_store(const MatvecArgs& p, int b, int r0, bool has1, float v0, float v1) {
    float* y = p.y + b * p.ldy;
    if (p.epi == kStore) {
        y[r0] = v0 + (p.bias ? p.bias[r0] : 0.f);
        if (has1) y[r0 + 1] = v1 + (p.bias ? p.bias[r0 + 1] : 0.f);
    } else if (p.epi == kAdd) {
        y[r0] += v0;
        if (has1) y[r0 + 1] += v1;
    } else {
        y[r0 >> 1] = silu_mul(v0, v1);
    }
}

// A block of kMvWarps warps computes 2 * kMvWarps / ks weight rows for B activation rows (p.n <= B used): the
// warps of a row pair split its units ks ways (lane + 32 * slice, stepping 32 * ks), so a long row is no long
// chain of dependent loads per lane; ks (1, 2 or 4) depends on K only, so a row's summation order is fixed per
// matrix whatever the batch. Each lane walks its units one ahead: the next unit's weights load while the current
// one is multiplied, and the first unit's weights (immutable) load before pdl_wait(), overlapping the previous
// kernel's tail. The slices' partial sums meet in shared memory, slice 0 first.
template <int T, int B>
__global__ void __launch_bounds__(kMvWarps * 32) matvec_kernel(MatvecArgs p, int ks) {
    using BTT = BT<T>;
    __shared__ float part[kMvWarps][B][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % ks;
    const int r0 = 2 * (blockIdx.x * (kMvWarps / ks) + warp / ks);
    const bool active = r0 < p.rows;
    const bool has1 = r0 + 1 < p.rows;
    const uint8_t* w0 = p.w + size_t(active ? r0 : 0) * p.row_bytes;
    const uint8_t* w1 = has1 ? w0 + p.row_bytes : w0;
    const int nunits = p.K / BTT::QK * BTT::UPB;
    const int first = lane + 32 * slice, stride = 32 * ks;

    typename BTT::W c0, c1;
    if (active && first < nunits) {
        BTT::fetch(c0, w0 + size_t(first / BTT::UPB) * BTT::BYTES, first % BTT::UPB);
        BTT::fetch(c1, w1 + size_t(first / BTT::UPB) * BTT::BYTES, first % BTT::UPB);
    }
    pdl_wait();

    float acc0[B], acc1[B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc0[b] = acc1[b] = 0.f;

    if (active) {
#pragma unroll 2
        for (int u = first; u < nunits; u += stride) {
            const int blk = u / BTT::UPB, sub = u % BTT::UPB;
            typename BTT::W n0, n1;
            const int un = u + stride;
            if (un < nunits) {
                BTT::fetch(n0, w0 + size_t(un / BTT::UPB) * BTT::BYTES, un % BTT::UPB);
                BTT::fetch(n1, w1 + size_t(un / BTT::UPB) * BTT::BYTES, un % BTT::UPB);
            }
#pragma unroll
            for (int b = 0; b < B; ++b) {
                if (b < p.n) {
                    Act a;
                    a.q = p.a.q + b * p.a.ldq + blk * BTT::QK;
                    a.ds = p.a.ds + b * p.a.ldds + blk * (BTT::QK / 32);
                    a.f = p.a.f + b * p.a.ldf + blk * BTT::QK;
                    acc0[b] += BTT::dot(c0, sub, a);
                    acc1[b] += BTT::dot(c1, sub, a);
                }
            }
            c0 = n0;
            c1 = n1;
        }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        acc0[b] = warp_sum(acc0[b]);
        acc1[b] = warp_sum(acc1[b]);
    }
    if (ks > 1) {
        if (lane == 0) {
#pragma unroll
            for (int b = 0; b < B; ++b) {
                part[warp][b][0] = acc0[b];
                part[warp][b][1] = acc1[b];
            }
        }
        __syncthreads();
        if (slice != 0) return;
        for (int j = 1; j < ks; ++j) {
#pragma unroll
            for (int b = 0; b < B; ++b) {
                acc0[b] += part[warp + j][b][0];
                acc1[b] += part[warp + j][b][1];
            }
        }
    }
    if (active && lane == 0) {
#pragma unroll
        for (int b = 0; b < B; ++b)
            if (b < p.n) matvec_store(p, b, r0, has1, acc0[b], acc1[b]);
    }
}

// Warps per row pair: enough that each lane has about one unit (at most kMvWarps).
template <int T>
int matvec_slices(int K) {
    const int nunits = K / BT<T>::QK * BT<T>::UPB;
    int ks = 1;
    while (ks < kMvWarps && nunits > 32 * ks) ks *= 2;
    return ks;
}

template <int T>
void launch_matvec_t(const MatvecArgs& p, cudaStream_t s, bool pdl) {
    const int ks = matvec_slices<T>(p.K);
    const int rows_per_block = 2 * kMvWarps / ks;
    const dim3 grid((p.rows + rows_per_block - 1) / rows_per_block), block(kMvWarps * 32);
    if (p.n <= 1) launch(matvec_kernel<T, 1>, grid, block, 0, s, pdl, p, ks);
    else if (p.n <= 2) launch(matvec_kernel<T, 2>, grid, block, 0, s, pdl, p, ks);
    else if (p.n <= 4) launch(matvec_kernel<T, 4>, grid, block, 0, s, pdl, p, ks);
    else launch(matvec_kernel<T, 8>, grid, block, 0, s, pdl, p, ks);
}

void launch_matvec(const MatRef& W, const ActView& a, int n, float* y, int64_t ldy, Epi epi, const float* bias,
                   cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    if (n > kMatvecMaxRows) throw std::invalid_argument("launch_matvec: more than 8 activation rows");
    if (epi == kSwiGLU && W.rows % 2) throw std::invalid_argument("launch_matvec: SwiGLU needs an even row count");
    MatvecArgs p{W.data, W.row_bytes, W.rows, W.K, a, n, y, ldy, int(epi), bias};
    switch (W.type) {
#define RZ_CASE(name) case Type::name: launch_matvec_t<int(Type::name)>(p, s, pdl); return;
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("launch_matvec: type without CUDA kernels");
    }
}

// ---- matrix-matrix (tensor cores) --------------------------------------------------------------------------
// y[n][m] = sum_k x[n][k] * W[m][k]: block tile 128 weight rows x 64 activation rows, k in steps of 32 with a
// double-buffered shared-memory tile; warp (wm, wn) computes rows 32 wm.. and activations 32 wn.. as 2 x 2
// 16x16 fragments.
// Split-K: when the (M, N) tiles alone would leave SMs idle (decode batches: N <= 64 gives M / 128 blocks),
// blockIdx.z takes a slice of k_len k-steps and writes its raw sums to ws[z][n][m]; gemm_reduce_kernel then
// adds the slices in slice order and applies the epilogue. The order never depends on timing.
constexpr int kGM = 128, kGN = 64, kGK = 32, kGLD = kGK + 8, kGCLD = kGM + 4;
constexpr int kGMaxSplit = 16, kGMinSlice = 4;  // at most 16 slices of at least 4 k-steps

struct GemmArgs {
    const uint8_t* w;
    size_t row_bytes;
    int M, K;
    ActView a;  // Q8 activations for quantized weights (the values the matrix-vector kernel sees), else float
    int N;
    float* y;
    int64_t ldy;
    int epi;
    const float* bias;
    float* ws;  // split-K: raw sums of slice blockIdx.z go to ws[z][n][m] (N x M per slice); null: no split
    int k_len;  // k-steps per slice
};

struct GemmTiles {
    __half w[2][kGM][kGLD];
    __half x[2][kGN][kGLD];
};
union GemmSmem {
    GemmTiles t;
    float c[kGN][kGCLD];
};

template <int T>
__global__ void __launch_bounds__(256) gemm_kernel(GemmArgs p) {
    namespace wmma = nvcuda::wmma;
    using BTT = BT<T>;
    __shared__ __align__(128) GemmSmem sm;
    pdl_wait();
    const int tid = threadIdx.x, warp = tid >> 5;
    const int m0 = blockIdx.x * kGM, n0 = blockIdx.y * kGN;
    const int wr = tid >> 1, wh = tid & 1;        // this thread's weight row in the tile and which 16 of 32
    const int xr = tid >> 2, xc = (tid & 3) * 8;  // its activation row and first of 8 columns
    const bool w_ok = m0 + wr < p.M, x_ok = n0 + xr < p.N;
    const uint8_t* wrow = p.w + size_t(w_ok ? m0 + wr : 0) * p.row_bytes;
    const int64_t xi = x_ok ? n0 + xr : 0;
    const bool q8 = p.a.q != nullptr;

    float wv[16];
    float4 xv0, xv1;
    auto fetch = [&](int kt) {
        const int k = kt * kGK + 16 * wh;
        if (w_ok) {
            BTT::dequant16(wrow + size_t(k / BTT::QK) * BTT::BYTES, (k % BTT::QK) / 16, wv);
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) wv[i] = 0.f;
        }
        if (x_ok && q8) {  // a k-tile is one 32-group: q * d, as the matrix-vector kernel's integer dot means it
            const int2 qv = *reinterpret_cast<const int2*>(p.a.q + xi * p.a.ldq + kt * kGK + xc);
            const float d = p.a.ds[xi * p.a.ldds + kt].x;
            auto b = [&](int w, int i) { return float(int8_t(uint32_t(w) >> (8 * i))) * d; };
            xv0 = make_float4(b(qv.x, 0), b(qv.x, 1), b(qv.x, 2), b(qv.x, 3));
            xv1 = make_float4(b(qv.y, 0), b(qv.y, 1), b(qv.y, 2), b(qv.y, 3));
        } else if (x_ok) {
            const float* xrow = p.a.f + xi * p.a.ldf;
            xv0 = *reinterpret_cast<const float4*>(xrow + kt * kGK + xc);
            xv1 = *reinterpret_cast<const float4*>(xrow + kt * kGK + xc + 4);
        } else {
            xv0 = xv1 = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto store = [&](int buf) {
        __align__(16) __half2 h[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) h[i] = __floats2half2_rn(wv[2 * i], wv[2 * i + 1]);
        uint4* dw = reinterpret_cast<uint4*>(&sm.t.w[buf][wr][16 * wh]);
        dw[0] = reinterpret_cast<const uint4*>(h)[0];
        dw[1] = reinterpret_cast<const uint4*>(h)[1];
        __align__(16) __half2 g[4] = {__floats2half2_rn(xv0.x, xv0.y), __floats2half2_rn(xv0.z, xv0.w),
                                      __floats2half2_rn(xv1.x, xv1.y), __floats2half2_rn(xv1.z, xv1.w)};
        *reinterpret_cast<uint4*>(&sm.t.x[buf][xr][xc]) = *reinterpret_cast<const uint4*>(g);
    };

    const int wm = warp & 3, wn = warp >> 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int kt0 = blockIdx.z * p.k_len, kt1 = min(p.K / kGK, kt0 + p.k_len);
    fetch(kt0);
    store(0);
    __syncthreads();
    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) fetch(kt + 1);
#pragma unroll
        for (int kk = 0; kk < kGK / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &sm.t.x[buf][32 * wn + 16 * i][16 * kk], kGLD);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &sm.t.w[buf][32 * wm + 16 * j][16 * kk], kGLD);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        if (kt + 1 < kt1) store(buf ^ 1);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&sm.c[32 * wn + 16 * i][32 * wm + 16 * j], acc[i][j], kGCLD, wmma::mem_row_major);
    __syncthreads();

    if (p.ws) {
        float* ws = p.ws + size_t(blockIdx.z) * p.N * p.M;
        for (int idx = tid; idx < kGN * kGM; idx += 256) {
            const int n = idx / kGM, m = idx % kGM;
            if (m0 + m < p.M && n0 + n < p.N) ws[size_t(n0 + n) * p.M + (m0 + m)] = sm.c[n][m];
        }
    } else if (p.epi == kSwiGLU) {
        for (int idx = tid; idx < kGN * kGM / 2; idx += 256) {
            const int n = idx / (kGM / 2), m = 2 * (idx % (kGM / 2));
            if (m0 + m < p.M && n0 + n < p.N)
                p.y[(n0 + n) * p.ldy + (m0 + m) / 2] = silu_mul(sm.c[n][m], sm.c[n][m + 1]);
        }
    } else {
        for (int idx = tid; idx < kGN * kGM; idx += 256) {
            const int n = idx / kGM, m = idx % kGM;
            if (m0 + m < p.M && n0 + n < p.N) {
                float* y = p.y + (n0 + n) * p.ldy + (m0 + m);
                if (p.epi == kAdd) *y += sm.c[n][m];
                else *y = sm.c[n][m] + (p.bias ? p.bias[m0 + m] : 0.f);
            }
        }
    }
}

// The slices' sum in slice order, then the epilogue: one thread per output element.
__global__ void __launch_bounds__(256) gemm_reduce_kernel(const float* ws, int S, int N, int M, float* y,
                                                          int64_t ldy, int epi, const float* bias) {
    pdl_wait();
    const int Mo = epi == kSwiGLU ? M / 2 : M;
    const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
    if (i >= int64_t(N) * Mo) return;
    const int n = int(i / Mo), mo = int(i % Mo);
    const size_t stride = size_t(N) * M;
    if (epi == kSwiGLU) {
        const float* w = ws + size_t(n) * M + 2 * mo;
        float g = w[0], u = w[1];
        for (int z = 1; z < S; ++z) g += w[z * stride], u += w[z * stride + 1];
        y[n * ldy + mo] = silu_mul(g, u);
    } else {
        const float* w = ws + size_t(n) * M + mo;
        float v = w[0];
        for (int z = 1; z < S; ++z) v += w[z * stride];
        float* out = y + n * ldy + mo;
        if (epi == kAdd) *out += v;
        else *out = v + (bias ? bias[mo] : 0.f);
    }
}

size_t gemm_work_floats(int sm_count) {
    // slices are added only while the tiles number under 2 sm_count, so S * N * M < 4 sm_count * kGM * kGN
    return size_t(4) * std::max(1, sm_count) * kGM * kGN;
}

// Slices for an M x K product over n activation rows: doubled while the blocks number under two per SM (about
// what stays resident) and each slice keeps kGMinSlice k-steps.
static int gemm_slices(int M, int K, int n, int sm_count) {
    const int base = ((M + kGM - 1) / kGM) * ((n + kGN - 1) / kGN), nk = K / kGK;
    int S = 1;
    while (S < kGMaxSplit && base * S < 2 * sm_count && nk / (2 * S) >= kGMinSlice) S *= 2;
    return S;
}

void launch_gemm(const MatRef& W, const ActView& a, int n, float* y, int64_t ldy, Epi epi, const float* bias,
                 cudaStream_t s, bool pdl, const GemmWork& work) {
    if (n <= 0) return;
    ActView av = a;
    if (!act_is_quantized(W.type)) av.q = nullptr, av.ds = nullptr;
    else if (!av.q) throw std::invalid_argument("launch_gemm: quantized weights need Q8 activations");
    if (W.K % kGK || av.ldf % 4 || av.ldq % 8) throw std::invalid_argument("launch_gemm: bad K or row strides");
    if (epi == kSwiGLU && W.rows % 2) throw std::invalid_argument("launch_gemm: SwiGLU needs an even row count");
    void (*kernel)(GemmArgs) = nullptr;
    switch (W.type) {
#define RZ_CASE(name) case Type::name: kernel = gemm_kernel<int(Type::name)>; break;
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("launch_gemm: type without CUDA kernels");
    }
    const int nk = W.K / kGK;
    // batch-invariant: the slices as if the rows were one tile, so a row's sums never depend on the batch
    const int S = work.ws ? gemm_slices(W.rows, W.K, work.batch_invariant ? kGN : n, work.sm_count) : 1;
    if (S == 1) {
        GemmArgs p{W.data, W.row_bytes, W.rows, W.K, av, n, y, ldy, int(epi), bias, nullptr, nk};
        launch(kernel, dim3((W.rows + kGM - 1) / kGM, (n + kGN - 1) / kGN), dim3(256), 0, s, pdl, p);
        return;
    }
    const int k_len = (nk + S - 1) / S, slices = (nk + k_len - 1) / k_len;
    // rows in chunks that fit the workspace (one chunk unless batch-invariant with many rows)
    const int chunk = int(std::min<size_t>(n, work.floats / (size_t(slices) * W.rows) / kGN * kGN));
    if (chunk < 1) throw std::invalid_argument("launch_gemm: split-K workspace too small");
    const int Mo = epi == kSwiGLU ? W.rows / 2 : W.rows;
    for (int r = 0; r < n; r += chunk) {
        const int nc = std::min(chunk, n - r);
        ActView ac = av;
        ac.f = av.f ? av.f + r * av.ldf : nullptr;
        if (av.q) ac.q += r * av.ldq, ac.ds += r * av.ldds;
        GemmArgs p{W.data, W.row_bytes, W.rows, W.K, ac, nc, nullptr, 0, int(epi), nullptr, work.ws, k_len};
        launch(kernel, dim3((W.rows + kGM - 1) / kGM, (nc + kGN - 1) / kGN, slices), dim3(256), 0, s, pdl, p);
        const int64_t outs = int64_t(nc) * Mo;
        launch(gemm_reduce_kernel, dim3(unsigned((outs + 255) / 256)), dim3(256), 0, s, pdl,
               static_cast<const float*>(work.ws), slices, nc, W.rows, y + r * ldy, ldy, int(epi), bias);
    }
}

// ---- embedding rows / dequantize ------------------------------------------------------------------------------
template <int T>
__global__ void embed_kernel(const uint8_t* w, size_t row_bytes, int K, const int32_t* tokens, float* x, int64_t ldx) {
    using BTT = BT<T>;
    pdl_wait();
    const int row = blockIdx.y;
    const int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 16;
    if (e >= K) return;
    const int64_t src = tokens ? tokens[row] : row;
    const uint8_t* r = w + size_t(src) * row_bytes;
    float v[16];
    BTT::dequant16(r + size_t(e / BTT::QK) * BTT::BYTES, int((e % BTT::QK) / 16), v);
    float4* dst = reinterpret_cast<float4*>(x + row * ldx + e);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

void launch_embed(const MatRef& E, const int32_t* tokens, int n, float* x, int64_t ldx, cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    const dim3 grid(unsigned((int64_t(E.K) / 16 + 127) / 128), n), block(128);
    switch (E.type) {
#define RZ_CASE(name) \
    case Type::name: launch(embed_kernel<int(Type::name)>, grid, block, 0, s, pdl, E.data, E.row_bytes, E.K, tokens, x, ldx); return;
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("launch_embed: type without CUDA kernels");
    }
}

// ---- host emulation (self-test of the block traits without a GPU) ------------------------------------------
namespace {
// The device's activation quantizers (quant32, quant256) in plain C++.
void host_quantize_q8(const float* x, int K, int fmt, int8_t* q, float2* ds) {
    if (fmt == kActQ8_K) {
        for (int b = 0; b < K / 256; ++b) {
            const float* xb = x + 256 * b;
            float amax = 0.f, mx = 0.f;
            for (int i = 0; i < 256; ++i)
                if (std::fabs(xb[i]) > amax) {
                    amax = std::fabs(xb[i]);
                    mx = xb[i];
                }
            const float iscale = amax != 0.f ? -127.f / mx : 0.f;
            const float d = amax != 0.f ? 1.f / iscale : 0.f;
            for (int g = 0; g < 8; ++g) {
                int sum = 0;
                for (int i = 0; i < 32; ++i) {
                    const int qi = amax != 0.f ? std::max(-128, std::min(127, int(std::nearbyint(iscale * xb[32 * g + i])))) : 0;
                    q[256 * b + 32 * g + i] = int8_t(qi);
                    sum += qi;
                }
                ds[8 * b + g] = make_float2(d, d * float(sum));
            }
        }
        return;
    }
    for (int g = 0; g < K / 32; ++g) {
        float amax = 0.f;
        for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(x[32 * g + i]));
        const float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        id = std::isfinite(id) ? id : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; ++i) {
            const int qi = int(std::round(x[32 * g + i] * id));
            q[32 * g + i] = int8_t(qi);
            sum += qi;
        }
        const float dh = round_f16(d);
        ds[g] = make_float2(dh, fmt == kActQ8_1 ? round_f16(float(sum) * d) : dh * float(sum));
    }
}

template <int T>
float host_row_dot_t(const uint8_t* w, int K, const int8_t* q, const float2* ds, const float* f) {
    using BTT = BT<T>;
    double acc = 0.0;
    for (int u = 0; u < K / BTT::QK * BTT::UPB; ++u) {
        const int blk = u / BTT::UPB, sub = u % BTT::UPB;
        typename BTT::W x;
        BTT::fetch(x, w + size_t(blk) * BTT::BYTES, sub);
        Act a;
        a.q = q + blk * BTT::QK;
        a.ds = ds + blk * (BTT::QK / 32);
        a.f = f + blk * BTT::QK;
        acc += BTT::dot(x, sub, a);
    }
    return float(acc);
}

template <int T>
void host_dequantize_t(const uint8_t* w, int64_t n, float* y) {
    using BTT = BT<T>;
    for (int64_t e = 0; e < n; e += 16) BTT::dequant16(w + size_t(e / BTT::QK) * BTT::BYTES, int((e % BTT::QK) / 16), y + e);
}

int block_elems(Type t) {
    switch (t) {
#define RZ_CASE(name) case Type::name: return BT<int(Type::name)>::QK;
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("type without CUDA kernels");
    }
}
}  // namespace

float host_row_dot(Type t, const uint8_t* w, int K, const float* x) {
    if (K % block_elems(t)) throw std::invalid_argument("host_row_dot: K is not a multiple of the block size");
    auto q = std::vector<int8_t>(size_t(K));
    auto ds = std::vector<float2>(size_t(K / 32));
    host_quantize_q8(x, K, act_format(t), q.data(), ds.data());
    switch (t) {
#define RZ_CASE(name) case Type::name: return host_row_dot_t<int(Type::name)>(w, K, q.data(), ds.data(), x);
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("host_row_dot: type without CUDA kernels");
    }
}

void host_dequantize(Type t, const uint8_t* w, int64_t n, float* y) {
    if (n % block_elems(t)) throw std::invalid_argument("host_dequantize: n is not a multiple of the block size");
    switch (t) {
#define RZ_CASE(name) case Type::name: host_dequantize_t<int(Type::name)>(w, n, y); return;
        RZ_CUDA_TYPES(RZ_CASE)
#undef RZ_CASE
        default: throw std::invalid_argument("host_dequantize: type without CUDA kernels");
    }
}

}  // namespace rz::cu
