#include "model.h"

#include "packed.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

namespace rz {
namespace {

// Bytes of each thread's first weights of a matmul asked for before the barrier that precedes it.
constexpr size_t kWarmBytes = 64 * 1024;

// Whether products with m read its packed copy at this ISA level, and the activation row bytes they read.
bool uses_packed(const Matrix& m, Isa isa) { return m.packed && isa != Isa::Scalar; }
size_t xq_stride(const Matrix& m, Isa isa) {
    return uses_packed(m, isa) ? packed_activation_row_bytes(m.type, m.cols) : activation_row_bytes(m.type, m.cols);
}
size_t xq_stride(const Matrix& m) { return xq_stride(m, Isa::Avx2); }  // the widest: packed rows have a tail

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

const TensorArg* find(const std::map<std::string, TensorArg>& m, const std::string& name) {
    auto it = m.find(name);
    return it == m.end() ? nullptr : &it->second;
}

// Checks that the tensor's bytes hold `shape` in its type, as the reader promised.
void check_bytes(const std::string& what, const TensorArg& t) {
    if (!type_supported(t.type)) throw std::invalid_argument(what + ": unsupported tensor type id " + std::to_string(int(t.type)));
    const TypeTraits& tt = traits(t.type, Isa::Scalar);
    if (t.shape.empty()) throw std::invalid_argument(what + ": empty shape");
    int64_t n = 1;
    for (int64_t d : t.shape) {
        if (d < 1 || d > (int64_t(1) << 40)) throw std::invalid_argument(what + ": bad shape " + shape_str(t.shape));
        n *= d;
    }
    if (t.shape.back() % tt.block_size)
        throw std::invalid_argument(what + ": last dimension is not a multiple of the " + tt.name + " block size");
    if (size_t(n / tt.block_size) * tt.type_size != t.nbytes || !t.data)
        throw std::invalid_argument(what + ": " + std::to_string(t.nbytes) + " bytes do not hold " + tt.name + " " +
                                    shape_str(t.shape));
}

Matrix matrix(const std::string& what, const TensorArg* t, int64_t rows, int64_t cols) {
    if (!t) throw std::invalid_argument("missing tensor " + what);
    check_bytes(what, *t);
    if (t->shape != std::vector<int64_t>{rows, cols})
        throw std::invalid_argument(what + ": shape " + shape_str(t->shape) + ", expected " +
                                    shape_str({rows, cols}));
    const TypeTraits& tt = traits(t->type, Isa::Scalar);
    if (!tt.vec_dot) throw std::invalid_argument(what + ": no matrix product for type " + tt.name);
    Matrix m;
    m.type = t->type;
    m.rows = rows;
    m.cols = cols;
    m.data = static_cast<const uint8_t*>(t->data);
    m.row_bytes = size_t(cols / tt.block_size) * tt.type_size;
    return m;
}

// A small 1-D tensor as floats; empty when absent and optional.
std::vector<float> vector_f32(const std::string& what, const TensorArg* t, int64_t n, bool required) {
    if (!t) {
        if (required) throw std::invalid_argument("missing tensor " + what);
        return {};
    }
    check_bytes(what, *t);
    if (t->shape != std::vector<int64_t>{n})
        throw std::invalid_argument(what + ": shape " + shape_str(t->shape) + ", expected " + shape_str({n}));
    auto out = std::vector<float>(size_t(n));
    traits(t->type, Isa::Scalar).dequantize(t->data, out.data(), n);
    return out;
}

template <typename T>
void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
}

}  // namespace

