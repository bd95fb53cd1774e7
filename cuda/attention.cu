// The small ops of the forward pass and attention over the paged KV cache, plus sampling:
//   rmsnorm (+ Q8 quantization of its output), SwiGLU, RoPE with the K/V cache write,
//   decode attention (one query token per item, split-K over positions, online softmax, GQA heads of one KV
//   head share each K/V tile in shared memory; optionally fused with RoPE and the cache write),
//   prefill attention (64-key tiles, QK^T and PV on tensor cores through WMMA),
//   argmax and top-k / top-p / min-p sampling per logits row, and the graph's step advance.
#include <mma.h>

#include <cfloat>
#include <stdexcept>

#include "kernels.cuh"

namespace rz::cu {

// ---- rmsnorm ------------------------------------------------------------------------------------------------
// grid (ceil(K / 256), n): every block sums the squares of its whole row (the row is small and in L2) and
// writes its 256-element slice, quantized to activation format fmt when q is set.
__global__ void __launch_bounds__(256) rmsnorm_kernel(const float* x, int64_t ldx, const int32_t* rows, int K,
                                                      const float* w, float eps, float* y, int64_t ldy, int fmt,
                                                      int8_t* q, float2* ds, int64_t ldq, int64_t ldds) {
    __shared__ float part[8];
    __shared__ float red[16];
    pdl_wait();
    const int r = blockIdx.y, tid = threadIdx.x, lane = tid & 31;
    const float* xr = x + int64_t(rows ? rows[r] : r) * ldx;
    float ss = 0.f;
    for (int i = tid; i < K; i += 256) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if (lane == 0) part[tid >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) total += part[i];
    const float scale = 1.0f / sqrtf(total / float(K) + eps);
    const int i = blockIdx.x * 256 + tid;
    const float v = i < K ? (xr[i] * scale) * w[i] : 0.f;
    if (i < K) y[r * ldy + i] = v;
    if (!q) return;
    if (fmt == kActQ8_K) {  // K is a multiple of 256: every thread of the block holds an element
        quant256(v, q + r * ldq + blockIdx.x * 256, ds + r * ldds + blockIdx.x * 8, red);
    } else if (i < K) {     // K is a multiple of 32: whole warps
        quant32<1>(&v, lane, fmt, q + r * ldq + i, ds + r * ldds + i / 32);
    }
}

void launch_rmsnorm(const float* x, int64_t ldx, const int32_t* rows, int n, int K, const float* w, float eps, float* y,
                    int64_t ldy, int fmt, int8_t* q, float2* ds, int64_t ldq, int64_t ldds, cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    if (K % 32 || (q && fmt == kActQ8_K && K % 256))
        throw std::invalid_argument("launch_rmsnorm: K must be a multiple of 32 (of 256 for Q8_K)");
    launch(rmsnorm_kernel, dim3((K + 255) / 256, n), dim3(256), 0, s, pdl, x, ldx, rows, K, w, eps, y, ldy, fmt, q,
           ds, ldq, ldds);
}

__global__ void swiglu_kernel(const float* g, const float* u, int64_t ld_in, int K, float* h, int64_t ldh) {
    pdl_wait();
    const int r = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < K) h[r * ldh + i] = silu_mul(g[r * ld_in + i], u[r * ld_in + i]);
}

void launch_swiglu(const float* g, const float* u, int64_t ld_in, int n, int K, float* h, int64_t ldh, cudaStream_t s,
                   bool pdl) {
    if (n <= 0) return;
    launch(swiglu_kernel, dim3((K + 255) / 256, n), dim3(256), 0, s, pdl, g, u, ld_in, K, h, ldh);
}

// ---- RoPE + K/V into the cache ------------------------------------------------------------------------------
__device__ __forceinline__ int64_t cache_slot(const StepTables& st, int seq, int pos, int bs) {
    return int64_t(st.bt[st.seq_bt_off[seq] + pos / bs]) * bs + pos % bs;
}

// Rotates the pairs of one head (x: head_dim floats) by the angles of position pos; threads i0, i0 + stride...
__device__ __forceinline__ void rope_pair(float* x, int i, int half, bool neox, float c, float s) {
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x0 * s + x1 * c;
}

