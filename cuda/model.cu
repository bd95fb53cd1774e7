// The llama-family forward step on the GPU, with the CPU core's contract: a batch of sequences, each with its
// new tokens, first position and block table into a paged KV cache -> logits of the requested rows.
//
// Weights are uploaded once in their GGUF block types (Q, K and V concatenated, gate and up interleaved row
// by row where their types match, so one product computes each). Per step and layer:
//   rmsnorm (+Q8) -> QKV product (+bias) -> [RoPE + K/V write] -> attention -> [Q8] -> wo product (+= x)
//   -> rmsnorm (+Q8) -> gate/up product with SwiGLU -> [Q8] -> down product (+= x)
// then the final norm of the rows that want logits and the output head. Products with at most
// kMatvecMaxRows rows use the matrix-vector kernels, larger ones the tensor-core kernel. decode_greedy runs
// whole decode steps (argmax and the step advance included) as one CUDA graph per batch size.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "kernels.cuh"
#include "matmul.h"  // rz::traits: host dequantizers for the 1-D tensors

namespace rz::cu {

void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
    throw CudaError(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " + what +
                    " at " + file + ":" + std::to_string(line));
}

// ---- device memory ------------------------------------------------------------------------------------------
class DeviceMem {
public:
    DeviceMem() = default;
    explicit DeviceMem(size_t bytes) { alloc(bytes); }
    ~DeviceMem() { release(); }
    DeviceMem(const DeviceMem&) = delete;
    DeviceMem& operator=(const DeviceMem&) = delete;
    void alloc(size_t bytes) {
        release();
        if (bytes) RZ_CUDA_CHECK(cudaMalloc(&p_, bytes));
        n_ = bytes;
    }
    void release() {
        if (p_) cudaFree(p_);
        p_ = nullptr;
        n_ = 0;
    }
    template <typename T> T* as() const { return static_cast<T*>(p_); }
    size_t size() const { return n_; }

private:
    void* p_ = nullptr;
    size_t n_ = 0;
};

class PinnedMem {
public:
    ~PinnedMem() { release(); }
    void alloc(size_t bytes) {
        release();
        if (bytes) RZ_CUDA_CHECK(cudaMallocHost(&p_, bytes));
        n_ = bytes;
    }
    void release() {
        if (p_) cudaFreeHost(p_);
        p_ = nullptr;
        n_ = 0;
    }
    template <typename T> T* as() const { return static_cast<T*>(p_); }
    size_t size() const { return n_; }

private:
    void* p_ = nullptr;
    size_t n_ = 0;
};