CoreModel::CoreModel(const ModelConfig& config, const std::map<std::string, TensorArg>& globals,
                     const std::vector<std::map<std::string, TensorArg>>& layers, int n_threads, bool packed)
    : cfg_(config), pack_(packed), pool_(n_threads) {
    const ModelConfig& c = cfg_;
    if (c.n_vocab < 1 || c.n_embd < 1 || c.n_layer < 1 || c.n_head < 1 || c.n_head_kv < 1 || c.head_dim < 1 ||
        c.n_ff < 1)
        throw std::invalid_argument("model config: every dimension must be >= 1");
    if (c.n_head % c.n_head_kv)
        throw std::invalid_argument("model config: n_head (" + std::to_string(c.n_head) +
                                    ") is not a multiple of n_head_kv (" + std::to_string(c.n_head_kv) + ")");
    if (c.rope.n_rot < 0 || c.rope.n_rot > c.head_dim || c.rope.n_rot % 2)
        throw std::invalid_argument("model config: rope dimension count must be even and <= head_dim");
    if (!(c.rope.freq_base > 0.f) || !(c.rope.freq_scale > 0.f) || !(c.rms_eps >= 0.f))
        throw std::invalid_argument("model config: rope freq base/scale must be > 0 and rms eps >= 0");
    if (c.rope.ext_factor != 0.f && c.rope.n_ctx_orig < 1)
        throw std::invalid_argument("model config: YaRN scaling needs the original context length");
    if (int(layers.size()) != c.n_layer)
        throw std::invalid_argument("model config: " + std::to_string(layers.size()) + " layers of tensors for " +
                                    std::to_string(c.n_layer) + " layers");

    const int64_t q_dim = int64_t(c.n_head) * c.head_dim, kv_dim = int64_t(c.n_head_kv) * c.head_dim;
    w_.tok_embeddings = matrix("tok_embeddings", find(globals, "tok_embeddings"), c.n_vocab, c.n_embd);
    w_.norm = vector_f32("norm", find(globals, "norm"), c.n_embd, true);
    const TensorArg* out = find(globals, "output");
    w_.output = out ? matrix("output", out, c.n_vocab, c.n_embd) : w_.tok_embeddings;
    w_.rope_freqs = vector_f32("rope_freqs", find(globals, "rope_freqs"), c.rope.n_rot / 2, false);
    for (int l = 0; l < c.n_layer; ++l) {
        const auto& t = layers[size_t(l)];
        const std::string p = "layers." + std::to_string(l) + ".";
        LayerWeights L;
        L.attn_norm = vector_f32(p + "attn_norm", find(t, "attn_norm"), c.n_embd, true);
        L.wq = matrix(p + "wq", find(t, "wq"), q_dim, c.n_embd);
        L.wk = matrix(p + "wk", find(t, "wk"), kv_dim, c.n_embd);
        L.wv = matrix(p + "wv", find(t, "wv"), kv_dim, c.n_embd);
        L.bq = vector_f32(p + "bq", find(t, "bq"), q_dim, false);
        L.bk = vector_f32(p + "bk", find(t, "bk"), kv_dim, false);
        L.bv = vector_f32(p + "bv", find(t, "bv"), kv_dim, false);
        L.wo = matrix(p + "wo", find(t, "wo"), c.n_embd, q_dim);
        L.ffn_norm = vector_f32(p + "ffn_norm", find(t, "ffn_norm"), c.n_embd, true);
        L.w1 = matrix(p + "w1", find(t, "w1"), c.n_ff, c.n_embd);
        L.w3 = matrix(p + "w3", find(t, "w3"), c.n_ff, c.n_embd);
        L.w2 = matrix(p + "w2", find(t, "w2"), c.n_embd, c.n_ff);
        for (Matrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w3, &L.w2}) {
            pack(*m);
            xq_row_bytes_ = std::max(xq_row_bytes_, xq_stride(*m));
        }
        w_.layers.push_back(std::move(L));
    }
    pack(w_.output);  // a tied head gets its own packed copy; the embedding lookup reads the original
    xq_row_bytes_ = std::max(xq_row_bytes_, xq_stride(w_.output));
    cfg_.rope.freq_factors = w_.rope_freqs.empty() ? nullptr : w_.rope_freqs.data();
    if (cfg_.attn_scale == 0.f) cfg_.attn_scale = 1.0f / std::sqrt(float(c.head_dim));
    att_next_.reset(new std::atomic<int>[size_t(c.n_layer)]);
    mm_next_.reset(new std::atomic<int64_t>[size_t(c.n_layer) * kMatrices + 1]);
    attn_chunk_ = std::max(1, kAttnQueries / (c.n_head / c.n_head_kv));
    att_scratch_.resize(size_t(pool_.size()));
}

