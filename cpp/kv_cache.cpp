#include "kv_cache.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "matmul.h"
#include "ops.h"

namespace rz {

KVCache::KVCache(int n_layer, int n_kv_dim, int n_blocks, int block_size, Type type, int head_dim)
    : n_layer_(n_layer), n_kv_dim_(n_kv_dim), n_blocks_(n_blocks), block_size_(block_size),
      head_dim_(head_dim ? head_dim : n_kv_dim), type_(type) {
    if (n_layer < 1 || n_kv_dim < 1 || n_blocks < 1 || block_size < 1)
        throw std::invalid_argument("KVCache: n_layer, n_kv_dim, n_blocks and block_size must be >= 1");
    if (block_size > 4096) throw std::invalid_argument("KVCache: block_size must be <= 4096");
    if (head_dim_ < 1 || n_kv_dim % head_dim_)
        throw std::invalid_argument("KVCache: head_dim " + std::to_string(head_dim) + " does not divide n_kv_dim " +
                                    std::to_string(n_kv_dim));
    if (type == Type::F16) {
        head_row_bytes_ = size_t(head_dim_) * sizeof(f16_t);
    } else if (type == Type::Q8_0) {
        if (head_dim_ % QK8_0)
            throw std::invalid_argument("KVCache: a q8_0 cache needs head_dim a multiple of 32, got " +
                                        std::to_string(head_dim_));
        head_row_bytes_ = size_t(head_dim_ / QK8_0) * sizeof(block_q8_0);
    } else {
        throw std::invalid_argument("KVCache: type must be f16 or q8_0");
    }
    const unsigned __int128 bytes = (unsigned __int128)n_layer * unsigned(n_blocks) * unsigned(block_size) *
                                    unsigned(n_heads()) * head_row_bytes_;
    if (bytes > (unsigned __int128)(size_t(1) << 41))
        throw std::invalid_argument("KVCache: " + std::to_string(uint64_t(bytes) * 2) + " bytes is too large");
    bytes_ = size_t(bytes);
    // new[] of a trivial type leaves the memory untouched: a cache sized for a long context costs only the
    // pages its sequences actually write.
    k_.reset(new uint8_t[bytes_]);
    v_.reset(new uint8_t[bytes_]);
}

void KVCache::store(int layer, int block, int row, const float* k, const float* v, Isa isa) {
    const size_t at = size_t(row) * head_row_bytes_;
    const quantize_fn q8 = type_ == Type::Q8_0 ? traits(Type::Q8_0, isa).quantize : nullptr;
    for (int h = 0; h < n_heads(); ++h) {
        const float* kh = k + size_t(h) * head_dim_;
        const float* vh = v + size_t(h) * head_dim_;
        if (type_ == Type::F16) {
            f32_to_f16_row(kh, reinterpret_cast<f16_t*>(k_head(layer, block, h) + at), head_dim_, isa);
            f32_to_f16_row(vh, reinterpret_cast<f16_t*>(v_head(layer, block, h) + at), head_dim_, isa);
        } else {
            q8(kh, k_head(layer, block, h) + at, head_dim_);
            q8(vh, v_head(layer, block, h) + at, head_dim_);
        }
    }
}

void KVCache::copy_block(int src, int dst) {
    if (src < 0 || src >= n_blocks_ || dst < 0 || dst >= n_blocks_)
        throw std::invalid_argument("KVCache.copy_block: block id out of range [0, " + std::to_string(n_blocks_) + ")");
    if (src == dst) return;
    const size_t n = size_t(block_size_) * head_row_bytes_;
    for (int l = 0; l < n_layer_; ++l)
        for (int h = 0; h < n_heads(); ++h) {
            std::memcpy(k_head(l, dst, h), k_head(l, src, h), n);
            std::memcpy(v_head(l, dst, h), v_head(l, src, h), n);
        }
}

}  // namespace rz
