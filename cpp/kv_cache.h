// Paged KV cache: a pool of fixed-size blocks of positions, K and V stored as F16 (llama.cpp's default) or as
// Q8_0 (llama.cpp's --cache-type-k/v q8_0: each head's values of a position quantized in blocks of 32, 34 bytes
// per 32 values, so about half the memory and half the bytes attention reads).
//
// The layout is head-major, [layer][kv_head][block][row][head_dim]: attention reads one KV head's rows of a block
// as one contiguous run (2 KiB for 16 positions of 64 F16 values), and those of consecutive blocks back to back,
// which the memory system streams at full rate (10 GB/s on one core of the EPYC we measure on). Row-major rows
// (picking 128 bytes out of every 384) or head-major blocks (2 KiB out of every 6) read at 3.8 and 4.3 GB/s.
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
    // n_kv_dim = n_head_kv * head_dim (head_dim 0: n_kv_dim, one head); type F16 or Q8_0 (then head_dim a
    // multiple of 32). Storage is allocated but not touched: pages are committed on first write.
    KVCache(int n_layer, int n_kv_dim, int n_blocks, int block_size = 16, Type type = Type::F16, int head_dim = 0);

    int n_layer() const { return n_layer_; }
    int n_kv_dim() const { return n_kv_dim_; }
    int n_blocks() const { return n_blocks_; }
    int block_size() const { return block_size_; }
    int head_dim() const { return head_dim_; }
    int n_heads() const { return n_kv_dim_ / head_dim_; }
    Type type() const { return type_; }
    size_t head_row_bytes() const { return head_row_bytes_; }  // one head's values of one position
    size_t nbytes() const { return 2 * bytes_; }

    // One (layer, block, kv head): block_size rows of head_row_bytes, row = position within the block.
    uint8_t* k_head(int layer, int block, int head) { return k_.get() + offset(layer, block, head); }
    uint8_t* v_head(int layer, int block, int head) { return v_.get() + offset(layer, block, head); }
    const uint8_t* k_head(int layer, int block, int head) const { return k_.get() + offset(layer, block, head); }
    const uint8_t* v_head(int layer, int block, int head) const { return v_.get() + offset(layer, block, head); }

    // Stores position `row` of `block` in `layer`: K and V rows of n_kv_dim floats, F16-rounded or quantized to
    // Q8_0 (llama.cpp's quantize_row_q8_0, bit for bit).
    void store(int layer, int block, int row, const float* k, const float* v, Isa isa);

    // Copies every layer's K and V rows of block src into block dst (copy-on-write of a shared block).
    void copy_block(int src, int dst);

private:
    size_t offset(int layer, int block, int head) const {
        return ((size_t(layer) * size_t(n_heads()) + size_t(head)) * size_t(n_blocks_) + size_t(block)) *
               size_t(block_size_) * head_row_bytes_;
    }

    int n_layer_, n_kv_dim_, n_blocks_, block_size_, head_dim_;
    Type type_;
    size_t head_row_bytes_, bytes_;
    std::unique_ptr<uint8_t[]> k_, v_;  // [n_layer][n_kv_dim / head_dim][n_blocks][block_size][head_row_bytes]
};

// One sequence's view of one layer of the cache through its block table.
struct KVSeqView {
    const KVCache* cache;
    int layer;
    const int32_t* blocks;  // block table: blocks[i] holds positions [i*block_size, (i+1)*block_size)
    int32_t n_blocks;

    int block_size() const { return cache->block_size(); }
    Type type() const { return cache->type(); }
    size_t head_row_bytes() const { return cache->head_row_bytes(); }  // between consecutive positions
    // KV head h's rows of block i of the table: block_size positions × head_row_bytes, contiguous.
    const uint8_t* k_rows(int i, int h) const { return cache->k_head(layer, blocks[i], h); }
    const uint8_t* v_rows(int i, int h) const { return cache->v_head(layer, blocks[i], h); }
};

}  // namespace rz