template <typename T>
void upload(DeviceMem& d, const T* src, size_t n) {
    d.alloc(std::max<size_t>(n * sizeof(T), 16));
    if (n) RZ_CUDA_CHECK(cudaMemcpy(d.as<void>(), src, n * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
void download(T* dst, const DeviceMem& d, size_t n) {
    if (n) RZ_CUDA_CHECK(cudaMemcpy(dst, d.as<void>(), n * sizeof(T), cudaMemcpyDeviceToHost));
}

// ---- device queries --------------------------------------------------------------------------------------------
int device_count() noexcept {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

DeviceInfo device_info() {
    if (device_count() < 1) throw CudaError("no CUDA device available");
    int dev = 0;
    RZ_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    RZ_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    DeviceInfo info;
    info.name = prop.name;
    info.cc_major = prop.major;
    info.cc_minor = prop.minor;
    info.sm_count = prop.multiProcessorCount;
    info.l2_bytes = prop.l2CacheSize;
    RZ_CUDA_CHECK(cudaMemGetInfo(&info.free_mem, &info.total_mem));
    RZ_CUDA_CHECK(cudaDriverGetVersion(&info.driver_version));
    RZ_CUDA_CHECK(cudaRuntimeGetVersion(&info.runtime_version));
    return info;
}

size_t device_used_bytes() {
    size_t free_b = 0, total_b = 0;
    RZ_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return total_b - free_b;
}

double measure_copy_bandwidth(size_t bytes, int reps) {
    DeviceMem a(bytes), b(bytes);
    RZ_CUDA_CHECK(cudaMemset(a.as<void>(), 1, bytes));
    cudaEvent_t e0, e1;
    RZ_CUDA_CHECK(cudaEventCreate(&e0));
    RZ_CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < reps + 2; ++i) {
        RZ_CUDA_CHECK(cudaEventRecord(e0));
        RZ_CUDA_CHECK(cudaMemcpy(b.as<void>(), a.as<void>(), bytes, cudaMemcpyDeviceToDevice));
        RZ_CUDA_CHECK(cudaEventRecord(e1));
        RZ_CUDA_CHECK(cudaEventSynchronize(e1));
        float t = 0.f;
        RZ_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (i >= 2) ms.push_back(t);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::sort(ms.begin(), ms.end());
    const double t = ms[ms.size() / 2] * 1e-3;
    return 2.0 * double(bytes) / t / 1e9;
}

// ---- KV cache ---------------------------------------------------------------------------------------------------
DeviceKV::DeviceKV(int n_layer, int kv_dim, int n_blocks, int block_size)
    : n_layer_(n_layer), kv_dim_(kv_dim), n_blocks_(n_blocks), block_size_(block_size) {
    if (n_layer < 1 || kv_dim < 1 || n_blocks < 1 || block_size < 1 || kv_dim % 8)
        throw std::invalid_argument("DeviceKV: every dimension must be >= 1 and kv_dim a multiple of 8");
    elems_ = size_t(n_layer) * size_t(n_blocks) * size_t(block_size) * size_t(kv_dim);
    RZ_CUDA_CHECK(cudaMalloc(&k_, elems_ * 2));
    const cudaError_t e = cudaMalloc(&v_, elems_ * 2);
    if (e != cudaSuccess) {
        cudaFree(k_);
        throw_cuda(e, "cudaMalloc(KV cache)", __FILE__, __LINE__);
    }
    RZ_CUDA_CHECK(cudaMemset(k_, 0, elems_ * 2));
    RZ_CUDA_CHECK(cudaMemset(v_, 0, elems_ * 2));
    // the model runs on non-blocking streams, unordered with these default-stream memsets: finish them now
    RZ_CUDA_CHECK(cudaDeviceSynchronize());
}

DeviceKV::~DeviceKV() {
    cudaFree(k_);
    cudaFree(v_);
}

void DeviceKV::copy_block(int src, int dst) {
    if (src < 0 || src >= n_blocks_ || dst < 0 || dst >= n_blocks_)
        throw std::invalid_argument("copy_block: block id out of range");
    const size_t block = size_t(block_size_) * kv_dim_ * 2, pitch = layer_stride() * 2;
    RZ_CUDA_CHECK(cudaDeviceSynchronize());  // the model's streams are not ordered with the default stream
    for (uint16_t* base : {k_, v_})
        RZ_CUDA_CHECK(cudaMemcpy2D(reinterpret_cast<char*>(base) + dst * block, pitch,
                                   reinterpret_cast<char*>(base) + src * block, pitch, block, n_layer_,
                                   cudaMemcpyDeviceToDevice));
    RZ_CUDA_CHECK(cudaDeviceSynchronize());
}

void DeviceKV::download_layer(int layer, uint16_t* k, uint16_t* v) const {
    if (layer < 0 || layer >= n_layer_) throw std::invalid_argument("download_layer: layer out of range");
    RZ_CUDA_CHECK(cudaDeviceSynchronize());
    RZ_CUDA_CHECK(cudaMemcpy(k, k_ + layer * layer_stride(), layer_stride() * 2, cudaMemcpyDeviceToHost));
    RZ_CUDA_CHECK(cudaMemcpy(v, v_ + layer * layer_stride(), layer_stride() * 2, cudaMemcpyDeviceToHost));
}

// ---- the model ---------------------------------------------------------------------------------------------
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

const HostTensor* find(const std::map<std::string, HostTensor>& m, const std::string& name) {
    auto it = m.find(name);
    return it == m.end() ? nullptr : &it->second;
}

size_t type_row_bytes(Type t, int64_t cols) {
    const TypeTraits& tt = traits(t, Isa::Scalar);
    if (!tt.name || cols % tt.block_size) throw std::invalid_argument("bad row length for the tensor type");
    return size_t(cols / tt.block_size) * tt.type_size;
}

void check_tensor(const std::string& what, const HostTensor& t, const std::vector<int64_t>& shape) {
    if (!::rz::type_supported(t.type)) throw std::invalid_argument(what + ": unsupported tensor type id " + std::to_string(int(t.type)));
    if (t.shape != shape)
        throw std::invalid_argument(what + ": shape " + shape_str(t.shape) + ", expected " + shape_str(shape));
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const TypeTraits& tt = traits(t.type, Isa::Scalar);
    if (shape.back() % tt.block_size || size_t(n / tt.block_size) * tt.type_size != t.nbytes || !t.data)
        throw std::invalid_argument(what + ": " + std::to_string(t.nbytes) + " bytes do not hold " + tt.name + " " +
                                    shape_str(shape));
}

uint16_t* f32_rows_to_f16(const HostTensor& t, std::vector<uint16_t>& buf) {
    const size_t n = t.nbytes / 4;
    buf.resize(n);
    const float* src = static_cast<const float*>(t.data);
    for (size_t i = 0; i < n; ++i) buf[i] = f32_to_f16(src[i]);
    return buf.data();
}

}  // namespace

struct DLayer {
    const float* attn_norm = nullptr;
    const float* ffn_norm = nullptr;
    bool qkv_fused = false, gu_fused = false;
    MatRef qkv, wq, wk, wv;  // qkv when fused, else the three
    const float* bqkv = nullptr;  // [q_dim + 2 kv_dim] or null
    MatRef gu, w1, w3;       // gu (rows 2i = gate i, 2i + 1 = up i) when fused
    MatRef wo, w2;
};

// Device pointers of one step's inputs.
struct StepDev {
    int T = 0;
    const int32_t* tokens = nullptr;
    StepTables st;
    const int32_t* dec_items = nullptr;
    int n_dec = 0;
    const int32_t* pre_items = nullptr;
    int n_pre = 0;
    bool fused = false;
    int split_len = 64, max_split = 1;
    const int32_t* logit_rows = nullptr;
    int L = 0;
};

struct GraphState {
    int B = 0, max_blocks = 0, split_len = 64, max_split = 1, cap_steps = 0;
    uint64_t cache_id = 0;
    DeviceMem meta;  // tokens, pos, seq, bt_off, tok0, items, bt, sampled, step, out
    int32_t *tokens = nullptr, *pos = nullptr, *seq = nullptr, *bt_off = nullptr, *tok0 = nullptr, *items = nullptr,
            *pre = nullptr, *bt = nullptr, *sampled = nullptr, *step = nullptr, *out = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~GraphState() {
        if (exec) cudaGraphExecDestroy(exec);
    }
};

constexpr int kMaxSplit = 32;

class DeviceModel {
public:
    ModelConfig cfg;
    ModelOptions opt;
    int q_dim = 0, kv_dim = 0, qkv_dim = 0, hd = 0, n_chunks = 1, kmax = 0, sm_count = 1;
    bool pdl = false;
    std::vector<float> rope_freqs;
    DeviceMem arena;
    size_t weight_bytes = 0, token_bytes = 0;
    MatRef tok_emb, output;
    const float* norm = nullptr;
    std::vector<DLayer> layers;
    DeviceMem rope_cos, rope_sin;
    cudaStream_t stream = nullptr;
    std::mutex mu;
    bool any_unfused_gu = false;
    int n_formats = 1;  // most distinct Q8 formats one activation feeds

    // scratch, grown to the largest step seen
    int cap_T = 0, cap_L = 0, cap_D = 0;
    size_t cap_meta = 0;
    DeviceMem x, xn, aq[3], ads[3], qkv, att, h, gu, logits, sampled, params, partial, counters, meta, gemm_ws;
    PinnedMem meta_h;
    std::map<std::pair<int, uint64_t>, std::unique_ptr<GraphState>> graphs;

    ~DeviceModel() {
        graphs.clear();
        if (stream) cudaStreamDestroy(stream);
    }

    bool use_matvec(int n) const { return !opt.batch_invariant && n <= kMatvecMaxRows; }

    void mm(const MatRef& W, const ActView& a, int n, float* y, int64_t ldy, Epi epi, const float* bias) {
        if (use_matvec(n)) launch_matvec(W, a, n, y, ldy, epi, bias, stream, pdl);
        else launch_gemm(W, a, n, y, ldy, epi, bias, stream, pdl, gemm_work());
    }

    GemmWork gemm_work() {  // the split-K workspace: its size depends on the SM count alone
        if (!gemm_ws.size()) gemm_ws.alloc(gemm_work_floats(sm_count) * 4);
        return GemmWork{gemm_ws.as<float>(), gemm_ws.size() / 4, sm_count, opt.batch_invariant};
    }

    int choose_split_len(int n_items, int max_len) const {
        int split;
        if (opt.batch_invariant) {
            split = std::max(256, (opt.n_ctx + kMaxSplit - 1) / kMaxSplit);
        } else {
            const int blocks = std::max(1, n_items * cfg.n_head_kv * n_chunks);
            const int want = std::max(1, (2 * sm_count + blocks - 1) / blocks);
            split = (max_len + want - 1) / want;
            split = std::max(split, (max_len + kMaxSplit - 1) / kMaxSplit);
        }
        split = std::max(64, (split + 63) / 64 * 64);
        return split;
    }

    void ensure_scratch(int T, int L, int D, size_t meta_ints) {
        if (T <= cap_T && L <= cap_L && D <= cap_D && meta_ints <= cap_meta) return;
        RZ_CUDA_CHECK(cudaStreamSynchronize(stream));
        graphs.clear();  // their kernels hold the old pointers
        cap_T = std::max(T, cap_T);
        cap_L = std::max(L, cap_L);
        cap_D = std::max(D, cap_D);
        cap_meta = std::max(meta_ints, cap_meta);
        const size_t R = size_t(std::max(cap_T, cap_L));
        x.alloc(size_t(cap_T) * cfg.n_embd * 4);
        xn.alloc(R * cfg.n_embd * 4);
        for (int j = 0; j < 3; ++j) {  // one quantized copy per activation format in use (almost always one)
            aq[j].alloc(j < n_formats ? R * kmax : 0);
            ads[j].alloc(j < n_formats ? R * (kmax / 32) * sizeof(float2) : 0);
        }
        qkv.alloc(size_t(cap_T) * qkv_dim * 4);
        att.alloc(size_t(cap_T) * q_dim * 4);
        h.alloc(size_t(cap_T) * cfg.n_ff * 4);
        if (any_unfused_gu) gu.alloc(size_t(cap_T) * 2 * cfg.n_ff * 4);
        logits.alloc(size_t(cap_L) * cfg.n_vocab * 4);
        sampled.alloc(size_t(cap_L) * 4);
        params.alloc(size_t(cap_L) * sizeof(SampleParams));
        partial.alloc(size_t(cap_D) * cfg.n_head * kMaxSplit * (hd + 2) * 4);
        counters.alloc(size_t(cap_D) * cfg.n_head_kv * n_chunks * 4);
        RZ_CUDA_CHECK(cudaMemsetAsync(counters.as<void>(), 0, counters.size(), stream));
        meta.alloc(cap_meta * 4);
        meta_h.alloc(cap_meta * 4);
        gemm_work();
    }

    // The distinct Q8 formats the products ms need, in order (float weights need none).
    static int formats(std::initializer_list<const MatRef*> ms, int* out) {
        int n = 0;
        for (const MatRef* m : ms) {
            const int f = act_format(m->type);
            if (f == kActF32) continue;
            bool seen = false;
            for (int j = 0; j < n; ++j) seen |= out[j] == f;
            if (!seen) out[n++] = f;
        }
        return n;
    }

    // The activations of product M: floats f (row stride ldf) and the slot of M's Q8 format among fmts.
    ActView act_for(const MatRef& M, const float* f, int64_t ldf, const int* fmts, int nf) const {
        int slot = 0;
        for (int j = 0; j < nf; ++j)
            if (fmts[j] == act_format(M.type)) slot = j;
        return ActView{f, ldf, aq[slot].as<int8_t>(), ads[slot].as<float2>(), kmax, kmax / 32};
    }

    // Normed activations for the products ms: rmsnorm of x's rows (rows[i] or i) into xn, quantized into a
    // slot per format (the first by the norm kernel itself).
    void norm_for(std::initializer_list<const MatRef*> ms, const int32_t* rows, int n, const float* w, int* fmts,
                  int& nf) {
        const int E = cfg.n_embd;
        nf = formats(ms, fmts);
        launch_rmsnorm(x.as<float>(), E, rows, n, E, w, cfg.rms_eps, xn.as<float>(), E, nf ? fmts[0] : 0,
                       nf ? aq[0].as<int8_t>() : nullptr, ads[0].as<float2>(), kmax, kmax / 32, stream, pdl);
        for (int j = 1; j < nf; ++j)
            launch_quantize_q8(xn.as<float>(), E, n, E, fmts[j], aq[j].as<int8_t>(), ads[j].as<float2>(), kmax,
                               kmax / 32, stream, pdl);
    }

    // Enqueues one step on `stream`; logits of the L rows land in `logits`.
    void enqueue_step(const StepDev& s, DeviceKV& cache) {
        const ModelConfig& c = cfg;
        const int E = c.n_embd, T = s.T;
        const int64_t ldq = kmax, ldds = kmax / 32;
        float* xp = x.as<float>();
        float* xnp = xn.as<float>();
        float* qkvp = qkv.as<float>();
        float* attp = att.as<float>();
        float* hp = h.as<float>();
        DecodeScratch dscr{partial.as<float>(), counters.as<int>()};
        int fm[3], nf = 0;

        launch_embed(tok_emb, s.tokens, T, xp, E, stream, pdl);
        for (int l = 0; l < c.n_layer; ++l) {
            const DLayer& W = layers[size_t(l)];
            if (W.qkv_fused) {
                norm_for({&W.qkv}, nullptr, T, W.attn_norm, fm, nf);
                mm(W.qkv, act_for(W.qkv, xnp, E, fm, nf), T, qkvp, qkv_dim, kStore, W.bqkv);
            } else {
                norm_for({&W.wq, &W.wk, &W.wv}, nullptr, T, W.attn_norm, fm, nf);
                mm(W.wq, act_for(W.wq, xnp, E, fm, nf), T, qkvp, qkv_dim, kStore, W.bqkv);
                mm(W.wk, act_for(W.wk, xnp, E, fm, nf), T, qkvp + q_dim, qkv_dim, kStore,
                   W.bqkv ? W.bqkv + q_dim : nullptr);
                mm(W.wv, act_for(W.wv, xnp, E, fm, nf), T, qkvp + q_dim + kv_dim, qkv_dim, kStore,
                   W.bqkv ? W.bqkv + q_dim + kv_dim : nullptr);
            }
            AttnLayer AL;
            AL.qkv = qkvp;
            AL.ld_qkv = qkv_dim;
            AL.k_cache = reinterpret_cast<__half*>(cache.k()) + size_t(l) * cache.layer_stride();
            AL.v_cache = reinterpret_cast<__half*>(cache.v()) + size_t(l) * cache.layer_stride();
            AL.block_size = cache.block_size();
            AL.n_head = c.n_head;
            AL.n_head_kv = c.n_head_kv;
            AL.head_dim = hd;
            AL.scale = c.attn_scale;
            AL.n_rot = c.rope.n_rot;
            AL.neox = c.rope.neox;
            AL.rope_cos = rope_cos.as<float>();
            AL.rope_sin = rope_sin.as<float>();
            AL.out = attp;
            AL.ld_out = q_dim;
            // the wo product's Q8_0/Q8_1 activations come from the decode kernel when it produces every row
            const int f_wo = act_format(W.wo.type);
            Q8Out q8;
            const bool fuse_q = f_wo != kActF32 && f_wo != kActQ8_K && s.n_pre == 0;
            if (fuse_q) q8 = Q8Out{aq[0].as<int8_t>(), ads[0].as<float2>(), ldq, ldds, f_wo};
            if (s.fused) {
                launch_attn_decode(AL, s.st, s.dec_items, s.n_dec, true, s.split_len, s.max_split, dscr, q8, stream,
                                   pdl);
            } else {
                launch_rope_kv(AL, s.st, T, stream, pdl);
                launch_attn_decode(AL, s.st, s.dec_items, s.n_dec, false, s.split_len, s.max_split, dscr, q8, stream,
                                   pdl);
                launch_attn_prefill(AL, s.st, s.pre_items, s.n_pre, stream, pdl);
            }
            if (f_wo != kActF32 && !fuse_q)
                launch_quantize_q8(attp, q_dim, T, q_dim, f_wo, aq[0].as<int8_t>(), ads[0].as<float2>(), ldq, ldds,
                                   stream, pdl);
            mm(W.wo, ActView{attp, q_dim, aq[0].as<int8_t>(), ads[0].as<float2>(), ldq, ldds}, T, xp, E, kAdd, nullptr);

            if (W.gu_fused) {
                norm_for({&W.gu}, nullptr, T, W.ffn_norm, fm, nf);
                mm(W.gu, act_for(W.gu, xnp, E, fm, nf), T, hp, c.n_ff, kSwiGLU, nullptr);
            } else {
                float* gup = gu.as<float>();
                norm_for({&W.w1, &W.w3}, nullptr, T, W.ffn_norm, fm, nf);
                mm(W.w1, act_for(W.w1, xnp, E, fm, nf), T, gup, 2 * c.n_ff, kStore, nullptr);
                mm(W.w3, act_for(W.w3, xnp, E, fm, nf), T, gup + c.n_ff, 2 * c.n_ff, kStore, nullptr);
                launch_swiglu(gup, gup + c.n_ff, 2 * c.n_ff, T, c.n_ff, hp, c.n_ff, stream, pdl);
            }
            const int f_w2 = act_format(W.w2.type);
            if (f_w2 != kActF32)
                launch_quantize_q8(hp, c.n_ff, T, c.n_ff, f_w2, aq[0].as<int8_t>(), ads[0].as<float2>(), ldq, ldds,
                                   stream, pdl);
            mm(W.w2, ActView{hp, c.n_ff, aq[0].as<int8_t>(), ads[0].as<float2>(), ldq, ldds}, T, xp, E, kAdd, nullptr);
        }
        norm_for({&output}, s.logit_rows, s.L, norm, fm, nf);
        mm(output, act_for(output, xnp, E, fm, nf), s.L, logits.as<float>(), c.n_vocab, kStore, nullptr);
    }

    void check_batch(const DeviceKV& cache, const StepBatch& b) const {
        rz::check_batch(cfg, CacheShape{cache.n_layer(), int(cache.kv_dim()), int(cache.n_blocks()), cache.block_size()},
                        b, opt.n_ctx);
    }

    // Builds the step's tables in pinned memory, uploads them and enqueues the step.
    void run_batch(DeviceKV& cache, const StepBatch& b) {
        check_batch(cache, b);
        const int T = b.n_tokens, S = b.n_seqs, L = b.n_logits, bs = cache.block_size(), tile = prefill_tile(hd);
        std::vector<int32_t> dec, pre, bt, bt_off(size_t(S), 0), tok0(size_t(S), 0), pos(size_t(T), 0), seq(size_t(T), 0);
        bool all_single = true;
        int max_len = 1;
        for (int s = 0, t = 0; s < S; ++s) {
            const StepSeq& q = b.seqs[s];
            const int need = (q.pos0 + q.n_tokens + bs - 1) / bs;
            bt_off[size_t(s)] = int32_t(bt.size());
            bt.insert(bt.end(), q.blocks, q.blocks + need);
            tok0[size_t(s)] = t;
            for (int i = 0; i < q.n_tokens; ++i, ++t) {
                pos[size_t(t)] = q.pos0 + i;
                seq[size_t(t)] = s;
            }
            max_len = std::max(max_len, q.pos0 + q.n_tokens);
            if (q.n_tokens == 1 && !opt.batch_invariant) {
                dec.push_back(t - 1);
            } else {
                all_single = false;
                for (int i = 0; i < q.n_tokens; i += tile) {
                    pre.push_back(s);
                    pre.push_back(t - q.n_tokens + i);
                    pre.push_back(std::min(tile, q.n_tokens - i));
                }
            }
        }
        const int D = int(dec.size()), P = int(pre.size() / 3);
        const size_t n_meta = size_t(3 * T + 2 * S + L + D + 3 * P) + bt.size();
        ensure_scratch(T, L, std::max(D, 1), n_meta);
        int32_t* hm = meta_h.as<int32_t>();
        size_t o = 0;
        auto put = [&](const int32_t* src, size_t n) {
            const size_t at = o;
            if (n) std::memcpy(hm + o, src, n * 4);
            o += n;
            return meta.as<int32_t>() + at;
        };
        StepDev sd;
        sd.T = T;
        sd.tokens = put(b.tokens, size_t(T));
        sd.st.pos = put(pos.data(), pos.size());
        sd.st.seq = put(seq.data(), seq.size());
        sd.st.seq_bt_off = put(bt_off.data(), bt_off.size());
        sd.st.seq_tok0 = put(tok0.data(), tok0.size());
        sd.logit_rows = put(b.logit_rows, size_t(L));
        sd.L = L;
        sd.dec_items = put(dec.data(), dec.size());
        sd.n_dec = D;
        sd.pre_items = put(pre.data(), pre.size());
        sd.n_pre = P;
        sd.st.bt = put(bt.data(), bt.size());
        sd.fused = all_single && !opt.batch_invariant;
        sd.split_len = choose_split_len(D, max_len);
        sd.max_split = (max_len + sd.split_len - 1) / sd.split_len;
        RZ_CUDA_CHECK(cudaMemcpyAsync(meta.as<void>(), hm, o * 4, cudaMemcpyHostToDevice, stream));
        enqueue_step(sd, cache);
    }

    GraphState& graph_for(int B, const DeviceKV& cache, uint64_t cache_id) {
        auto key = std::make_pair(B, cache_id);
        auto it = graphs.find(key);
        if (it != graphs.end()) return *it->second;
        auto g = std::make_unique<GraphState>();
        g->B = B;
        g->cache_id = cache_id;
        g->max_blocks = (opt.n_ctx + cache.block_size() - 1) / cache.block_size();
        g->split_len = choose_split_len(B, opt.n_ctx);
        g->max_split = (opt.n_ctx + g->split_len - 1) / g->split_len;
        g->cap_steps = 1024;
        const size_t n = size_t(B) * 9 + size_t(B) * 3 + size_t(B) * g->max_blocks + 1 + size_t(g->cap_steps) * B;
        g->meta.alloc(n * 4);
        int32_t* p = g->meta.as<int32_t>();
        g->tokens = p; p += B;
        g->pos = p; p += B;
        g->seq = p; p += B;
        g->bt_off = p; p += B;
        g->tok0 = p; p += B;
        g->items = p; p += B;
        g->sampled = p; p += B;
        p += 2 * B;  // spare
        g->pre = p; p += 3 * B;
        g->bt = p; p += size_t(B) * g->max_blocks;
        g->step = p; p += 1;
        g->out = p;
        std::vector<int32_t> ident(size_t(B), 0), off(size_t(B), 0), pre(size_t(3 * B), 0);
        for (int b = 0; b < B; ++b) {
            ident[size_t(b)] = b;
            off[size_t(b)] = b * g->max_blocks;
            pre[size_t(3 * b)] = b;
            pre[size_t(3 * b + 1)] = b;
            pre[size_t(3 * b + 2)] = 1;
        }
        // on the model's stream: ordered before its kernels (a pageable copy is staged before the call returns)
        RZ_CUDA_CHECK(cudaMemcpyAsync(g->seq, ident.data(), size_t(B) * 4, cudaMemcpyHostToDevice, stream));
        RZ_CUDA_CHECK(cudaMemcpyAsync(g->tok0, ident.data(), size_t(B) * 4, cudaMemcpyHostToDevice, stream));
        RZ_CUDA_CHECK(cudaMemcpyAsync(g->items, ident.data(), size_t(B) * 4, cudaMemcpyHostToDevice, stream));
        RZ_CUDA_CHECK(cudaMemcpyAsync(g->bt_off, off.data(), size_t(B) * 4, cudaMemcpyHostToDevice, stream));
        RZ_CUDA_CHECK(cudaMemcpyAsync(g->pre, pre.data(), size_t(3 * B) * 4, cudaMemcpyHostToDevice, stream));
        RZ_CUDA_CHECK(cudaStreamSynchronize(stream));
        GraphState& ref = *g;
        graphs[key] = std::move(g);
        return ref;
    }

    StepDev graph_step(const GraphState& g) const {
        StepDev sd;
        sd.T = g.B;
        sd.tokens = g.tokens;
        sd.st.pos = g.pos;
        sd.st.seq = g.seq;
        sd.st.seq_bt_off = g.bt_off;
        sd.st.seq_tok0 = g.tok0;
        sd.st.bt = g.bt;
        if (opt.batch_invariant) {
            sd.pre_items = g.pre;
            sd.n_pre = g.B;
        } else {
            sd.dec_items = g.items;
            sd.n_dec = g.B;
            sd.fused = true;
        }
        sd.split_len = g.split_len;
        sd.max_split = g.max_split;
        sd.logit_rows = g.items;
        sd.L = g.B;
        return sd;
    }

    void enqueue_decode_step(const GraphState& g, DeviceKV& cache) {
        enqueue_step(graph_step(g), cache);
        launch_argmax(logits.as<float>(), cfg.n_vocab, g.B, cfg.n_vocab, g.sampled, stream, pdl);
        launch_advance(g.sampled, g.B, g.tokens, g.pos, g.out, g.step, stream, pdl);
    }

    void capture(GraphState& g, DeviceKV& cache) {
        RZ_CUDA_CHECK(cudaStreamSynchronize(stream));
        for (int attempt = 0; attempt < 2 && !g.exec; ++attempt) {
            cudaGraph_t graph = nullptr;
            RZ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            try {
                enqueue_decode_step(g, cache);
            } catch (...) {
                cudaStreamEndCapture(stream, &graph);
                if (graph) cudaGraphDestroy(graph);
                (void)cudaGetLastError();
                if (attempt == 0 && pdl) {  // retry without programmatic launches
                    pdl = false;
                    continue;
                }
                throw;
            }
            RZ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
            const cudaError_t e = cudaGraphInstantiate(&g.exec, graph, 0);
            cudaGraphDestroy(graph);
            if (e != cudaSuccess) {
                g.exec = nullptr;
                (void)cudaGetLastError();
                if (attempt == 0 && pdl) {
                    pdl = false;
                    continue;
                }
                throw_cuda(e, "cudaGraphInstantiate", __FILE__, __LINE__);
            }
        }
    }
};

CudaModel::CudaModel(const ModelConfig& config, const std::map<std::string, HostTensor>& globals,
                     const std::vector<std::map<std::string, HostTensor>>& layers, const ModelOptions& options)
    : d_(std::make_unique<DeviceModel>()) {
    DeviceModel& d = *d_;
    d.cfg = config;
    d.opt = options;
    ModelConfig& c = d.cfg;
    if (c.n_vocab < 1 || c.n_embd < 1 || c.n_layer < 1 || c.n_head < 1 || c.n_head_kv < 1 || c.head_dim < 1 || c.n_ff < 1)
        throw std::invalid_argument("model config: every dimension must be >= 1");
    if (c.n_head % c.n_head_kv)
        throw std::invalid_argument("model config: n_head is not a multiple of n_head_kv");
    if (!head_dim_supported(c.head_dim))
        throw std::invalid_argument("CUDA backend: head_dim " + std::to_string(c.head_dim) + " is not supported (64 or 128)");
    if (c.n_embd % 32 || c.n_ff % 32)
        throw std::invalid_argument("CUDA backend: n_embd and n_ff must be multiples of 32");
    if (c.rope.n_rot < 0 || c.rope.n_rot > c.head_dim || c.rope.n_rot % 2)
        throw std::invalid_argument("model config: rope dimension count must be even and <= head_dim");
    if (int(layers.size()) != c.n_layer) throw std::invalid_argument("model config: layer count mismatch");
    if (d.opt.n_ctx < 1) throw std::invalid_argument("n_ctx must be >= 1");
    if (device_count() < 1) throw CudaError("no CUDA device available");
    if (c.attn_scale == 0.f) c.attn_scale = 1.0f / std::sqrt(float(c.head_dim));

    d.hd = c.head_dim;
    d.q_dim = c.n_head * c.head_dim;
    d.kv_dim = c.n_head_kv * c.head_dim;
    d.qkv_dim = d.q_dim + 2 * d.kv_dim;
    d.n_chunks = decode_head_chunks(c.n_head, c.n_head_kv);
    d.kmax = std::max({c.n_embd, d.q_dim, c.n_ff});
    int dev = 0;
    RZ_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    RZ_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    d.sm_count = prop.multiProcessorCount;
    d.pdl = options.pdl && prop.major >= 9;
    if (d.q_dim % 32) throw std::invalid_argument("CUDA backend: n_head * head_dim must be a multiple of 32");

    // ---- collect and check every tensor, then size the arena ----
    struct Plan {
        const HostTensor* t;
        std::string what;
        int64_t rows, cols;
    };
    auto need = [&](const std::map<std::string, HostTensor>& m, const std::string& name, const std::string& what,
                    std::vector<int64_t> shape, bool required) -> const HostTensor* {
        const HostTensor* t = find(m, name);
        if (!t) {
            if (required) throw std::invalid_argument("missing tensor " + what);
            return nullptr;
        }
        check_tensor(what, *t, shape);
        if (shape.size() == 2) {
            const Type ty = t->type == Type::F32 ? Type::F16 : t->type;
            if (!weight_type_has_kernels(ty))
                throw std::invalid_argument(what + ": type " + std::string(traits(t->type, Isa::Scalar).name) +
                                            " has no CUDA kernels");
            if (shape[1] % 32) throw std::invalid_argument(what + ": rows must be a multiple of 32 elements");
        }
        return t;
    };
    auto vec = [&](const HostTensor* t, int64_t n) {
        std::vector<float> out(size_t(n), 0.f);
        traits(t->type, Isa::Scalar).dequantize(t->data, out.data(), n);
        return out;
    };
    auto row_bytes_of = [](const HostTensor& t, int64_t cols) {
        return type_row_bytes(t.type == Type::F32 ? Type::F16 : t.type, cols);
    };

    const int64_t E = c.n_embd, V = c.n_vocab, F = c.n_ff;
    const HostTensor* emb = need(globals, "tok_embeddings", "tok_embeddings", {V, E}, true);
    const HostTensor* nrm = need(globals, "norm", "norm", {E}, true);
    const HostTensor* out = need(globals, "output", "output", {V, E}, false);
    const HostTensor* rf = need(globals, "rope_freqs", "rope_freqs", {c.rope.n_rot / 2}, false);
    if (rf) d.rope_freqs = vec(rf, c.rope.n_rot / 2);

    // arena layout: every region 256-aligned
    size_t total = 0;
    auto reserve = [&](size_t bytes) {
        const size_t at = total;
        total += (bytes + 255) / 256 * 256 + 256;
        return at;
    };
    struct LayerPlan {
        std::map<std::string, const HostTensor*> t;
        std::map<std::string, size_t> off;
    };
    std::vector<LayerPlan> lp(size_t(c.n_layer));
    const size_t emb_off = reserve(emb->nbytes * (emb->type == Type::F32 ? 1 : 1));
    const size_t out_off = out ? reserve(out->nbytes) : 0;
    const size_t norm_off = reserve(size_t(E) * 4);
    for (int l = 0; l < c.n_layer; ++l) {
        const auto& m = layers[size_t(l)];
        const std::string p = "layers." + std::to_string(l) + ".";
        LayerPlan& P = lp[size_t(l)];
        P.t["attn_norm"] = need(m, "attn_norm", p + "attn_norm", {E}, true);
        P.t["ffn_norm"] = need(m, "ffn_norm", p + "ffn_norm", {E}, true);
        P.t["wq"] = need(m, "wq", p + "wq", {d.q_dim, E}, true);
        P.t["wk"] = need(m, "wk", p + "wk", {d.kv_dim, E}, true);
        P.t["wv"] = need(m, "wv", p + "wv", {d.kv_dim, E}, true);
        P.t["bq"] = need(m, "bq", p + "bq", {d.q_dim}, false);
        P.t["bk"] = need(m, "bk", p + "bk", {d.kv_dim}, false);
        P.t["bv"] = need(m, "bv", p + "bv", {d.kv_dim}, false);
        P.t["wo"] = need(m, "wo", p + "wo", {E, d.q_dim}, true);
        P.t["w1"] = need(m, "w1", p + "w1", {F, E}, true);
        P.t["w3"] = need(m, "w3", p + "w3", {F, E}, true);
        P.t["w2"] = need(m, "w2", p + "w2", {E, F}, true);
        const bool qkv_same = P.t["wq"]->type == P.t["wk"]->type && P.t["wq"]->type == P.t["wv"]->type;
        if (qkv_same) {
            P.off["qkv"] = reserve(P.t["wq"]->nbytes + P.t["wk"]->nbytes + P.t["wv"]->nbytes);
        } else {
            for (const char* k : {"wq", "wk", "wv"}) P.off[k] = reserve(P.t[k]->nbytes);
        }
        if (P.t["w1"]->type == P.t["w3"]->type) {
            P.off["gu"] = reserve(P.t["w1"]->nbytes * 2);
        } else {
            P.off["w1"] = reserve(P.t["w1"]->nbytes);
            P.off["w3"] = reserve(P.t["w3"]->nbytes);
            d.any_unfused_gu = true;
        }
        P.off["wo"] = reserve(P.t["wo"]->nbytes);
        P.off["w2"] = reserve(P.t["w2"]->nbytes);
        P.off["norms"] = reserve(size_t(2 * E) * 4);
        if (P.t["bq"] || P.t["bk"] || P.t["bv"]) P.off["bias"] = reserve(size_t(d.qkv_dim) * 4);
    }
    d.arena.alloc(total);
    uint8_t* base = d.arena.as<uint8_t>();
    std::vector<uint16_t> conv;
    // uploads a matrix (F32 converted to F16) to base + off with rows dst_pitch apart (rows of it.row_bytes)
    auto put_matrix = [&](const HostTensor& t, int64_t rows, int64_t cols, size_t off, size_t dst_pitch) -> MatRef {
        MatRef m;
        m.type = t.type == Type::F32 ? Type::F16 : t.type;
        m.rows = int(rows);
        m.K = int(cols);
        m.row_bytes = row_bytes_of(t, cols);
        const void* src = t.type == Type::F32 ? static_cast<const void*>(f32_rows_to_f16(t, conv)) : t.data;
        RZ_CUDA_CHECK(cudaMemcpy2D(base + off, dst_pitch, src, m.row_bytes, m.row_bytes, size_t(rows),
                                   cudaMemcpyHostToDevice));
        m.data = base + off;
        return m;
    };
    auto put_floats = [&](const std::vector<float>& v, size_t off) {
        RZ_CUDA_CHECK(cudaMemcpy(base + off, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
        return reinterpret_cast<const float*>(base + off);
    };

    d.tok_emb = put_matrix(*emb, V, E, emb_off, row_bytes_of(*emb, E));
    d.output = out ? put_matrix(*out, V, E, out_off, row_bytes_of(*out, E)) : d.tok_emb;
    d.norm = put_floats(vec(nrm, E), norm_off);
    d.token_bytes = d.tok_emb.row_bytes + size_t(V) * d.output.row_bytes;
    for (int l = 0; l < c.n_layer; ++l) {
        LayerPlan& P = lp[size_t(l)];
        DLayer L;
        std::vector<float> norms = vec(P.t["attn_norm"], E);
        const std::vector<float> fn = vec(P.t["ffn_norm"], E);
        norms.insert(norms.end(), fn.begin(), fn.end());
        L.attn_norm = put_floats(norms, P.off["norms"]);
        L.ffn_norm = L.attn_norm + E;
        if (P.off.count("qkv")) {
            const size_t rb = row_bytes_of(*P.t["wq"], E), o = P.off["qkv"];
            const MatRef q = put_matrix(*P.t["wq"], d.q_dim, E, o, rb);
            put_matrix(*P.t["wk"], d.kv_dim, E, o + size_t(d.q_dim) * rb, rb);
            put_matrix(*P.t["wv"], d.kv_dim, E, o + size_t(d.q_dim + d.kv_dim) * rb, rb);
            L.qkv_fused = true;
            L.qkv = q;
            L.qkv.rows = d.qkv_dim;
            d.token_bytes += size_t(d.qkv_dim) * rb;
        } else {
            L.wq = put_matrix(*P.t["wq"], d.q_dim, E, P.off["wq"], row_bytes_of(*P.t["wq"], E));
            L.wk = put_matrix(*P.t["wk"], d.kv_dim, E, P.off["wk"], row_bytes_of(*P.t["wk"], E));
            L.wv = put_matrix(*P.t["wv"], d.kv_dim, E, P.off["wv"], row_bytes_of(*P.t["wv"], E));
            for (const MatRef* m : {&L.wq, &L.wk, &L.wv}) d.token_bytes += size_t(m->rows) * m->row_bytes;
        }
        if (P.off.count("bias")) {
            std::vector<float> b(size_t(d.qkv_dim), 0.f);
            if (P.t["bq"]) { auto v = vec(P.t["bq"], d.q_dim); std::copy(v.begin(), v.end(), b.begin()); }
            if (P.t["bk"]) { auto v = vec(P.t["bk"], d.kv_dim); std::copy(v.begin(), v.end(), b.begin() + d.q_dim); }
            if (P.t["bv"]) { auto v = vec(P.t["bv"], d.kv_dim); std::copy(v.begin(), v.end(), b.begin() + d.q_dim + d.kv_dim); }
            L.bqkv = put_floats(b, P.off["bias"]);
        }
        if (P.off.count("gu")) {
            const size_t rb = row_bytes_of(*P.t["w1"], E), o = P.off["gu"];
            L.gu = put_matrix(*P.t["w1"], F, E, o, 2 * rb);
            put_matrix(*P.t["w3"], F, E, o + rb, 2 * rb);
            L.gu.rows = int(2 * F);
            L.gu_fused = true;
            d.token_bytes += size_t(2 * F) * rb;
        } else {
            L.w1 = put_matrix(*P.t["w1"], F, E, P.off["w1"], row_bytes_of(*P.t["w1"], E));
            L.w3 = put_matrix(*P.t["w3"], F, E, P.off["w3"], row_bytes_of(*P.t["w3"], E));
            d.token_bytes += size_t(F) * (L.w1.row_bytes + L.w3.row_bytes);
        }
        L.wo = put_matrix(*P.t["wo"], E, d.q_dim, P.off["wo"], row_bytes_of(*P.t["wo"], d.q_dim));
        L.w2 = put_matrix(*P.t["w2"], E, F, P.off["w2"], row_bytes_of(*P.t["w2"], F));
        d.token_bytes += size_t(E) * (L.wo.row_bytes + L.w2.row_bytes);
        d.layers.push_back(L);
    }
    d.weight_bytes = total;

    // RoPE table from the CPU core's rope_angles: the same angles as the CPU, YaRN and frequency factors included
    const int half = c.rope.n_rot / 2;
    RopeParams rp = c.rope;
    rp.freq_factors = d.rope_freqs.empty() ? nullptr : d.rope_freqs.data();
    std::vector<float> cs(size_t(d.opt.n_ctx) * half + 1), sn(size_t(d.opt.n_ctx) * half + 1);
    for (int p = 0; p < d.opt.n_ctx && half > 0; ++p) rope_angles(rp, p, cs.data() + size_t(p) * half, sn.data() + size_t(p) * half);
    upload(d.rope_cos, cs.data(), cs.size());
    upload(d.rope_sin, sn.data(), sn.size());
    c.rope.freq_factors = nullptr;  // the host pointer is not kept

    for (const DLayer& L : d.layers) {
        int f[3];
        if (!L.qkv_fused) d.n_formats = std::max(d.n_formats, DeviceModel::formats({&L.wq, &L.wk, &L.wv}, f));
        if (!L.gu_fused) d.n_formats = std::max(d.n_formats, DeviceModel::formats({&L.w1, &L.w3}, f));
    }
    RZ_CUDA_CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    d.ensure_scratch(std::max(1, d.opt.max_step_tokens), kMatvecMaxRows, kMatvecMaxRows,
                     size_t(8 * std::max(1, d.opt.max_step_tokens) + 4096));
    RZ_CUDA_CHECK(cudaDeviceSynchronize());
}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return d_->cfg; }
const ModelOptions& CudaModel::options() const { return d_->opt; }
size_t CudaModel::weight_bytes() const { return d_->weight_bytes; }
size_t CudaModel::bytes_per_token() const { return d_->token_bytes; }

int CudaModel::kv_blocks_for(size_t budget, int block_size) const {
    const size_t per = size_t(2) * d_->cfg.n_layer * block_size * d_->kv_dim * 2;
    return int(std::min<size_t>(budget / per, size_t(1) << 30));
}

size_t CudaModel::scratch_bytes() const {
    const DeviceModel& d = *d_;
    size_t n = 0;
    for (const DeviceMem* m : {&d.x, &d.xn, &d.aq[0], &d.aq[1], &d.aq[2], &d.ads[0], &d.ads[1], &d.ads[2], &d.qkv,
                               &d.att, &d.h, &d.gu, &d.logits, &d.sampled, &d.params, &d.partial, &d.counters,
                               &d.meta, &d.gemm_ws})
        n += m->size();
    for (const auto& kv : d.graphs) n += kv.second->meta.size();
    return n;
}

void CudaModel::forward(DeviceKV& cache, const StepBatch& batch, float* logits) {
    DeviceModel& d = *d_;
    std::lock_guard<std::mutex> lock(d.mu);
    d.run_batch(cache, batch);
    if (batch.n_logits > 0)
        RZ_CUDA_CHECK(cudaMemcpyAsync(logits, d.logits.as<void>(), size_t(batch.n_logits) * d.cfg.n_vocab * 4,
                                      cudaMemcpyDeviceToHost, d.stream));
    RZ_CUDA_CHECK(cudaStreamSynchronize(d.stream));
}

void CudaModel::forward_sample(DeviceKV& cache, const StepBatch& batch, const SampleParams* params, int32_t* out) {
    DeviceModel& d = *d_;
    std::lock_guard<std::mutex> lock(d.mu);
    d.run_batch(cache, batch);
    const int L = batch.n_logits;
    if (L > 0) {
        RZ_CUDA_CHECK(cudaMemcpyAsync(d.params.as<void>(), params, size_t(L) * sizeof(SampleParams),
                                      cudaMemcpyHostToDevice, d.stream));
        launch_sample(d.logits.as<float>(), d.cfg.n_vocab, L, d.cfg.n_vocab, d.params.as<SampleParams>(),
                      d.sampled.as<int32_t>(), d.stream, d.pdl);
        RZ_CUDA_CHECK(cudaMemcpyAsync(out, d.sampled.as<void>(), size_t(L) * 4, cudaMemcpyDeviceToHost, d.stream));
    }
    RZ_CUDA_CHECK(cudaStreamSynchronize(d.stream));
}

void CudaModel::decode_greedy(DeviceKV& cache, int B, const int32_t* tokens, const int32_t* pos,
                              const int32_t* const* tables, const int32_t* n_blocks, int n_steps, int32_t* out,
                              bool use_graph) {
    DeviceModel& d = *d_;
    std::lock_guard<std::mutex> lock(d.mu);
    if (B < 1 || B > 1024) throw std::invalid_argument("decode_greedy: B must be in [1, 1024]");
    if (n_steps < 1) return;
    if (cache.n_layer() != d.cfg.n_layer || cache.kv_dim() != d.kv_dim)
        throw std::invalid_argument("decode_greedy: the KV cache does not match the model");
    const int bs = cache.block_size();
    for (int b = 0; b < B; ++b) {
        const std::string who = "decode_greedy sequence " + std::to_string(b) + ": ";
        if (tokens[b] < 0 || tokens[b] >= d.cfg.n_vocab) throw std::invalid_argument(who + "token out of range");
        if (pos[b] < 0 || int64_t(pos[b]) + n_steps > d.opt.n_ctx)
            throw std::invalid_argument(who + "positions exceed the context of " + std::to_string(d.opt.n_ctx));
        const int64_t need = (int64_t(pos[b]) + n_steps + bs - 1) / bs;
        if (n_blocks[b] < need) throw std::invalid_argument(who + "block table too short");
        for (int64_t i = 0; i < need; ++i)
            if (tables[b][i] < 0 || tables[b][i] >= cache.n_blocks())
                throw std::invalid_argument(who + "block id out of range");
    }
    d.ensure_scratch(B, B, B, 0);
    // the cache's identity: its device pointer and geometry
    const uint64_t cache_id = uint64_t(reinterpret_cast<uintptr_t>(cache.k())) ^ (uint64_t(cache.n_blocks()) << 40) ^
                              (uint64_t(cache.block_size()) << 56);
    if (d.graphs.size() >= 16) d.graphs.clear();  // many batch sizes: keep the set bounded
    GraphState& g = d.graph_for(B, cache, cache_id);
    std::vector<int32_t> bt(size_t(B) * g.max_blocks, 0);
    for (int b = 0; b < B; ++b) {
        const int nb = std::min(n_blocks[b], g.max_blocks);
        std::copy(tables[b], tables[b] + nb, bt.begin() + size_t(b) * g.max_blocks);
    }
    RZ_CUDA_CHECK(cudaMemcpyAsync(g.tokens, tokens, size_t(B) * 4, cudaMemcpyHostToDevice, d.stream));
    RZ_CUDA_CHECK(cudaMemcpyAsync(g.pos, pos, size_t(B) * 4, cudaMemcpyHostToDevice, d.stream));
    RZ_CUDA_CHECK(cudaMemcpyAsync(g.bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice, d.stream));
    RZ_CUDA_CHECK(cudaMemsetAsync(g.step, 0, 4, d.stream));
    int done = 0;
    while (done < n_steps) {
        const int chunk = std::min(n_steps - done, g.cap_steps);
        int i = 0;
        if (use_graph && !g.exec) {
            d.enqueue_decode_step(g, cache);  // the first step runs eagerly: every kernel loaded before capture
            ++i;
            d.capture(g, cache);
        }
        for (; i < chunk; ++i) {
            if (use_graph) RZ_CUDA_CHECK(cudaGraphLaunch(g.exec, d.stream));
            else d.enqueue_decode_step(g, cache);
        }
        RZ_CUDA_CHECK(cudaMemcpyAsync(out + size_t(done) * B, g.out, size_t(chunk) * B * 4, cudaMemcpyDeviceToHost,
                                      d.stream));
        RZ_CUDA_CHECK(cudaMemsetAsync(g.step, 0, 4, d.stream));
        RZ_CUDA_CHECK(cudaStreamSynchronize(d.stream));
        done += chunk;
    }
}

// ---- kernel entry points for tests ------------------------------------------------------------------------
namespace {
struct TestStream {
    cudaStream_t s = nullptr;
    TestStream() {
        if (device_count() < 1) throw CudaError("no CUDA device available");
        // a blocking stream: ordered after the uploads and memsets on the legacy default stream
        RZ_CUDA_CHECK(cudaStreamCreate(&s));
    }
    ~TestStream() { cudaStreamDestroy(s); }
    void sync() const { RZ_CUDA_CHECK(cudaStreamSynchronize(s)); }
};

size_t weight_row_bytes(Type t, int K) { return type_row_bytes(t, K); }
}  // namespace

void run_matmul(Type t, const uint8_t* w, size_t wbytes, int rows, int K, const float* x, int n, float* y, int path,
                int split_sms, bool split_invariant) {
    if (!weight_type_has_kernels(t)) throw std::invalid_argument("run_matmul: type without CUDA kernels");
    if (rows < 1 || K < 32 || K % 32 || n < 1) throw std::invalid_argument("run_matmul: bad shape");
    const size_t rb = weight_row_bytes(t, K);
    if (wbytes != rb * size_t(rows)) throw std::invalid_argument("run_matmul: weight bytes do not match the shape");
    const bool mv = path == 1 || (path == 0 && n <= kMatvecMaxRows);
    if (mv && n > kMatvecMaxRows) throw std::invalid_argument("run_matmul: the matrix-vector path takes at most 8 rows");
    TestStream ts;
    DeviceMem dw(wbytes + 256), dx, dy(size_t(n) * rows * 4), dq(size_t(n) * K), dds(size_t(n) * (K / 32) * 8);
    RZ_CUDA_CHECK(cudaMemcpy(dw.as<void>(), w, wbytes, cudaMemcpyHostToDevice));
    upload(dx, x, size_t(n) * K);
    RZ_CUDA_CHECK(cudaMemsetAsync(dy.as<void>(), 0xff, dy.size(), ts.s));  // poison: every output must be written
    MatRef W{t, dw.as<uint8_t>(), rows, K, rb};
    if (act_is_quantized(t))
        launch_quantize_q8(dx.as<float>(), K, n, K, act_format(t), dq.as<int8_t>(), dds.as<float2>(), K, K / 32, ts.s,
                           false);
    const ActView a{dx.as<float>(), K, dq.as<int8_t>(), dds.as<float2>(), K, K / 32};
    DeviceMem ws(split_sms > 0 ? gemm_work_floats(split_sms) * 4 : 0);
    const GemmWork work{ws.as<float>(), ws.size() / 4, std::max(1, split_sms), split_invariant};
    if (mv) launch_matvec(W, a, n, dy.as<float>(), rows, kStore, nullptr, ts.s, false);
    else launch_gemm(W, a, n, dy.as<float>(), rows, kStore, nullptr, ts.s, false, work);
    ts.sync();
    download(y, dy, size_t(n) * rows);
}

void run_dequantize(Type t, const uint8_t* w, size_t wbytes, int64_t n, float* y) {
    if (!weight_type_has_kernels(t)) throw std::invalid_argument("run_dequantize: type without CUDA kernels");
    if (n < 32 || n % 32 || n > (int64_t(1) << 31)) throw std::invalid_argument("run_dequantize: bad element count");
    if (wbytes != type_row_bytes(t, n)) throw std::invalid_argument("run_dequantize: byte count does not match");
    TestStream ts;
    DeviceMem dw(wbytes + 256), dy(size_t(n) * 4 + 0);
    RZ_CUDA_CHECK(cudaMemcpy(dw.as<void>(), w, wbytes, cudaMemcpyHostToDevice));
    RZ_CUDA_CHECK(cudaMemsetAsync(dy.as<void>(), 0xff, dy.size(), ts.s));
    MatRef E{t, dw.as<uint8_t>(), 1, int(n), wbytes};
    launch_embed(E, nullptr, 1, dy.as<float>(), n, ts.s, false);
    ts.sync();
    download(y, dy, size_t(n));
}

int activation_format(Type t) { return act_format(t); }

void run_rmsnorm(const float* x, const float* w, int n, int K, float eps, int fmt, float* y, int8_t* q, float* ds) {
    if (n < 1 || K < 32 || K % 32 || fmt < 0 || fmt > 2 || (fmt == kActQ8_K && K % 256))
        throw std::invalid_argument("run_rmsnorm: bad shape or format");
    TestStream ts;
    DeviceMem dx, dw, dy(size_t(n) * K * 4), dq(size_t(n) * K), dds(size_t(n) * (K / 32) * 8);
    upload(dx, x, size_t(n) * K);
    upload(dw, w, size_t(K));
    launch_rmsnorm(dx.as<float>(), K, nullptr, n, K, dw.as<float>(), eps, dy.as<float>(), K, fmt, dq.as<int8_t>(),
                   dds.as<float2>(), K, K / 32, ts.s, false);
    ts.sync();
    download(y, dy, size_t(n) * K);
    download(q, dq, size_t(n) * K);
    download(ds, dds, size_t(n) * (K / 32) * 2);
}

void run_quantize(const float* x, int n, int K, int fmt, int8_t* q, float* ds) {
    if (n < 1 || K < 32 || K % 32 || fmt < 0 || fmt > 2 || (fmt == kActQ8_K && K % 256))
        throw std::invalid_argument("run_quantize: bad shape or format");
    TestStream ts;
    DeviceMem dx, dq(size_t(n) * K), dds(size_t(n) * (K / 32) * 8);
    upload(dx, x, size_t(n) * K);
    launch_quantize_q8(dx.as<float>(), K, n, K, fmt, dq.as<int8_t>(), dds.as<float2>(), K, K / 32, ts.s, false);
    ts.sync();
    download(q, dq, size_t(n) * K);
    download(ds, dds, size_t(n) * (K / 32) * 2);
}

void run_rope_kv(float* qkv, int T, const int32_t* pos, int n_head, int n_head_kv, int head_dim, const RopeParams& rope,
                 const int32_t* block_table, int n_blocks, int block_size, uint16_t* k_cache, uint16_t* v_cache) {
    if (T < 1 || n_head < 1 || n_head_kv < 1 || head_dim < 2 || n_blocks < 1 || block_size < 1)
        throw std::invalid_argument("run_rope_kv: bad shape");
    const int half = rope.n_rot / 2, kv_dim = n_head_kv * head_dim, qkv_dim = (n_head + 2 * n_head_kv) * head_dim;
    int max_pos = 0;
    for (int t = 0; t < T; ++t) {
        if (pos[t] < 0 || pos[t] >= n_blocks * block_size) throw std::invalid_argument("run_rope_kv: position out of range");
        max_pos = std::max(max_pos, pos[t]);
    }
    std::vector<float> cs(size_t(max_pos + 1) * half + 1), sn(size_t(max_pos + 1) * half + 1);
    for (int p = 0; p <= max_pos && half > 0; ++p) rope_angles(rope, p, cs.data() + size_t(p) * half, sn.data() + size_t(p) * half);
    std::vector<int32_t> seq(size_t(T), 0), zero(1, 0);
    TestStream ts;
    DeviceMem dqkv, dpos, dseq, doff, dbt, dcos, dsin, dk, dv;
    upload(dqkv, qkv, size_t(T) * qkv_dim);
    upload(dpos, pos, size_t(T));
    upload(dseq, seq.data(), seq.size());
    upload(doff, zero.data(), 1);
    upload(dbt, block_table, size_t(n_blocks));
    upload(dcos, cs.data(), cs.size());
    upload(dsin, sn.data(), sn.size());
    const size_t cache_elems = size_t(n_blocks) * block_size * kv_dim;
    upload(dk, k_cache, cache_elems);
    upload(dv, v_cache, cache_elems);
    AttnLayer L;
    L.qkv = dqkv.as<float>();
    L.ld_qkv = qkv_dim;
    L.k_cache = dk.as<__half>();
    L.v_cache = dv.as<__half>();
    L.block_size = block_size;
    L.n_head = n_head;
    L.n_head_kv = n_head_kv;
    L.head_dim = head_dim;
    L.n_rot = rope.n_rot;
    L.neox = rope.neox;
    L.rope_cos = dcos.as<float>();
    L.rope_sin = dsin.as<float>();
    StepTables st;
    st.pos = dpos.as<int32_t>();
    st.seq = dseq.as<int32_t>();
    st.seq_bt_off = doff.as<int32_t>();
    st.bt = dbt.as<int32_t>();
    launch_rope_kv(L, st, T, ts.s, false);
    ts.sync();
    download(qkv, dqkv, size_t(T) * qkv_dim);
    download(k_cache, dk, cache_elems);
    download(v_cache, dv, cache_elems);
}

void run_attention(const float* q, int T, const int32_t* pos, int n_head, int n_head_kv, int head_dim, float scale,
                   const int32_t* block_table, int n_blocks, int block_size, const uint16_t* k_cache,
                   const uint16_t* v_cache, float* out, int kernel, int split_len, int8_t* q8, float* ds, int q8_fmt) {
    if (T < 1 || n_head < 1 || n_head_kv < 1 || n_head % n_head_kv || !head_dim_supported(head_dim))
        throw std::invalid_argument("run_attention: bad shape (head_dim must be 64 or 128)");
    const int q_dim = n_head * head_dim, kv_dim = n_head_kv * head_dim, qkv_dim = q_dim + 2 * kv_dim;
    int max_pos = 0;
    for (int t = 0; t < T; ++t) {
        if (pos[t] < 0 || pos[t] >= n_blocks * block_size) throw std::invalid_argument("run_attention: position out of range");
        if (kernel == 1 && t && pos[t] <= pos[t - 1]) throw std::invalid_argument("run_attention: prefill positions must increase");
        max_pos = std::max(max_pos, pos[t]);
    }
    for (int i = 0; i < n_blocks; ++i)
        if (block_table[i] < 0 || block_table[i] >= n_blocks) throw std::invalid_argument("run_attention: block id out of range");
    std::vector<float> qkv(size_t(T) * qkv_dim, 0.f);
    for (int t = 0; t < T; ++t) std::copy(q + size_t(t) * q_dim, q + size_t(t + 1) * q_dim, qkv.begin() + size_t(t) * qkv_dim);
    std::vector<int32_t> seq(size_t(T), 0), zero(1, 0), items;
    const int tile = prefill_tile(head_dim);
    if (kernel == 0) {
        for (int t = 0; t < T; ++t) items.push_back(t);
    } else {
        for (int t = 0; t < T; t += tile) items.insert(items.end(), {0, t, std::min(tile, T - t)});
    }
    const int max_len = max_pos + 1;
    if (split_len <= 0) split_len = std::max(64, (max_len + 63) / 64 * 64 / 4 / 64 * 64);
    const int max_split = (max_len + split_len - 1) / split_len;
    if (max_split > kMaxSplit * 8) throw std::invalid_argument("run_attention: too many splits");
    TestStream ts;
    DeviceMem dqkv, dpos, dseq, doff, dbt, dk, dv, ditems, dout(size_t(T) * q_dim * 4);
    upload(dqkv, qkv.data(), qkv.size());
    upload(dpos, pos, size_t(T));
    upload(dseq, seq.data(), seq.size());
    upload(doff, zero.data(), 1);
    upload(dbt, block_table, size_t(n_blocks));
    const size_t cache_elems = size_t(n_blocks) * block_size * kv_dim;
    upload(dk, k_cache, cache_elems);
    upload(dv, v_cache, cache_elems);
    upload(ditems, items.data(), items.size());
    RZ_CUDA_CHECK(cudaMemsetAsync(dout.as<void>(), 0xff, dout.size(), ts.s));
    AttnLayer L;
    L.qkv = dqkv.as<float>();
    L.ld_qkv = qkv_dim;
    L.k_cache = dk.as<__half>();
    L.v_cache = dv.as<__half>();
    L.block_size = block_size;
    L.n_head = n_head;
    L.n_head_kv = n_head_kv;
    L.head_dim = head_dim;
    L.scale = scale;
    L.out = dout.as<float>();
    L.ld_out = q_dim;
    StepTables st;
    st.pos = dpos.as<int32_t>();
    st.seq = dseq.as<int32_t>();
    st.seq_bt_off = doff.as<int32_t>();
    st.bt = dbt.as<int32_t>();
    if (kernel == 0) {
        const int n_chunks = decode_head_chunks(n_head, n_head_kv);
        DeviceMem partial(size_t(T) * n_head * max_split * (head_dim + 2) * 4), counters(size_t(T) * n_head_kv * n_chunks * 4);
        DeviceMem dq(q8 ? size_t(T) * q_dim : 0), dds(q8 ? size_t(T) * (q_dim / 32) * 8 : 0);
        RZ_CUDA_CHECK(cudaMemsetAsync(counters.as<void>(), 0, counters.size(), ts.s));
        const Q8Out qo = q8 ? Q8Out{dq.as<int8_t>(), dds.as<float2>(), q_dim, q_dim / 32, q8_fmt} : Q8Out{};
        launch_attn_decode(L, st, ditems.as<int32_t>(), T, false, split_len, max_split,
                           DecodeScratch{partial.as<float>(), counters.as<int>()}, qo, ts.s, false);
        ts.sync();
        if (q8) {
            download(q8, dq, size_t(T) * q_dim);
            download(ds, dds, size_t(T) * (q_dim / 32) * 2);
        }
    } else {
        launch_attn_prefill(L, st, ditems.as<int32_t>(), int(items.size() / 3), ts.s, false);
        ts.sync();
    }
    download(out, dout, size_t(T) * q_dim);
}

void run_sample(const float* logits, int n, int V, const SampleParams* params, int32_t* out) {
    if (n < 1 || V < 1) throw std::invalid_argument("run_sample: bad shape");
    TestStream ts;
    DeviceMem dl, dp, dout(size_t(n) * 4);
    upload(dl, logits, size_t(n) * V);
    upload(dp, params, size_t(n));
    RZ_CUDA_CHECK(cudaMemsetAsync(dout.as<void>(), 0xff, dout.size(), ts.s));
    launch_sample(dl.as<float>(), V, n, V, dp.as<SampleParams>(), dout.as<int32_t>(), ts.s, false);
    ts.sync();
    download(out, dout, size_t(n));
}

}  // namespace rz::cu
