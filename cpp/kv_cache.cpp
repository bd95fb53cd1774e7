#include "kv_cache.h"

#include <stdexcept>
#include <string>

namespace rz {

KVCache::KVCache(int n_layer, int n_kv_dim, int n_blocks, int block_size)
    : n_layer_(n_layer), n_kv_dim_(n_kv_dim), n_blocks_(n_blocks), block_size_(block_size) {
    if (n_layer < 1 || n_kv_dim < 1 || n_blocks < 1 || block_size < 1)
        throw std::invalid_argument("KVCache: n_layer, n_kv_dim, n_blocks and block_size must be >= 1");
    if (block_size > 4096) throw std::invalid_argument("KVCache: block_size must be <= 4096");
    const unsigned __int128 elems =
        (unsigned __int128)n_layer * unsigned(n_blocks) * unsigned(block_size) * unsigned(n_kv_dim);
    if (elems > (unsigned __int128)(size_t(1) << 40))
        throw std::invalid_argument("KVCache: " + std::to_string(uint64_t(elems) * 4) + " bytes is too large");
    elems_ = size_t(elems);
    // new[] of a trivial type leaves the memory untouched: a cache sized for a long context costs only the
    // pages its sequences actually write.
    k_.reset(new f16_t[elems_]);
    v_.reset(new f16_t[elems_]);
}

void KVCache::copy_block(int src, int dst) {
    if (src < 0 || src >= n_blocks_ || dst < 0 || dst >= n_blocks_)
        throw std::invalid_argument("KVCache.copy_block: block id out of range [0, " + std::to_string(n_blocks_) + ")");
    if (src == dst) return;
    const size_t n = size_t(block_size_) * size_t(n_kv_dim_);
    for (int l = 0; l < n_layer_; ++l) {
        std::memcpy(k_block(l, dst), k_block(l, src), n * sizeof(f16_t));
        std::memcpy(v_block(l, dst), v_block(l, src), n * sizeof(f16_t));
    }
}

}  // namespace rz