ModelConfig model_config_from(const std::map<std::string, double>& values, const std::string& who) {
    static const char* required[] = {"n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff"};
    static const char* optional[] = {"n_ctx_train", "n_rot", "rope_n_ctx_orig", "rope_neox", "rms_eps",
                                     "attn_scale", "rope_freq_base", "rope_freq_scale", "rope_ext_factor",
                                     "rope_attn_factor", "rope_beta_fast", "rope_beta_slow"};
    for (const auto& [key, value] : values) {
        bool known = false;
        for (const char* k : required) known |= key == k;
        for (const char* k : optional) known |= key == k;
        if (!known) throw std::invalid_argument(who + " config: unknown key '" + key + "'");
    }
    for (const char* k : required)
        if (!values.count(k)) throw std::invalid_argument(who + " config: missing key '" + k + "'");
    auto get = [&](const char* k, double dflt) {
        auto it = values.find(k);
        return it == values.end() ? dflt : it->second;
    };
    ModelConfig c;
    c.n_vocab = int(get("n_vocab", 0));
    c.n_embd = int(get("n_embd", 0));
    c.n_layer = int(get("n_layer", 0));
    c.n_head = int(get("n_head", 0));
    c.n_head_kv = int(get("n_head_kv", 0));
    c.head_dim = int(get("head_dim", 0));
    c.n_ff = int(get("n_ff", 0));
    c.n_ctx_train = int(get("n_ctx_train", 0));
    c.rms_eps = float(get("rms_eps", 1e-5));
    c.attn_scale = float(get("attn_scale", 0.0));
    c.rope.n_rot = int(get("n_rot", c.head_dim));
    c.rope.neox = get("rope_neox", 0) != 0;
    c.rope.freq_base = float(get("rope_freq_base", 10000.0));
    c.rope.freq_scale = float(get("rope_freq_scale", 1.0));
    c.rope.ext_factor = float(get("rope_ext_factor", 0.0));
    c.rope.attn_factor = float(get("rope_attn_factor", 1.0));
    c.rope.beta_fast = float(get("rope_beta_fast", 32.0));
    c.rope.beta_slow = float(get("rope_beta_slow", 1.0));
    c.rope.n_ctx_orig = int(get("rope_n_ctx_orig", c.n_ctx_train));
    return c;
}

void check_batch(const ModelConfig& c, const CacheShape& cache, const Batch& b, int64_t max_positions) {
    if (cache.n_layer != c.n_layer || cache.kv_dim != c.n_head_kv * c.head_dim)
        throw std::invalid_argument("KV cache has " + std::to_string(cache.n_layer) + " layers of " +
                                    std::to_string(cache.kv_dim) + " values; the model needs " +
                                    std::to_string(c.n_layer) + " of " + std::to_string(c.n_head_kv * c.head_dim));
    if (b.n_seqs < 1 || b.n_tokens < 1) throw std::invalid_argument("batch: no sequences or no tokens");
    int64_t total = 0;
    for (int s = 0; s < b.n_seqs; ++s) {
        const SeqSpan& q = b.seqs[s];
        const std::string who = "batch sequence " + std::to_string(s) + ": ";
        if (q.n_tokens < 1) throw std::invalid_argument(who + "no new tokens");
        if (q.pos0 < 0) throw std::invalid_argument(who + "negative position");
        const int64_t end = int64_t(q.pos0) + q.n_tokens;
        if (max_positions > 0 && end > max_positions)
            throw std::invalid_argument(who + "positions up to " + std::to_string(end) + " exceed the context of " +
                                        std::to_string(max_positions));
        const int64_t need = (end + cache.block_size - 1) / cache.block_size;
        if (q.n_blocks < need)
            throw std::invalid_argument(who + "block table of " + std::to_string(q.n_blocks) +
                                        " blocks does not cover positions up to " + std::to_string(end));
        for (int64_t i = 0; i < need; ++i)
            if (q.blocks[i] < 0 || q.blocks[i] >= cache.n_blocks)
                throw std::invalid_argument(who + "block id " + std::to_string(q.blocks[i]) + " out of range [0, " +
                                            std::to_string(cache.n_blocks) + ")");
        total += q.n_tokens;
    }
    if (total != b.n_tokens)
        throw std::invalid_argument("batch: sequences hold " + std::to_string(total) + " tokens, the token array " +
                                    std::to_string(b.n_tokens));
    for (int t = 0; t < b.n_tokens; ++t)
        if (b.tokens[t] < 0 || b.tokens[t] >= c.n_vocab)
            throw std::invalid_argument("token id " + std::to_string(b.tokens[t]) + " out of range [0, " +
                                        std::to_string(c.n_vocab) + ")");
    for (int i = 0; i < b.n_logits; ++i)
        if (b.logit_rows[i] < 0 || b.logit_rows[i] >= b.n_tokens)
            throw std::invalid_argument("logit row " + std::to_string(b.logit_rows[i]) + " out of range [0, " +
                                        std::to_string(b.n_tokens) + ")");
}