__global__ void __launch_bounds__(128) rope_kv_kernel(AttnLayer L, StepTables st) {
    pdl_wait();
    const int t = blockIdx.x, tid = threadIdx.x;
    const int p = st.pos[t], half = L.n_rot / 2, hd = L.head_dim;
    const int q_dim = L.n_head * hd, kv_dim = L.n_head_kv * hd;
    float* row = L.qkv + t * L.ld_qkv;
    const float* ct = L.rope_cos + int64_t(p) * half;
    const float* sn = L.rope_sin + int64_t(p) * half;
    // Q heads then K heads are contiguous in the row
    for (int idx = tid; idx < (L.n_head + L.n_head_kv) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        rope_pair(row + h * hd, i, half, L.neox, ct[i], sn[i]);
    }
    __syncthreads();
    const int64_t slot = cache_slot(st, st.seq[t], p, L.block_size);
    __half* kd = L.k_cache + slot * kv_dim;
    __half* vd = L.v_cache + slot * kv_dim;
    for (int e = tid; e < kv_dim; e += blockDim.x) {
        kd[e] = __float2half_rn(row[q_dim + e]);
        vd[e] = __float2half_rn(row[q_dim + kv_dim + e]);
    }
}

void launch_rope_kv(const AttnLayer& L, const StepTables& st, int T, cudaStream_t s, bool pdl) {
    if (T <= 0) return;
    launch(rope_kv_kernel, dim3(T), dim3(128), 0, s, pdl, L, st);
}

bool head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }
int prefill_tile(int head_dim) { return head_dim == 64 ? 64 : 32; }
constexpr int kDecodeMaxHeads = 8;  // query heads per decode block
int decode_head_chunks(int n_head, int n_head_kv) {
    const int group = n_head / n_head_kv;
    return (group + kDecodeMaxHeads - 1) / kDecodeMaxHeads;
}

// ---- decode attention -----------------------------------------------------------------------------------------
// grid (n_items, n_head_kv * n_chunks, max_split); block 32 * max(heads, 2) threads: warp w < hc owns query
// head h0 + w. Positions [z * split_len, min((z + 1) * split_len, pos + 1)) in tiles of 64: the block loads a
// tile of K and V (halves) into shared memory, each head's warp scores it (lane = position), updates its online
// softmax and accumulates V (lane = dims). With several active splits, each writes (m, l, acc) and the last
// block to finish combines them (a counter per item and head chunk).
constexpr int kTile = 64;

struct DecodeArgs {
    AttnLayer L;
    StepTables st;
    const int32_t* items;
    int n_chunks;
    bool fused;
    int split_len, max_split;
    DecodeScratch scr;
    Q8Out q8;
};

// A warp's outputs of one head (lane holds dims DPL * lane + i) to out, and (when requested) quantized per 32
// dims in Q8_0 or Q8_1 (the lanes of a 32-group reduce together): the activations of the wo product.
template <int HD>
__device__ __forceinline__ void store_head(const AttnLayer& L, const Q8Out& q8, int t, int h, int lane,
                                           const float* v) {
    constexpr int DPL = HD / 32;
    const int col = h * HD + DPL * lane;
    float* o = L.out + t * L.ld_out + col;
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = v[i];
    if (q8.q) quant32<DPL>(v, lane, q8.fmt, q8.q + t * q8.ldq + col, q8.ds + t * q8.ldds + col / 32);
}

