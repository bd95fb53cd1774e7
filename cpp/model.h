// The llama-family transformer (llama, qwen2): one batched forward step over the paged KV cache.
//
// Weights are views into the memory-mapped GGUF file, used in their block format; only the small 1-D tensors
// (norm weights, biases, rope frequency factors) are copied to float at load. The whole step runs as one
// ThreadPool::run with barriers between its phases, with scratch buffers that grow to the largest step seen
// and are then reused.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kv_cache.h"
#include "matmul.h"
#include "ops.h"
#include "step.h"
#include "threadpool.h"

namespace rz {


// A tensor of the GGUF file: numpy-order shape, block type, bytes in the mmap (owned by the caller).
struct TensorArg {
    Type type = Type::F32;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    size_t nbytes = 0;
};

// A 2-D weight used in place: rows × cols (cols innermost, in `type` blocks).
struct Matrix {
    Type type = Type::F32;
    int64_t rows = 0, cols = 0;
    const uint8_t* data = nullptr;
    size_t row_bytes = 0;
    const uint8_t* packed = nullptr;  // packed.h's copy, used by the SIMD levels; nullptr: none
};

struct LayerWeights {
    std::vector<float> attn_norm;  // [n_embd]
    Matrix wq;                     // [n_head * head_dim, n_embd]
    Matrix wk, wv;                 // [n_head_kv * head_dim, n_embd]
    std::vector<float> bq, bk, bv; // [q_dim], [kv_dim], [kv_dim]; empty when the model has no QKV biases
    Matrix wo;                     // [n_embd, n_head * head_dim]
    std::vector<float> ffn_norm;   // [n_embd]
    Matrix w1, w3;                 // gate, up: [n_ff, n_embd]
    Matrix w2;                     // down: [n_embd, n_ff]
};

struct ModelWeights {
    Matrix tok_embeddings;            // [n_vocab, n_embd]; rows dequantized one at a time
    std::vector<float> norm;          // [n_embd] final norm
    Matrix output;                    // [n_vocab, n_embd]; the embeddings when the head is tied
    std::vector<float> rope_freqs;    // [n_rot / 2] frequency divisors, or empty
    std::vector<LayerWeights> layers;
};

class CoreModel {
public:
    // tensors: our names ("tok_embeddings", "norm", "output", "rope_freqs") and per layer
    // ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "ffn_norm", "w1", "w2", "w3").
    // Throws std::invalid_argument naming the tensor when one is missing or has the wrong shape or type.
    // packed: give the matrices that have one a packed copy (packed.h) for the SIMD products; without it they
    // read the GGUF bytes in place.
    CoreModel(const ModelConfig& config, const std::map<std::string, TensorArg>& globals,
              const std::vector<std::map<std::string, TensorArg>>& layers, int n_threads, bool packed = true);

    const ModelConfig& config() const { return cfg_; }
    int n_threads() const { return pool_.size(); }
    size_t packed_bytes() const;  // memory the packed copies take

    // Runs one step: appends every sequence's new tokens' K and V to `cache` and writes the logits of the
    // requested rows to logits[n_logits][n_vocab]. Throws std::invalid_argument on an inconsistent batch
    // before touching the cache. Serialised: concurrent callers wait. argmax, when given, gets each logit row's
    // argmax (ops.h's rule), found by the step's threads while the rows are still in their caches.
    void forward(KVCache& cache, const Batch& batch, float* logits, int32_t* argmax = nullptr);

private:
    struct AttnItem {  // query heads [head0, head0 + n_heads) of one KV head's group, for a run of up to
                       // attn_chunk_ tokens [t0, t0 + nt) of one sequence
        int32_t seq, kv_head, head0, n_heads, t0, nt;
    };
    static constexpr int kAttnQueries = 16;  // queries per attention item in a prefill (tokens × group heads)

    void check_batch(const KVCache& cache, const Batch& b) const;
    void pack(Matrix& m);  // gives m a packed copy (packed.h) where its type and shape have one, if pack_
    void reserve(int n_tokens, int n_logits, int block_size);

    ModelConfig cfg_;
    ModelWeights w_;
    bool pack_ = true;
    std::vector<std::vector<uint8_t>> packed_;  // the packed copies Matrix::packed points into
    ThreadPool pool_;
    std::mutex mu_;
    size_t xq_row_bytes_ = 0;  // the widest activation row any weight needs
    int attn_chunk_ = 1;       // tokens per attention item

    // run state, grown to the largest step seen (T tokens, L logit rows)
    int cap_tokens_ = 0, cap_logits_ = 0, cap_block_size_ = 0;
    std::vector<float> x_;      // [T, n_embd] residual stream
    std::vector<float> xb_;     // [T, max(n_embd, q_dim)] normed input of a matmul / attention output
    std::vector<float> xb2_;    // [T, n_embd] output of wo and of w2, added to the residual
    std::vector<float> q_;      // [T, q_dim]
    std::vector<float> k_;      // [T, kv_dim]
    std::vector<float> v_;      // [T, kv_dim]
    std::vector<float> hb_;     // [T, n_ff] gate, then swiglu
    std::vector<float> hb2_;    // [T, n_ff] up
    std::vector<ArgMax> argmax_parts_;  // [L][threads]: each logit row's argmax over the threads' shares
    std::vector<uint8_t> xq_[3];  // [T, xq_row_bytes] activations in a weight's vec_dot format
    std::vector<float> rope_cos_, rope_sin_;  // [T, n_rot / 2]
    std::vector<float> xo_;     // [L, n_embd] the rows that produce logits (the pruned last layer's residual)
    std::vector<int32_t> tok_pos_, tok_seq_;  // [T] position and sequence of each token
    std::vector<AttnItem> items_;
    std::vector<std::vector<float>> att_scratch_;  // per thread
    std::unique_ptr<std::atomic<int>[]> att_next_;  // [n_layer] next attention item to claim
    std::unique_ptr<std::atomic<int64_t>[]> mm_next_;  // [n_layer * kMatrices + 1] next packed matmul unit to claim
    static constexpr int kMatrices = 7;                // per layer: wq wk wv wo w1 w3 w2; then the head
};

}  // namespace rz
