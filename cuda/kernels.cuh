// Launchers of the CUDA kernels, over device pointers, on a stream. model.cu composes them into a forward
// step; the run_* test entry points call them one at a time.
#pragma once
#include <utility>

#include "common.cuh"

namespace rz::cu {

// Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch when pdl is set
// (the kernel then may start before its predecessor ends, and waits for it in pdl_wait()).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
            Args&&... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    if (pdl) {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    RZ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// A weight matrix in device memory: rows x K in its GGUF block type, rows row_bytes apart.
struct MatRef {
    Type type = Type::F32;
    const uint8_t* data = nullptr;
    int rows = 0, K = 0;
    size_t row_bytes = 0;
};

// Activation rows as the products read them: float (row stride ldf) and, for quantized weights, Q8 per 32.
struct ActView {
    const float* f = nullptr;
    int64_t ldf = 0;
    const int8_t* q = nullptr;
    const float2* ds = nullptr;
    int64_t ldq = 0, ldds = 0;
};

// What a product does with its result y (n rows of `rows` values, row stride ldy):
enum Epi : int {
    kStore = 0,   // y = result (+ bias)
    kAdd = 1,     // y += result (the residual stream)
    kSwiGLU = 2,  // rows interleave gate and up: y[i] = silu(result[2i]) * result[2i + 1]
};

bool weight_type_has_kernels(Type t);
bool act_is_quantized(Type t);  // the matrix-vector kernel reads Q8 activations (else floats)

void launch_matvec(const MatRef& W, const ActView& a, int n, float* y, int64_t ldy, Epi epi, const float* bias,
                   cudaStream_t s, bool pdl);
// Split-K workspace for launch_gemm: with one, a product whose tiles would leave SMs idle is cut along K
// into slices summed in a fixed order by a second kernel. Default (no workspace): no split.
struct GemmWork {
    float* ws = nullptr;
    size_t floats = 0;              // at least gemm_work_floats(sm_count)
    int sm_count = 1;
    bool batch_invariant = false;   // slices chosen from M and K alone: a row's sums never depend on the batch
};
size_t gemm_work_floats(int sm_count);
// Tensor cores; reads the Q8 activations for quantized weights (dequantized to half: the same values the
// matrix-vector kernel multiplies, so a row's result hardly depends on which kernel the batch size picks).
void launch_gemm(const MatRef& W, const ActView& a, int n, float* y, int64_t ldy, Epi epi, const float* bias,
                 cudaStream_t s, bool pdl, const GemmWork& work = {});
// n rows of K floats to activation format fmt (an ActFmt other than kActF32)
void launch_quantize_q8(const float* x, int64_t ldx, int n, int K, int fmt, int8_t* q, float2* ds, int64_t ldq,
                        int64_t ldds, cudaStream_t s, bool pdl);
// x[i][0..K) = row tokens[i] of E (rows 0..n-1 when tokens is null), dequantized.
void launch_embed(const MatRef& E, const int32_t* tokens, int n, float* x, int64_t ldx, cudaStream_t s, bool pdl);

// y[i] = rmsnorm(x[rows ? rows[i] : i]) * w for i < n; q/ds (optional) receive y in activation format fmt.
void launch_rmsnorm(const float* x, int64_t ldx, const int32_t* rows, int n, int K, const float* w, float eps, float* y,
                    int64_t ldy, int fmt, int8_t* q, float2* ds, int64_t ldq, int64_t ldds, cudaStream_t s, bool pdl);
// h[i][j] = silu(g[i][j]) * u[i][j]
void launch_swiglu(const float* g, const float* u, int64_t ld_in, int n, int K, float* h, int64_t ldh, cudaStream_t s,
                   bool pdl);

// Per-step token and sequence tables on the device.
struct StepTables {
    const int32_t* pos = nullptr;         // [T] position of each token
    const int32_t* seq = nullptr;         // [T] its sequence
    const int32_t* seq_bt_off = nullptr;  // [S] offset of each sequence's block table in bt
    const int32_t* bt = nullptr;          // block tables, concatenated
    const int32_t* seq_tok0 = nullptr;    // [S] index of each sequence's first token
};
struct AttnLayer {
    float* qkv = nullptr;  // [T][q_dim + 2 kv_dim]: Q, K, V of each token
    int64_t ld_qkv = 0;
    __half* k_cache = nullptr;  // this layer's [n_blocks][block_size][kv_dim]
    __half* v_cache = nullptr;
    int block_size = 16;
    int n_head = 0, n_head_kv = 0, head_dim = 0;
    float scale = 0.f;
    int n_rot = 0;
    bool neox = false;
    const float* rope_cos = nullptr;  // [n_ctx][n_rot / 2]
    const float* rope_sin = nullptr;
    float* out = nullptr;  // [T][n_head * head_dim]
    int64_t ld_out = 0;
};

// RoPE on Q and K of every token (in place) and K, V into the cache.
void launch_rope_kv(const AttnLayer& L, const StepTables& st, int T, cudaStream_t s, bool pdl);

// Decode attention: one query token per item (items[i] = its token index), split-K over positions in
// splits of split_len (a multiple of 64) with max_split splits at most; with fused, the kernel itself applies
// RoPE to the token's Q and K and writes its K and V to the cache (no launch_rope_kv before it).
struct DecodeScratch {
    float* partial = nullptr;  // [n_items][n_head][max_split][head_dim + 2]
    int* counters = nullptr;   // [n_items][n_head_kv * n_chunks], zero between launches
};
// Optional Q8 copy of the attention output (the wo product's activations, format Q8_0 or Q8_1):
// q[T][ldq], ds[T][ldds].
struct Q8Out {
    int8_t* q = nullptr;
    float2* ds = nullptr;
    int64_t ldq = 0, ldds = 0;
    int fmt = 0;
};
int decode_head_chunks(int n_head, int n_head_kv);
void launch_attn_decode(const AttnLayer& L, const StepTables& st, const int32_t* items, int n_items, bool fused,
                        int split_len, int max_split, const DecodeScratch& scratch, const Q8Out& q8, cudaStream_t s,
                        bool pdl);
// Prefill attention: items[3i..3i+2] = (sequence, first token index, token count <= prefill_tile(head_dim)).
int prefill_tile(int head_dim);
bool head_dim_supported(int head_dim);
void launch_attn_prefill(const AttnLayer& L, const StepTables& st, const int32_t* items, int n_items, cudaStream_t s,
                         bool pdl);

// Sampling: out[i] for each row of logits[n][V] (row stride ld).
void launch_argmax(const float* logits, int64_t ld, int n, int V, int32_t* out, cudaStream_t s, bool pdl);
void launch_sample(const float* logits, int64_t ld, int n, int V, const SampleParams* params, int32_t* out,
                   cudaStream_t s, bool pdl);
// The end of a graph-replayed decode step: tokens = sampled, pos += 1, out[*step][b] = sampled, ++*step.
void launch_advance(const int32_t* sampled, int B, int32_t* tokens, int32_t* pos, int32_t* out, int32_t* step,
                    cudaStream_t s, bool pdl);

}  // namespace rz::cu