template <int HD>
__global__ void __launch_bounds__(32 * kDecodeMaxHeads) attn_decode_kernel(DecodeArgs a) {
    constexpr int LD = HD + 2;       // K/V tile row stride in halves: 4-byte aligned, rows in distinct banks
    constexpr int DPL = HD / 32;     // dims per lane in the V accumulation
    __shared__ float qs[kDecodeMaxHeads][HD];
    __shared__ __align__(16) __half ks[kTile][LD];
    __shared__ __align__(16) __half vs[kTile][LD];
    __shared__ __align__(16) __half knew[HD];
    __shared__ __align__(16) __half vnew[HD];
    __shared__ int s_last;

    const AttnLayer& L = a.L;
    const int item = blockIdx.x, kvh = blockIdx.y / a.n_chunks, chunk = blockIdx.y % a.n_chunks, z = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x;
    const int group = L.n_head / L.n_head_kv;
    const int h0 = kvh * group + chunk * kDecodeMaxHeads;
    const int hc = min(kDecodeMaxHeads, group - chunk * kDecodeMaxHeads);
    const int q_dim = L.n_head * HD, kv_dim = L.n_head_kv * HD;

    pdl_wait();
    const int t = a.items[item];
    const int pos = a.st.pos[t], seq = a.st.seq[t];
    const int n_active = (pos + a.split_len) / a.split_len;  // splits holding positions [0, pos]
    if (z >= n_active) return;
    const int begin = z * a.split_len, end = min(begin + a.split_len, pos + 1);
    const float* row = L.qkv + t * L.ld_qkv;

    for (int i = tid; i < hc * HD; i += nthreads) qs[i / HD][i % HD] = row[(h0 + i / HD) * HD + i % HD];
    __shared__ float kf[HD];
    if (a.fused)
        for (int i = tid; i < HD; i += nthreads) kf[i] = row[q_dim + kvh * HD + i];
    __syncthreads();
    if (a.fused) {
        const int half = L.n_rot / 2;
        const float* ct = L.rope_cos + int64_t(pos) * half;
        const float* sn = L.rope_sin + int64_t(pos) * half;
        for (int idx = tid; idx < (hc + 1) * half; idx += nthreads) {
            const int h = idx / half, i = idx % half;
            rope_pair(h < hc ? qs[h] : kf, i, half, L.neox, ct[i], sn[i]);
        }
        __syncthreads();
        for (int i = tid; i < HD; i += nthreads) {
            knew[i] = __float2half_rn(kf[i]);
            vnew[i] = __float2half_rn(row[q_dim + kv_dim + kvh * HD + i]);
        }
        __syncthreads();
        if (z == 0 && chunk == 0) {  // one block per (item, KV head) stores the new K and V
            const int64_t slot = cache_slot(a.st, seq, pos, L.block_size);
            for (int i = tid; i < HD; i += nthreads) {
                L.k_cache[slot * kv_dim + kvh * HD + i] = knew[i];
                L.v_cache[slot * kv_dim + kvh * HD + i] = vnew[i];
            }
        }
    }
    for (int i = tid; i < hc * HD; i += nthreads) qs[i / HD][i % HD] = round_f16(qs[i / HD][i % HD]);
    __syncthreads();

    float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] = 0.f;

    const int bt0 = a.st.seq_bt_off[seq];
    for (int j0 = begin; j0 < end; j0 += kTile) {
        const int rows = min(kTile, end - j0);
        // K and V tile: rows of HD halves, 8 halves per thread and step
        for (int c = tid; c < rows * (HD / 8); c += nthreads) {
            const int r = c / (HD / 8), k8 = (c % (HD / 8)) * 8, p = j0 + r;
            uint4 kv4, vv4;
            if (a.fused && p == pos) {
                kv4 = *reinterpret_cast<const uint4*>(&knew[k8]);
                vv4 = *reinterpret_cast<const uint4*>(&vnew[k8]);
            } else {
                const int64_t slot = int64_t(a.st.bt[bt0 + p / L.block_size]) * L.block_size + p % L.block_size;
                kv4 = *reinterpret_cast<const uint4*>(L.k_cache + slot * kv_dim + kvh * HD + k8);
                vv4 = *reinterpret_cast<const uint4*>(L.v_cache + slot * kv_dim + kvh * HD + k8);
            }
            const uint32_t* kw = reinterpret_cast<const uint32_t*>(&kv4);
            const uint32_t* vw = reinterpret_cast<const uint32_t*>(&vv4);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                *reinterpret_cast<uint32_t*>(&ks[r][k8 + 2 * i]) = kw[i];
                *reinterpret_cast<uint32_t*>(&vs[r][k8 + 2 * i]) = vw[i];
            }
        }
        __syncthreads();
        if (warp < hc) {
            const float* qh = qs[warp];
            float s0 = -INFINITY, s1 = -INFINITY;
            if (lane < rows) {
                float d0 = 0.f;
#pragma unroll 8
                for (int d = 0; d < HD; d += 2) {
                    const float2 k2 = __half22float2(*reinterpret_cast<const __half2*>(&ks[lane][d]));
                    d0 += qh[d] * k2.x;
                    d0 += qh[d + 1] * k2.y;
                }
                s0 = d0 * L.scale;
            }
            if (lane + 32 < rows) {
                float d1 = 0.f;
#pragma unroll 8
                for (int d = 0; d < HD; d += 2) {
                    const float2 k2 = __half22float2(*reinterpret_cast<const __half2*>(&ks[lane + 32][d]));
                    d1 += qh[d] * k2.x;
                    d1 += qh[d + 1] * k2.y;
                }
                s1 = d1 * L.scale;
            }
            const float m_new = fmaxf(m, warp_max(fmaxf(s0, s1)));
            const float corr = m == -INFINITY ? 0.f : expf(m - m_new);
            const float p0 = lane < rows ? expf(s0 - m_new) : 0.f;
            const float p1 = lane + 32 < rows ? expf(s1 - m_new) : 0.f;
            l = l * corr + warp_sum(p0 + p1);
            m = m_new;
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[i] *= corr;
            for (int r = 0; r < rows; ++r) {
                const float pr = __shfl_sync(0xffffffffu, r < 32 ? p0 : p1, r & 31);
                if (DPL == 2) {
                    const float2 v2 = __half22float2(*reinterpret_cast<const __half2*>(&vs[r][2 * lane]));
                    acc[0] += pr * v2.x;
                    acc[DPL - 1] += pr * v2.y;
                } else {
#pragma unroll
                    for (int i = 0; i < DPL; i += 2) {
                        const float2 v2 = __half22float2(*reinterpret_cast<const __half2*>(&vs[r][DPL * lane + i]));
                        acc[i] += pr * v2.x;
                        acc[i + 1] += pr * v2.y;
                    }
                }
            }
        }
        __syncthreads();
    }

    if (n_active == 1) {
        if (warp < hc) {
            const float inv = 1.f / l;
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[i] *= inv;
            store_head<HD>(L, a.q8, t, h0 + warp, lane, acc);
        }
        return;
    }
    // split-K: partial (m, l, acc) of this split, then the last block of the (item, head chunk) combines
    constexpr int PS = HD + 2;
    if (warp < hc) {
        float* part = a.scr.partial + ((int64_t(item) * L.n_head + h0 + warp) * a.max_split + z) * PS;
        if (lane == 0) {
            part[0] = m;
            part[1] = l;
        }
#pragma unroll
        for (int i = 0; i < DPL; ++i) part[2 + DPL * lane + i] = acc[i];
    }
    __threadfence();
    __syncthreads();
    int* counter = a.scr.counters + int64_t(item) * gridDim.y + blockIdx.y;
    if (tid == 0) s_last = atomicAdd(counter, 1) == n_active - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (warp < hc) {
        const float* part = a.scr.partial + (int64_t(item) * L.n_head + h0 + warp) * a.max_split * PS;
        float M = -INFINITY;
        for (int zz = 0; zz < n_active; ++zz) M = fmaxf(M, __ldcg(part + zz * PS));
        float Lsum = 0.f, o[DPL];
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] = 0.f;
        for (int zz = 0; zz < n_active; ++zz) {
            const float e = expf(__ldcg(part + zz * PS) - M);
            Lsum += __ldcg(part + zz * PS + 1) * e;
#pragma unroll
            for (int i = 0; i < DPL; ++i) o[i] += __ldcg(part + zz * PS + 2 + DPL * lane + i) * e;
        }
        const float inv = 1.f / Lsum;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] *= inv;
        store_head<HD>(L, a.q8, t, h0 + warp, lane, o);
    }
    if (tid == 0) *counter = 0;  // ready for the next launch
}

