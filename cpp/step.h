// What a llama-family model is and what one forward step asks of it: the contract shared by the CPU core
// (cpp/model.h) and the CUDA backend (cuda/api.h), so both read the same config keys with the same defaults and
// reject the same malformed batches with the same messages.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "ops.h"  // RopeParams

namespace rz {

struct ModelConfig {
    int n_vocab = 0;
    int n_embd = 0;
    int n_layer = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;
    int n_ff = 0;
    float rms_eps = 1e-5f;
    float attn_scale = 0.f;  // 0: 1/sqrt(head_dim)
    int n_ctx_train = 0;
    RopeParams rope;         // freq_factors is set from the weights
};

// The config from its keys (realizar.model.ModelConfig.core_dict()): n_vocab, n_embd, n_layer, n_head, n_head_kv,
// head_dim, n_ff are required; n_ctx_train, n_rot, rms_eps, attn_scale and the rope_* keys have llama.cpp's
// defaults. An unknown or missing key is std::invalid_argument naming `who` and the key.
ModelConfig model_config_from(const std::map<std::string, double>& values, const std::string& who);

struct SeqSpan {
    int32_t n_tokens;        // new tokens this step (>= 1), consecutive in Batch::tokens
    int32_t pos0;            // position of the first of them
    const int32_t* blocks;   // block table covering positions [0, pos0 + n_tokens)
    int32_t n_blocks;
};

struct Batch {
    const int32_t* tokens;      // [n_tokens]: every sequence's new tokens, sequence after sequence
    int32_t n_tokens;
    const SeqSpan* seqs;
    int32_t n_seqs;
    const int32_t* logit_rows;  // [n_logits] indices into tokens whose logits are wanted, in output order
    int32_t n_logits;
};

// The KV pool a step writes into, as far as the checks need it.
struct CacheShape {
    int n_layer, kv_dim, n_blocks, block_size;
};

// std::invalid_argument unless the batch fits the model and the cache: a cache of the model's shape, at least one
// sequence, positions within max_positions (<= 0: no limit) and covered by valid block ids, token ids in the
// vocabulary, logit rows within the batch.
void check_batch(const ModelConfig& c, const CacheShape& cache, const Batch& b, int64_t max_positions);

}  // namespace rz
