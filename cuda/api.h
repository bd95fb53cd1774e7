// The CUDA backend's C++ interface: plain C++ (no CUDA headers), so the pybind11 bindings compile with the
// host compiler. Everything that touches the device lives in the .cu files behind it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"     // RopeParams
#include "step.h"    // ModelConfig, SeqSpan, Batch, model_config_from, check_batch
#include "quants.h"  // Type, block structs

namespace rz::cu {

// Any CUDA runtime failure, with the call and the runtime's message.
struct CudaError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Number of usable CUDA devices; 0 (never an exception) without a driver, without a GPU, or with a driver
// too old for this build.
int device_count() noexcept;

struct DeviceInfo {
    std::string name;
    int cc_major = 0, cc_minor = 0;
    int sm_count = 0;
    size_t total_mem = 0, free_mem = 0;
    int l2_bytes = 0;
    int driver_version = 0, runtime_version = 0;
};
DeviceInfo device_info();
// Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second), median of `reps`.
double measure_copy_bandwidth(size_t bytes, int reps);

// Types with CUDA kernels (matrix-vector, matrix-matrix, dequantize).
bool cuda_type_supported(Type t);
// Rows of the activations above which the matrix products use the tensor-core kernel.
constexpr int kMatvecMaxRows = 8;

// ---- kernel entry points over host arrays, for tests (allocate, run, synchronise, free) ------------------
// y[n][rows] = x[n][K] . W[rows][K]^T; path: 0 = choose as the model does, 1 = matrix-vector, 2 = tensor cores;
// split_sms > 0: the tensor cores split K as they would on a GPU of that many SMs (0: no split), with the
// slices chosen as the batch-invariant model chooses them when split_invariant.
void run_matmul(Type t, const uint8_t* w, size_t wbytes, int rows, int K, const float* x, int n, float* y, int path,
                int split_sms = 0, bool split_invariant = false);
void run_dequantize(Type t, const uint8_t* w, size_t wbytes, int64_t n, float* y);
// Activation formats of the quantized products (q int8 per element, (d, s) per 32): 0 = Q8_0 (Q4_0, Q5_0,
// Q8_0 weights), 1 = Q8_1 (Q4_1, Q5_1), 2 = Q8_K (K-quants): the CPU core's activation blocks, unpacked.
int activation_format(Type weight_type);  // -1 for float weights
// y[n][K] = rmsnorm(x) * w, and y in activation format fmt (q[n][K], ds[n][K/32][2]).
void run_rmsnorm(const float* x, const float* w, int n, int K, float eps, int fmt, float* y, int8_t* q, float* ds);
// x[n][K] in activation format fmt.
void run_quantize(const float* x, int n, int K, int fmt, int8_t* q, float* ds);
// The per-token step before attention: RoPE on the Q and K parts of qkv[T][q_dim + 2 kv_dim] (in place, returned)
// and K, V into a cache of [n_blocks][block_size][kv_dim] halves through one block table.
void run_rope_kv(float* qkv, int T, const int32_t* pos, int n_head, int n_head_kv, int head_dim, const RopeParams& rope,
                 const int32_t* block_table, int n_blocks, int block_size, uint16_t* k_cache, uint16_t* v_cache);
// Attention of T queries (q[T][n_head*head_dim], already rotated) of one sequence against a cache holding
// positions [0, pos[i]] for query i; kernel: 0 = decode (split-K, split_len positions per split; 0 = auto),
// 1 = tiled prefill (tensor cores). With q8/ds set (decode only), also the output in activation format q8_fmt
// (0 or 1) as the decode kernel hands it to the wo product: q8[T][n_head*head_dim], ds[T][n_head*head_dim/32][2].
void run_attention(const float* q, int T, const int32_t* pos, int n_head, int n_head_kv, int head_dim, float scale,
                   const int32_t* block_table, int n_blocks, int block_size, const uint16_t* k_cache,
                   const uint16_t* v_cache, float* out, int kernel, int split_len, int8_t* q8 = nullptr,
                   float* ds = nullptr, int q8_fmt = 0);
// Sampling of each row of logits[n][V]: temperature <= 0 is greedy; top_k <= 0 means no top-k limit (the
// device keeps the 1024 most likely tokens at most); u[i] in [0, 1) is the row's uniform draw.
struct SampleParams {
    float temperature = 0.f;
    int top_k = 0;
    float top_p = 1.f;
    float min_p = 0.f;
    float u = 0.f;
};
constexpr int kMaxSampleCandidates = 1024;
void run_sample(const float* logits, int n, int V, const SampleParams* params, int32_t* out);

// Host emulation of the matrix-vector kernel's arithmetic (the __host__ copies of the block traits): one dot
// product of a weight row (K elements in `t` blocks) with x quantized exactly as the device quantizes it.
float host_row_dot(Type t, const uint8_t* w, int K, const float* x);
// Host emulation of the tiles' dequantizer (dequant16) over n elements.
void host_dequantize(Type t, const uint8_t* w, int64_t n, float* y);

// ---- the model -------------------------------------------------------------------------------------------

struct HostTensor {  // a tensor of the GGUF file, in host memory (the mmap)
    Type type = Type::F32;
    std::vector<int64_t> shape;  // numpy order
    const void* data = nullptr;
    size_t nbytes = 0;
};

struct ModelOptions {
    int n_ctx = 4096;            // longest sequence (RoPE table, attention splits)
    int max_step_tokens = 512;   // scratch sized for this many tokens per step (grown on demand)
    bool batch_invariant = false;  // tensor-core products for every batch size: a row's logits never depend on
                                   // the batch (slower single-stream decode)
    bool pdl = true;             // programmatic dependent launch on sm_90 (REALIZAR_CUDA_PDL=0 disables)
};

// Paged KV cache in device memory: [n_layer][n_blocks][block_size][kv_dim] halves for K and for V (the CPU
// cache's layout).
class DeviceKV {
public:
    DeviceKV(int n_layer, int kv_dim, int n_blocks, int block_size);
    ~DeviceKV();
    DeviceKV(const DeviceKV&) = delete;
    DeviceKV& operator=(const DeviceKV&) = delete;
    int n_layer() const { return n_layer_; }
    int kv_dim() const { return kv_dim_; }
    int n_blocks() const { return n_blocks_; }
    int block_size() const { return block_size_; }
    size_t nbytes() const { return 2 * elems_ * 2; }
    uint16_t* k() const { return k_; }
    uint16_t* v() const { return v_; }
    size_t layer_stride() const { return size_t(n_blocks_) * block_size_ * kv_dim_; }  // halves
    void copy_block(int src, int dst);
    // Host copies of one layer's K and V ([n_blocks][block_size][kv_dim] halves each), for tests.
    void download_layer(int layer, uint16_t* k, uint16_t* v) const;

private:
    int n_layer_, kv_dim_, n_blocks_, block_size_;
    size_t elems_;
    uint16_t* k_ = nullptr;
    uint16_t* v_ = nullptr;
};

// One sequence's part of a step, as in the CPU core.
using StepSeq = SeqSpan;  // the CPU core's step contract (cpp/step.h)
using StepBatch = Batch;

class DeviceModel;  // device state (cuda/model.cu)

class CudaModel {
public:
    // tensors: the CPU core's names ("tok_embeddings", "norm", "output", "rope_freqs"; per layer "attn_norm",
    // "wq", "wk", "wv", "bq", "bk", "bv", "wo", "ffn_norm", "w1", "w2", "w3"). Uploads every weight once, in its
    // block format. Throws std::invalid_argument naming the tensor on a missing tensor, wrong shape or a type
    // without CUDA kernels.
    CudaModel(const ModelConfig& config, const std::map<std::string, HostTensor>& globals,
              const std::vector<std::map<std::string, HostTensor>>& layers, const ModelOptions& options);
    ~CudaModel();
    CudaModel(const CudaModel&) = delete;
    CudaModel& operator=(const CudaModel&) = delete;