void launch_attn_decode(const AttnLayer& L, const StepTables& st, const int32_t* items, int n_items, bool fused,
                        int split_len, int max_split, const DecodeScratch& scratch, const Q8Out& q8, cudaStream_t s,
                        bool pdl) {
    if (n_items <= 0) return;
    if (split_len <= 0 || split_len % kTile) throw std::invalid_argument("launch_attn_decode: split_len must be a multiple of 64");
    const int group = L.n_head / L.n_head_kv;
    const int n_chunks = decode_head_chunks(L.n_head, L.n_head_kv);
    const int heads = group < kDecodeMaxHeads ? group : kDecodeMaxHeads;
    DecodeArgs a{L, st, items, n_chunks, fused, split_len, max_split, scratch, q8};
    const dim3 grid(n_items, L.n_head_kv * n_chunks, max_split), block(32 * (heads < 2 ? 2 : heads));
    if (L.head_dim == 64) launch(attn_decode_kernel<64>, grid, block, 0, s, pdl, a);
    else if (L.head_dim == 128) launch(attn_decode_kernel<128>, grid, block, 0, s, pdl, a);
    else throw std::invalid_argument("launch_attn_decode: head_dim must be 64 or 128");
}

// ---- prefill attention (tensor cores) -----------------------------------------------------------------------
// grid (n_items, n_head), 256 threads. An item is up to BQ consecutive tokens of one sequence; the block walks
// 64-key tiles of the cache up to the last query's position: S = Q K^T (WMMA, float), a masked online softmax
// on S (P rounded to half), O_tile = P V (WMMA), O = O * corr + O_tile in shared memory.
template <int HD, int BQ>
struct PrefillSmem {
    static constexpr int LDH = HD + 8;                      // Q, K, V rows (halves)
    static constexpr int LDS = 68;                          // S rows (floats)
    static constexpr int LDP = 72;                          // P rows (halves)
    static constexpr int LDO = HD + 4;                      // O rows (floats)
    static constexpr int SO = (LDS > LDO ? LDS : LDO);      // S and O_tile share a region
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + size_t(BQ) * LDH * 2;
    static constexpr size_t v_off = k_off + size_t(kTile) * LDH * 2;
    static constexpr size_t s_off = v_off + size_t(kTile) * LDH * 2;
    static constexpr size_t p_off = s_off + size_t(BQ) * SO * 4;
    static constexpr size_t o_off = p_off + size_t(BQ) * LDP * 2;
    static constexpr size_t c_off = o_off + size_t(BQ) * LDO * 4;  // corr[BQ], l[BQ]
    static constexpr size_t bytes = c_off + size_t(2 * BQ) * 4;
    static_assert(k_off % 128 == 0 && v_off % 128 == 0 && s_off % 128 == 0 && p_off % 128 == 0 && o_off % 128 == 0,
                  "prefill shared-memory regions must stay 128-byte aligned");
};

