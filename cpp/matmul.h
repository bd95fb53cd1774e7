// Quantized matrix products: weights in their GGUF block type times a batch of float activation rows.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quants.h"
#include "threadpool.h"

namespace rz {

// Kernel table of the ISA chosen at import (or forced by REALIZAR_ISA / set_isa).
const TypeTraits& traits(Type t);
const TypeTraits& traits(Type t, Isa isa);
bool type_supported(Type t);

// Activation rows per column block of a product (here and in packed.h's): the block, in the activation format,
// should stay in L2 while every weight tile of the thread's rows passes over it, each tile reused from L1.
constexpr size_t kActivationBlockBytes = 192 * 1024;

// Bytes one activation row of k elements needs in the weight type's vec_dot_type.
size_t activation_row_bytes(Type weight_type, int64_t k);

// y[i*ldy + r] = dot(W row r, x row i) for r in [0, rows), i in [0, n).
//   W: rows × k in `wtype` blocks, rows contiguous (row stride = k / block_size * type_size bytes)
//   x: n × k float32, row stride k
// Work split across the pool (the caller quantizes the activations, then the threads take units of row chunks
// x activation blocks from a shared counter); `scratch` is resized to hold the quantized activations.
// Every product is computed with the same operations whatever n, the thread count or the split: a row's
// results do not depend on the rest of the batch (likewise for matmul_rows).
void matmul(ThreadPool& pool, Type wtype, const void* W, int64_t rows, int64_t k, const float* x, int64_t n,
            float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa);

// The two halves of matmul for callers already inside pool.run (a forward pass): every thread calls
// quantize_activations, then pool.barrier(), then matmul_rows.
// xq holds n rows of activation_row_bytes(wtype, k) bytes.
void quantize_activations(Type wtype, const float* x, int64_t n, int64_t k, uint8_t* xq, int ith, int nth,
                          Isa isa);
void matmul_rows(Type wtype, const void* W, int64_t rows, int64_t k, const uint8_t* xq, int64_t n, float* y,
                 int64_t ldy, int ith, int nth, Isa isa);

// The ISA chosen at import: REALIZAR_ISA if set (validated), else the best the CPU and OS support.
Isa active_isa();
Isa best_supported_isa();
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument on an unknown name
Isa checked_isa(Isa isa);                // throws std::invalid_argument when the CPU lacks it
void set_active_isa(Isa isa);

}  // namespace rz