void CoreModel::pack(Matrix& m) {
    if (!pack_ || !packable(m.type, m.rows, m.cols)) return;
    packed_.push_back(pack_weights(m.type, m.data, m.rows, m.cols));
    m.packed = packed_.back().data();
}

size_t CoreModel::packed_bytes() const {
    size_t n = 0;
    for (const auto& p : packed_) n += p.size();
    return n;
}

void CoreModel::check_batch(const KVCache& cache, const Batch& b) const {
    if (cache.head_dim() != cfg_.head_dim && cache.n_kv_dim() == cfg_.n_head_kv * cfg_.head_dim)
        throw std::invalid_argument("KV cache laid out for heads of " + std::to_string(cache.head_dim()) +
                                    " values; the model's have " + std::to_string(cfg_.head_dim) +
                                    " (KVCache(..., head_dim=" + std::to_string(cfg_.head_dim) + "))");
    rz::check_batch(cfg_, CacheShape{cache.n_layer(), int(cache.n_kv_dim()), int(cache.n_blocks()), cache.block_size()},
                    b, 0);
}

void CoreModel::reserve(int T, int L, int block_size) {
    const ModelConfig& c = cfg_;
    const size_t q_dim = size_t(c.n_head) * c.head_dim, kv_dim = size_t(c.n_head_kv) * c.head_dim;
    if (T > cap_tokens_) {
        const size_t t = size_t(T);
        grow(x_, t * c.n_embd);
        grow(xb_, t * std::max(size_t(c.n_embd), q_dim));
        grow(xb2_, t * c.n_embd);
        grow(q_, t * q_dim);
        grow(k_, t * kv_dim);
        grow(v_, t * kv_dim);
        grow(hb_, t * c.n_ff);
        grow(hb2_, t * c.n_ff);
        grow(rope_cos_, t * size_t(c.rope.n_rot / 2 + 1));
        grow(rope_sin_, t * size_t(c.rope.n_rot / 2 + 1));
        grow(tok_pos_, t);
        grow(tok_seq_, t);
        cap_tokens_ = T;
    }
    if (L > cap_logits_) {
        grow(xo_, size_t(L) * c.n_embd);
        cap_logits_ = L;
    }
    for (auto& b : xq_) grow(b, size_t(std::max(T, L)) * xq_row_bytes_);  // rows of the step or of the head
    if (block_size > cap_block_size_) {
        for (auto& s : att_scratch_)
            grow(s, attention_scratch_floats(c.head_dim, block_size, attn_chunk_ * (c.n_head / c.n_head_kv)));
        cap_block_size_ = block_size;
    }
}