template <int HD, int BQ>
__global__ void __launch_bounds__(256) attn_prefill_kernel(AttnLayer L, StepTables st, const int32_t* items) {
    namespace wmma = nvcuda::wmma;
    using SM = PrefillSmem<HD, BQ>;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* Qs = reinterpret_cast<__half*>(smem + SM::q_off);
    __half* Ks = reinterpret_cast<__half*>(smem + SM::k_off);
    __half* Vs = reinterpret_cast<__half*>(smem + SM::v_off);
    float* S = reinterpret_cast<float*>(smem + SM::s_off);
    __half* P = reinterpret_cast<__half*>(smem + SM::p_off);
    float* O = reinterpret_cast<float*>(smem + SM::o_off);
    float* corr_s = reinterpret_cast<float*>(smem + SM::c_off);
    float* l_s = corr_s + BQ;

    constexpr int TPR = 256 / BQ;         // softmax threads per query row
    constexpr int CPT = kTile / TPR;      // key columns per softmax thread
    const int tid = threadIdx.x, warp = tid >> 5;
    const int h = blockIdx.y, kvh = h / (L.n_head / L.n_head_kv);
    const int kv_dim = L.n_head_kv * HD;

    pdl_wait();
    const int seq = items[3 * blockIdx.x], t0 = items[3 * blockIdx.x + 1], nq = items[3 * blockIdx.x + 2];
    const int last = st.pos[t0 + nq - 1];
    const int bt0 = st.seq_bt_off[seq];

    for (int i = tid; i < BQ * HD; i += 256) {
        const int r = i / HD, d = i % HD;
        Qs[r * SM::LDH + d] = __float2half_rn(r < nq ? L.qkv[(t0 + r) * L.ld_qkv + h * HD + d] : 0.f);
        O[r * SM::LDO + d] = 0.f;
    }
    // softmax row state, identical in the TPR threads of a row
    const int srow = tid / TPR, scol = tid % TPR;
    const int qpos = srow < nq ? st.pos[t0 + srow] : -1;
    float m_i = -INFINITY, l_i = 0.f;

    for (int j0 = 0; j0 <= last; j0 += kTile) {
        for (int c = tid; c < kTile * (HD / 8); c += 256) {
            const int r = c / (HD / 8), k8 = (c % (HD / 8)) * 8, p = j0 + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (p <= last) {
                const int64_t slot = int64_t(st.bt[bt0 + p / L.block_size]) * L.block_size + p % L.block_size;
                kv4 = *reinterpret_cast<const uint4*>(L.k_cache + slot * kv_dim + kvh * HD + k8);
                vv4 = *reinterpret_cast<const uint4*>(L.v_cache + slot * kv_dim + kvh * HD + k8);
            }
            *reinterpret_cast<uint4*>(Ks + r * SM::LDH + k8) = kv4;
            *reinterpret_cast<uint4*>(Vs + r * SM::LDH + k8) = vv4;
        }
        __syncthreads();
        // S[BQ][64] = Q K^T
        constexpr int SF = (BQ / 16) * (kTile / 16);
        for (int f = warp; f < SF; f += 8) {
            const int fi = f / (kTile / 16), fj = f % (kTile / 16);
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, Qs + fi * 16 * SM::LDH + kk * 16, SM::LDH);
                wmma::load_matrix_sync(fb, Ks + fj * 16 * SM::LDH + kk * 16, SM::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(S + fi * 16 * SM::SO + fj * 16, acc, SM::SO, wmma::mem_row_major);
        }
        __syncthreads();
        // masked online softmax of row srow over this tile's columns scol, scol + TPR, ...
        {
            float v[CPT];
            float mt = -INFINITY;
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
                const int c = scol + k * TPR;
                v[k] = (j0 + c <= qpos) ? S[srow * SM::SO + c] * L.scale : -INFINITY;
                mt = fmaxf(mt, v[k]);
            }
#pragma unroll
            for (int o = TPR / 2; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            const float m_new = fmaxf(m_i, mt);
            float corr = 1.f, sum = 0.f;
            if (m_new == -INFINITY) {  // no visible key yet (rows past nq): keep zeros
#pragma unroll
                for (int k = 0; k < CPT; ++k) P[srow * SM::LDP + scol + k * TPR] = __float2half_rn(0.f);
            } else {
                corr = m_i == -INFINITY ? 0.f : expf(m_i - m_new);
#pragma unroll
                for (int k = 0; k < CPT; ++k) {
                    const __half ph = __float2half_rn(expf(v[k] - m_new));
                    P[srow * SM::LDP + scol + k * TPR] = ph;
                    sum += __half2float(ph);
                }
            }
#pragma unroll
            for (int o = TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            l_i = l_i * corr + sum;
            m_i = m_new;
            if (scol == 0) corr_s[srow] = corr;
        }
        __syncthreads();
        // O_tile[BQ][HD] = P V, into the S region
        constexpr int OF = (BQ / 16) * (HD / 16);
        for (int f = warp; f < OF; f += 8) {
            const int fi = f / (HD / 16), fj = f % (HD / 16);
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < kTile / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, P + fi * 16 * SM::LDP + kk * 16, SM::LDP);
                wmma::load_matrix_sync(fb, Vs + kk * 16 * SM::LDH + fj * 16, SM::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(S + fi * 16 * SM::SO + fj * 16, acc, SM::SO, wmma::mem_row_major);
        }
        __syncthreads();
        for (int i = tid; i < BQ * HD; i += 256) {
            const int r = i / HD, d = i % HD;
            O[r * SM::LDO + d] = O[r * SM::LDO + d] * corr_s[r] + S[r * SM::SO + d];
        }
        __syncthreads();
    }
    if (scol == 0) l_s[srow] = l_i;
    __syncthreads();
    for (int i = tid; i < nq * HD; i += 256) {
        const int r = i / HD, d = i % HD;
        L.out[(t0 + r) * L.ld_out + h * HD + d] = O[r * SM::LDO + d] / l_s[r];
    }
}

template <int HD, int BQ>
void launch_prefill_t(const AttnLayer& L, const StepTables& st, const int32_t* items, int n_items, cudaStream_t s,
                      bool pdl) {
    const size_t bytes = PrefillSmem<HD, BQ>::bytes;
    static bool attr_set = false;  // per device in practice: one GPU per process here
    if (!attr_set) {
        RZ_CUDA_CHECK(cudaFuncSetAttribute(attn_prefill_kernel<HD, BQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(bytes)));
        attr_set = true;
    }
    launch(attn_prefill_kernel<HD, BQ>, dim3(n_items, L.n_head), dim3(256), bytes, s, pdl, L, st, items);
}

void launch_attn_prefill(const AttnLayer& L, const StepTables& st, const int32_t* items, int n_items, cudaStream_t s,
                         bool pdl) {
    if (n_items <= 0) return;
    if (L.head_dim == 64) launch_prefill_t<64, 64>(L, st, items, n_items, s, pdl);
    else if (L.head_dim == 128) launch_prefill_t<128, 32>(L, st, items, n_items, s, pdl);
    else throw std::invalid_argument("launch_attn_prefill: head_dim must be 64 or 128");
}

// ---- sampling -----------------------------------------------------------------------------------------------
// (value, index) maximum with NaN as -inf and ties to the lower index (numpy's argmax).
__device__ __forceinline__ void arg_better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ int block_argmax(const float* x, int V) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = x[i];
        if (!isnan(v)) arg_better(bv, bi, v, i);
    }
    for (int o = 16; o > 0; o >>= 1) arg_better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // sv/si may still be read by a previous call
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) arg_better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
        if (lane == 0) si[0] = bi == 0x7fffffff ? 0 : bi;
    }
    __syncthreads();
    return si[0];
}