    const ModelConfig& config() const;
    const ModelOptions& options() const;
    size_t weight_bytes() const;        // device bytes of the weights as uploaded
    size_t bytes_per_token() const;     // weight bytes one decode step reads (every matrix + one embedding row)
    int kv_blocks_for(size_t budget_bytes, int block_size) const;  // KV blocks that fit a budget

    // One step, the CPU core's contract: appends every sequence's new tokens' K and V to `cache` and writes the
    // logits of the requested rows to logits[n_logits][n_vocab] (host). Serialised.
    void forward(DeviceKV& cache, const StepBatch& batch, float* logits);
    // The same step, sampling each requested row on the device: out[n_logits] tokens.
    void forward_sample(DeviceKV& cache, const StepBatch& batch, const SampleParams* params, int32_t* out);

    // n_steps greedy decode steps of B sequences without returning to the host between steps: sequence b
    // feeds tokens[b] at position pos[b] (its prompt already in the cache) through block table tables[b]
    // (covering pos[b] + n_steps positions). out[n_steps][B]. One CUDA graph per (B, cache) replayed when
    // use_graph, else the same kernels launched each step.
    void decode_greedy(DeviceKV& cache, int B, const int32_t* tokens, const int32_t* pos,
                       const int32_t* const* tables, const int32_t* n_blocks, int n_steps, int32_t* out,
                       bool use_graph);

    // Device memory in use by this model's scratch buffers and graphs (for leak checks).
    size_t scratch_bytes() const;

private:
    std::unique_ptr<DeviceModel> d_;
};

// Device memory in use (total - free), for leak tests.
size_t device_used_bytes();

}  // namespace rz::cu