void CoreModel::forward(KVCache& cache, const Batch& batch, float* logits, int32_t* argmax) {
    std::lock_guard<std::mutex> lock(mu_);
    check_batch(cache, batch);
    const ModelConfig& c = cfg_;
    const int T = batch.n_tokens, L = batch.n_logits;
    reserve(T, L, cache.block_size());
    if (argmax) argmax_parts_.resize(size_t(L) * size_t(pool_.size()));

    const Isa isa = active_isa();
    const int n_embd = c.n_embd, n_ff = c.n_ff, hd = c.head_dim, n_rot = c.rope.n_rot, half = n_rot / 2;
    const int q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, group = c.n_head / c.n_head_kv;
    const int bs = cache.block_size();

    // token -> (sequence, position); attention work items, longest (latest) chunks first
    items_.clear();
    for (int s = 0, t = 0; s < batch.n_seqs; ++s) {
        const SeqSpan& q = batch.seqs[s];
        for (int i = 0; i < q.n_tokens; ++i, ++t) {
            tok_seq_[t] = s;
            tok_pos_[t] = q.pos0 + i;
        }
        const int chunk = attn_chunk_;
        for (int t0 = q.n_tokens - ((q.n_tokens - 1) % chunk + 1); t0 >= 0; t0 -= chunk)
            for (int h = 0; h < c.n_head_kv; ++h)
                items_.push_back({s, h, 0, group, t - q.n_tokens + t0, std::min(chunk, q.n_tokens - t0)});
    }
    // Too few items for the threads (decode of one or two sequences): split each KV head's query group. Each
    // query's arithmetic does not depend on its item's other queries, so this changes no result.
    if (group > 1 && int(items_.size()) < 2 * pool_.size()) {
        const int parts = std::min(group, (2 * pool_.size() + int(items_.size()) - 1) / int(items_.size()));
        const int per = (group + parts - 1) / parts;
        const size_t n = items_.size();
        for (size_t i = 0; i < n; ++i) {
            items_[i].n_heads = per;
            for (int h0 = per; h0 < group; h0 += per) {
                AttnItem part = items_[i];
                part.head0 = h0;
                part.n_heads = std::min(per, group - h0);
                items_.push_back(part);
            }
        }
    }
    const int n_items = int(items_.size());
    for (int l = 0; l < c.n_layer; ++l) att_next_[l].store(0, std::memory_order_relaxed);
    for (int i = 0; i < c.n_layer * kMatrices + 1; ++i) mm_next_[i].store(0, std::memory_order_relaxed);

    float* x = x_.data();      // [T, n_embd]
    float* xb = xb_.data();    // [T, q_dim or n_embd]
    float* xb2 = xb2_.data();  // [T, n_embd]
    float* q = q_.data();      // [T, q_dim]
    float* k = k_.data();      // [T, kv_dim]
    float* v = v_.data();      // [T, kv_dim]
    float* hb = hb_.data();    // [T, n_ff]
    float* hb2 = hb2_.data();  // [T, n_ff]
    float* rc = rope_cos_.data();  // [T, half]
    float* rs = rope_sin_.data();  // [T, half]
    float* xo = xo_.data();    // [L, n_embd]
    uint8_t* xq[3] = {xq_[0].data(), xq_[1].data(), xq_[2].data()};  // [T, <= xq_row_bytes_] each

    // Quantizes rows [r0, r1) of a (k floats per row; row r read from a[gather[r]] when gathering) for the
    // weights ms; weights whose activation format equals an earlier one's share its buffer. slot[i] receives
    // the buffer index of ms[i].
    auto quantize_for = [&](const Matrix* const* ms, int nm, int* slot, const float* a, int64_t lda, int64_t r0,
                            int64_t r1, const int32_t* gather = nullptr) {
        std::pair<Type, bool> done[3];  // activation formats: vec_dot_type, packed rows
        int n_done = 0;
        for (int i = 0; i < nm; ++i) {
            const Matrix& m = *ms[i];
            const std::pair<Type, bool> fmt{traits(m.type, isa).vec_dot_type, uses_packed(m, isa)};
            slot[i] = -1;
            for (int j = 0; j < n_done; ++j)
                if (done[j] == fmt) slot[i] = j;
            if (slot[i] >= 0) continue;
            slot[i] = n_done;
            done[n_done++] = fmt;
            const size_t stride = xq_stride(m, isa);  // rows back to back, as the matmul reads them
            const TypeTraits& at = traits(fmt.first, isa);
            for (int64_t r = r0; r < r1; ++r) {
                const float* ar = a + (gather ? gather[r] : r) * lda;
                uint8_t* out = xq[slot[i]] + r * stride;
                if (fmt.second)
                    quantize_packed_row(m.type, ar, m.cols, out, isa);
                else
                    at.quantize(ar, out, m.cols);
            }
        }
    };
    // Matrix `id` of the step (layer * kMatrices + its index; the head last): packed ones share out their units
    // through that matrix's counter.
    auto mm = [&](const Matrix& W, const uint8_t* in, int64_t n, float* y, int64_t ldy, int ith, int nth, int id) {
        if (uses_packed(W, isa))
            matmul_packed_rows(W.type, W.packed, W.rows, W.cols, in, n, y, ldy, ith, nth, isa, &mm_next_[size_t(id)]);
        else
            matmul_rows(W.type, W.data, W.rows, W.cols, in, n, y, ldy, ith, nth, isa);
    };
    // Before the barrier that precedes mm(W, n): the start of this thread's weights, from memory into L2.
    auto warm = [&](const Matrix& W, int64_t n, int ith, int nth) {
        if (uses_packed(W, isa))
            prefetch_packed_start(W.type, W.packed, W.rows, W.cols, n, ith, nth, isa, kWarmBytes);
    };

    pool_.run([&](int ith, int nth) {
        int64_t r0, r1;  // this thread's token rows
        split_range(T, ith, nth, r0, r1);
        int slot[3];
        bool pruned = false;  // the last layer ran on the logit rows only

        for (int l = 0; l < c.n_layer; ++l) {
            const LayerWeights& W = w_.layers[size_t(l)];

            // residual (or embedding) -> attention norm -> activations for wq, wk, wv
            for (int64_t t = r0; t < r1; ++t) {
                float* xt = x + t * n_embd;
                if (l == 0) {
                    const Matrix& E = w_.tok_embeddings;
                    traits(E.type, isa).dequantize(E.data + size_t(batch.tokens[t]) * E.row_bytes, xt, n_embd);
                    rope_angles(c.rope, tok_pos_[t], rc + t * half, rs + t * half);
                } else {
                    for (int i = 0; i < n_embd; ++i) xt[i] += xb2[t * n_embd + i];
                }
                rmsnorm(xb + t * n_embd, xt, W.attn_norm.data(), n_embd, c.rms_eps, isa);
            }
            const Matrix* qkv[3] = {&W.wq, &W.wk, &W.wv};
            quantize_for(qkv, 3, slot, xb, n_embd, r0, r1);
            if (l == 0) warm(W.wq, T, ith, nth);  // (later layers' were asked for after the previous w2)
            pool_.barrier();

            mm(W.wq, xq[slot[0]], T, q, q_dim, ith, nth, l * kMatrices + 0);
            mm(W.wk, xq[slot[1]], T, k, kv_dim, ith, nth, l * kMatrices + 1);
            mm(W.wv, xq[slot[2]], T, v, kv_dim, ith, nth, l * kMatrices + 2);
            pool_.barrier();

            // biases, RoPE, K and V into the cache
            for (int64_t t = r0; t < r1; ++t) {
                float* qt = q + t * q_dim;
                float* kt = k + t * kv_dim;
                float* vt = v + t * kv_dim;
                if (!W.bq.empty()) for (int i = 0; i < q_dim; ++i) qt[i] += W.bq[i];
                if (!W.bk.empty()) for (int i = 0; i < kv_dim; ++i) kt[i] += W.bk[i];
                if (!W.bv.empty()) for (int i = 0; i < kv_dim; ++i) vt[i] += W.bv[i];
                for (int h = 0; h < c.n_head; ++h) rope_apply(c.rope, qt + h * hd, rc + t * half, rs + t * half);
                for (int h = 0; h < c.n_head_kv; ++h) rope_apply(c.rope, kt + h * hd, rc + t * half, rs + t * half);
                const SeqSpan& sq = batch.seqs[tok_seq_[t]];
                const int pos = tok_pos_[t];
                const int blk = sq.blocks[pos / bs], row = pos % bs;
                cache.store(l, blk, row, kt, vt, isa);
            }
            pool_.barrier();

            // Past the last layer's K/V writes only the rows that want logits matter: the rest of that layer
            // runs on those L rows alone (gathered; its residual rows kept in xo), or not at all when L == 0.
            const bool prune = l == c.n_layer - 1 && L < T;
            if (prune && L == 0) break;
            const int64_t n = prune ? L : T;        // rows from here to the end of the layer
            const int32_t* src = prune ? batch.logit_rows : nullptr;  // row i reads token row src[i]
            float* xr = prune ? xo : x;             // [n, n_embd] residual rows
            int64_t n0, n1;
            split_range(n, ith, nth, n0, n1);
            warm(W.wo, n, ith, nth);

            // attention -> xb [T, q_dim]
            {
                float* scratch = att_scratch_[size_t(ith)].data();
                for (int it; (it = att_next_[l].fetch_add(1, std::memory_order_relaxed)) < n_items;) {
                    const AttnItem& a = items_[size_t(it)];
                    const SeqSpan& sq = batch.seqs[a.seq];
                    const KVSeqView view{&cache, l, sq.blocks, sq.n_blocks};
                    const AttentionShape shape{hd, a.kv_head, a.n_heads, c.attn_scale};
                    const size_t first = size_t(a.t0) * q_dim + (size_t(a.kv_head) * group + a.head0) * hd;
                    attention(shape, view, q + first, q_dim, &tok_pos_[size_t(a.t0)], a.nt, xb + first, q_dim,
                              scratch, isa);
                }
            }
            pool_.barrier();

            const Matrix* o[1] = {&W.wo};
            quantize_for(o, 1, slot, xb, q_dim, n0, n1, src);
            pool_.barrier();

            mm(W.wo, xq[slot[0]], n, xb2, n_embd, ith, nth, l * kMatrices + 3);
            warm(W.w1, n, ith, nth);
            pool_.barrier();

            // residual -> ffn norm -> activations for w1, w3
            for (int64_t i = n0; i < n1; ++i) {
                const float* xs = x + (src ? src[i] : i) * n_embd;
                float* xi = xr + i * n_embd;
                for (int j = 0; j < n_embd; ++j) xi[j] = xs[j] + xb2[i * n_embd + j];
                rmsnorm(xb + i * n_embd, xi, W.ffn_norm.data(), n_embd, c.rms_eps, isa);
            }
            const Matrix* gu[2] = {&W.w1, &W.w3};
            quantize_for(gu, 2, slot, xb, n_embd, n0, n1);
            pool_.barrier();

            mm(W.w1, xq[slot[0]], n, hb, n_ff, ith, nth, l * kMatrices + 4);
            mm(W.w3, xq[slot[1]], n, hb2, n_ff, ith, nth, l * kMatrices + 5);
            warm(W.w2, n, ith, nth);
            pool_.barrier();

            for (int64_t i = n0; i < n1; ++i) swiglu(hb + i * n_ff, hb + i * n_ff, hb2 + i * n_ff, n_ff, isa);
            const Matrix* d[1] = {&W.w2};
            quantize_for(d, 1, slot, hb, n_ff, n0, n1);
            pool_.barrier();

            mm(W.w2, xq[slot[0]], n, xb2, n_embd, ith, nth, l * kMatrices + 6);
            if (l + 1 < c.n_layer) warm(w_.layers[size_t(l) + 1].wq, T, ith, nth);
            else if (L) warm(w_.output, L, ith, nth);
            pool_.barrier();
            pruned = prune;
        }
        if (L == 0) return;

        // the rows that want logits: last residual -> final norm -> output head
        int64_t i0, i1;
        split_range(L, ith, nth, i0, i1);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = pruned ? i : batch.logit_rows[i];
            const float* xs = (pruned ? xo : x) + t * n_embd;
            float* xi = xo + i * n_embd;
            for (int j = 0; j < n_embd; ++j) xi[j] = xs[j] + xb2[t * n_embd + j];
            rmsnorm(xi, xi, w_.norm.data(), n_embd, c.rms_eps, isa);
        }
        const Matrix* out[1] = {&w_.output};
        quantize_for(out, 1, slot, xo, n_embd, i0, i1);
        pool_.barrier();
        mm(w_.output, xq[slot[0]], L, logits, c.n_vocab, ith, nth, c.n_layer * kMatrices);
        if (!argmax) return;
        // each row in nth shares; a thread takes consecutive (row, share) pairs
        pool_.barrier();
        int64_t u0, u1;
        split_range(int64_t(L) * nth, ith, nth, u0, u1);
        for (int64_t u = u0; u < u1; ++u) {
            int64_t v0, v1;
            split_range(c.n_vocab, int(u % nth), nth, v0, v1);
            ArgMax r = rz::argmax(logits + u / nth * c.n_vocab + v0, v1 - v0, isa);
            if (r.index >= 0) r.index += v0;
            argmax_parts_[size_t(u)] = r;
        }
    });
    for (int i = 0; argmax && i < L; ++i) {
        ArgMax best{0.f, -1};
        for (int t = 0; t < pool_.size(); ++t) best = argmax_merge(best, argmax_parts_[size_t(i) * pool_.size() + t]);
        argmax[i] = int32_t(best.index);
    }
}

}  // namespace rz