__global__ void __launch_bounds__(1024) argmax_kernel(const float* logits, int64_t ld, int V, int32_t* out) {
    pdl_wait();
    const int r = blockIdx.x;
    const int best = block_argmax(logits + r * ld, V);
    if (threadIdx.x == 0) out[r] = best;
}

void launch_argmax(const float* logits, int64_t ld, int n, int V, int32_t* out, cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    launch(argmax_kernel, dim3(n), dim3(1024), 0, s, pdl, logits, ld, V, out);
}

// Order-preserving key of a float (NaN lowest).
__device__ __forceinline__ uint32_t float_key(float f) {
    if (isnan(f)) return 0u;
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block of 1024 threads per row: temperature, then the top_k most likely tokens (radix select of the k-th
// key, then a bitonic sort of the candidates by value desc, index asc), then top_p and min_p on their softmax,
// then the token whose cumulative probability first exceeds u.
constexpr int kSortCap = 2 * kMaxSampleCandidates;

__global__ void __launch_bounds__(1024) sample_kernel(const float* logits, int64_t ld, int V,
                                                      const SampleParams* params, int32_t* out) {
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_need, s_count;
    __shared__ unsigned long long cand[kSortCap];
    __shared__ float cum[kMaxSampleCandidates];
    __shared__ int s_n;
    pdl_wait();
    const int r = blockIdx.x, tid = threadIdx.x;
    const float* x = logits + r * ld;
    const SampleParams sp = params[r];
    if (!(sp.temperature > 0.f) || sp.top_k == 1) {
        const int best = block_argmax(x, V);
        if (tid == 0) out[r] = best;
        return;
    }
    const int K = min(V, sp.top_k > 0 ? min(sp.top_k, kMaxSampleCandidates) : kMaxSampleCandidates);

    // radix select: the key of the K-th largest logit
    if (tid == 0) {
        s_prefix = 0;
        s_need = unsigned(K);
    }
    unsigned mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const unsigned prefix = s_prefix;
        for (int i = tid; i < V; i += blockDim.x) {
            const uint32_t k = float_key(x[i]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            unsigned cum_gt = 0, need = s_need;
            for (int d = 255; d >= 0; --d) {
                if (cum_gt + hist[d] >= need) {
                    s_prefix = prefix | (unsigned(d) << shift);
                    s_need = need - cum_gt;
                    break;
                }
                cum_gt += hist[d];
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t thr = s_prefix;
    // candidates: every key >= thr (at least K), up to kSortCap, as (key << 32 | ~index) sorted descending
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int i = tid; i < V; i += blockDim.x) {
        const uint32_t k = float_key(x[i]);
        if (k >= thr) {
            const unsigned slot = atomicAdd(&s_count, 1u);
            if (slot < unsigned(kSortCap)) cand[slot] = (static_cast<unsigned long long>(k) << 32) | (0xffffffffu - uint32_t(i));
        }
    }
    __syncthreads();
    const int n_cand = min(int(s_count), kSortCap);
    for (int i = n_cand + tid; i < kSortCap; i += blockDim.x) cand[i] = 0ull;
    __syncthreads();
    for (int size = 2; size <= kSortCap; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < kSortCap; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool desc = (i & size) == 0;
                    const unsigned long long a = cand[i], b = cand[j];
                    if ((a < b) == desc) {
                        cand[i] = b;
                        cand[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    // probabilities of the top K (cand[0] is the largest logit), cumulative, in one warp
    const float inv_t = 1.f / sp.temperature;
    if (tid < 32) {
        auto logit_of = [&](int i) { return x[0xffffffffu - uint32_t(cand[i] & 0xffffffffull)]; };
        const float top = logit_of(0);
        constexpr int PER = kMaxSampleCandidates / 32;
        float local[PER];
        float run = 0.f;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = tid * PER + k;
            const float p = i < K ? expf((logit_of(i) - top) * inv_t) : 0.f;
            run += p;
            local[k] = run;
        }
        float offset = run;  // inclusive scan of the lanes' totals
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, offset, o);
            if (tid >= o) offset += y;
        }
        offset -= run;
#pragma unroll
        for (int k = 0; k < PER; ++k) cum[tid * PER + k] = local[k] + offset;
    }
    __syncthreads();
    if (tid == 0) {
        const float total = cum[K - 1];
        int n = K;
        if (sp.top_p < 1.f) {  // smallest prefix holding top_p of the mass
            int i = 0;
            while (i < K - 1 && cum[i] < sp.top_p * total) ++i;
            n = i + 1;
        }
        if (sp.min_p > 0.f) {  // p_i / p_0 >= min_p
            int i = 1;
            while (i < n && (cum[i] - cum[i - 1]) >= sp.min_p * cum[0]) ++i;
            n = i;
        }
        s_n = n;
    }
    __syncthreads();
    const int n = s_n;
    const float target = sp.u * cum[n - 1];
    for (int i = tid; i < n; i += blockDim.x) {
        const float lo = i ? cum[i - 1] : 0.f;
        if ((lo <= target && target < cum[i]) || (i == n - 1 && target >= cum[i]))
            out[r] = int32_t(0xffffffffu - uint32_t(cand[i] & 0xffffffffull));
    }
}

void launch_sample(const float* logits, int64_t ld, int n, int V, const SampleParams* params, int32_t* out,
                   cudaStream_t s, bool pdl) {
    if (n <= 0) return;
    launch(sample_kernel, dim3(n), dim3(1024), 0, s, pdl, logits, ld, V, params, out);
}

__global__ void advance_kernel(const int32_t* sampled, int B, int32_t* tokens, int32_t* pos, int32_t* out,
                               int32_t* step) {
    pdl_wait();
    const int b = threadIdx.x;
    const int k = *step;
    if (b < B) {
        tokens[b] = sampled[b];
        pos[b] += 1;
        out[int64_t(k) * B + b] = sampled[b];
    }
    __syncthreads();
    if (b == 0) *step = k + 1;
}

void launch_advance(const int32_t* sampled, int B, int32_t* tokens, int32_t* pos, int32_t* out, int32_t* step,
                    cudaStream_t s, bool pdl) {
    if (B > 1024) throw std::invalid_argument("launch_advance: at most 1024 sequences");
    launch(advance_kernel, dim3(1), dim3(B < 32 ? 32 : B), 0, s, pdl, sampled, B, tokens, pos, out, step);
}

}  // namespace rz::cu
