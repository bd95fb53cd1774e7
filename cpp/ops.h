// The small ops of a llama-family forward pass: RMSNorm, RoPE, SwiGLU, attention over the paged KV cache.
//
// Each op has a portable version and an AVX2/FMA/F16C one (compiled through per-function target attributes
// in ops.cpp, entered only when `isa` says the CPU has them), chosen by the `isa` argument as matmul does.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kv_cache.h"
#include "matmul.h"

namespace rz {

// y = x / sqrt(mean(x²) + eps) * w, over n elements (the sum of squares in double, as ggml does).
// y may alias x.
void rmsnorm(float* y, const float* x, const float* w, int64_t n, float eps, Isa isa);

// h = silu(g) * u over n elements; h may alias g or u.
void swiglu(float* h, const float* g, const float* u, int64_t n, Isa isa);

// x = round_to_f16(x): the precision K, V and Q have in llama.cpp's attention.
void round_to_f16(float* x, int64_t n, Isa isa);
void f32_to_f16_row(const float* x, f16_t* y, int64_t n, Isa isa);

// ---- argmax -----------------------------------------------------------------------------------------------
// The first index of the largest of n floats, a NaN counting as larger than any number (numpy.argmax's rule:
// the first NaN wins); index -1 when n is 0.
struct ArgMax {
    float value;
    int64_t index;
};
ArgMax argmax(const float* x, int64_t n, Isa isa);
// The argmax of two ranges' argmaxes, `a` from the earlier range (ties go to it).
inline ArgMax argmax_merge(ArgMax a, ArgMax b) {
    if (a.index < 0 || a.value != a.value) return a.index < 0 ? b : a;
    return b.index >= 0 && (b.value != b.value || b.value > a.value) ? b : a;
}

// ---- RoPE ------------------------------------------------------------------------------------------------
struct RopeParams {
    int n_rot = 0;                   // rotated dims per head (<= head_dim), even
    bool neox = false;               // pairs (i, i + n_rot/2) (NeoX, qwen2) instead of (2i, 2i+1) (llama)
    float freq_base = 10000.f;
    float freq_scale = 1.f;          // 1 / linear scaling factor
    float ext_factor = 0.f;          // YaRN extrapolation mix; 0 = plain (linear) scaling
    float attn_factor = 1.f;         // YaRN magnitude scale of cos/sin
    float beta_fast = 32.f, beta_slow = 1.f;
    int n_ctx_orig = 0;              // context the model was trained with (YaRN)
    const float* freq_factors = nullptr;  // [n_rot/2] per-pair divisors of theta (llama3 rope_freqs), or null
};

// cos/sin of each of the n_rot/2 rotation angles at position pos.
void rope_angles(const RopeParams& p, int32_t pos, float* cos_out, float* sin_out);
// Rotates the first n_rot dims of one head (head_dim floats) by the angles of rope_angles.
void rope_apply(const RopeParams& p, float* x, const float* cos_t, const float* sin_t);

// ---- attention ---------------------------------------------------------------------------------------------
// Causal attention of the n_group query heads that share KV head kv_head, for n_tok tokens of one sequence:
// one pass over the cache blocks with an online softmax (running max and sum; no score matrix), so each K/V
// row is read once for all of them. Token t's queries are q + t*ldq + g*head_dim (g < n_group, already
// rotated), it sees positions [0, last_pos[t]], and its outputs go to out + t*ldo + g*head_dim. K and V are
// read only through `kv`. Queries are rounded to F16 first, as llama.cpp does.
// scratch: attention_scratch_floats(head_dim, block_size, n_tok * n_group) floats, private to the caller.
struct AttentionShape {
    int head_dim;
    int kv_head;
    int n_group;  // query heads per KV head (consecutive in a token's q row)
    float scale;  // usually 1/sqrt(head_dim)
};
size_t attention_scratch_floats(int head_dim, int block_size, int max_queries);
void attention(const AttentionShape& a, const KVSeqView& kv, const float* q, int64_t ldq, const int32_t* last_pos,
               int n_tok, float* out, int64_t ldo, float* scratch, Isa isa);

}  // namespace rz
