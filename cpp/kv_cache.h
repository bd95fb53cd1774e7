// Paged KV cache: a pool of fixed-size blocks of positions, K and V stored as F16 (llama.cpp's default).
//
// A sequence owns a block table: the ids of the blocks holding its positions [0, n) in order, position p
// lives in block blocks[p / block_size] at row p % block_size. Blocks are assigned by the caller (the
// engine's block manager); the cache itself only stores rows. Attention reads K and V only through
// KVSeqView, so the storage layout can change without touching the attention kernel.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "quants.h"

namespace rz {

class KVCache {
public:
    // n_kv_dim = n_head_kv * head_dim. Storage is allocated but not touched: pages are committed on first write.
    KVCache(int n_layer, int n_kv_dim, int n_blocks, int block_size = 16);

    int n_layer() const { return n_layer_; }
    int n_kv_dim() const { return n_kv_dim_; }
    int n_blocks() const { return n_blocks_; }
    int block_size() const { return block_size_; }
    size_t nbytes() const { return 2 * elems_ * sizeof(f16_t); }

    // One (layer, block): block_size rows of n_kv_dim halves, row = position within the block.
    f16_t* k_block(int layer, int block) { return k_.get() + offset(layer, block); }
    f16_t* v_block(int layer, int block) { return v_.get() + offset(layer, block); }
    const f16_t* k_block(int layer, int block) const { return k_.get() + offset(layer, block); }
    const f16_t* v_block(int layer, int block) const { return v_.get() + offset(layer, block); }

    // Copies every layer's K and V rows of block src into block dst (copy-on-write of a shared block).
    void copy_block(int src, int dst);

private:
    size_t offset(int layer, int block) const {
        return (size_t(layer) * size_t(n_blocks_) + size_t(block)) * size_t(block_size_) * size_t(n_kv_dim_);
    }

    int n_layer_, n_kv_dim_, n_blocks_, block_size_;
    size_t elems_;
    std::unique_ptr<f16_t[]> k_, v_;  // [n_layer][n_blocks][block_size][n_kv_dim]
};

// One sequence's view of one layer of the cache through its block table.
struct KVSeqView {
    const KVCache* cache;
    int layer;
    const int32_t* blocks;  // block table: blocks[i] holds positions [i*block_size, (i+1)*block_size)
    int32_t n_blocks;

    int block_size() const { return cache->block_size(); }
    int row_stride() const { return cache->n_kv_dim(); }  // halves between consecutive positions of a block
    // Rows of block i of the table (block_size positions × n_kv_dim); a head is a column range of them.
    const f16_t* k_rows(int i) const { return cache->k_block(layer, blocks[i]); }
    const f16_t* v_rows(int i) const { return cache->v_block(layer, blocks[i]); }
};

}  // namespace rz
