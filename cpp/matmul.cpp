#include "matmul.h"

#include <stdexcept>

namespace rz {

size_t activation_row_bytes(Type wtype, int64_t k) {
    const TypeTraits& at = traits(traits(wtype, Isa::Scalar).vec_dot_type, Isa::Scalar);
    return size_t(k / at.block_size) * at.type_size;
}

void quantize_activations(Type wtype, const float* x, int64_t n, int64_t k, uint8_t* xq, int ith, int nth,
                          Isa isa) {
    const TypeTraits& at = traits(traits(wtype, isa).vec_dot_type, isa);
    const size_t row_bytes = size_t(k / at.block_size) * at.type_size;
    int64_t begin, end;
    split_range(n, ith, nth, begin, end);
    for (int64_t i = begin; i < end; ++i) at.quantize(x + i * k, xq + i * row_bytes, k);
}

void matmul_rows(Type wtype, const void* W, int64_t rows, int64_t k, const uint8_t* xq, int64_t n, float* y,
                 int64_t ldy, int ith, int nth, Isa isa) {
    const TypeTraits& wt = traits(wtype, isa);
    const TypeTraits& at = traits(wt.vec_dot_type, isa);
    const size_t w_row_bytes = size_t(k / wt.block_size) * wt.type_size;
    const size_t x_row_bytes = size_t(k / at.block_size) * at.type_size;
    const auto* w = static_cast<const uint8_t*>(W);
    int64_t begin, end;
    split_range(rows, ith, nth, begin, end);
    // A weight row is read from memory once and reused from L1 for every activation row.
    for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < n; ++i) wt.vec_dot(k, y + i * ldy + r, w + r * w_row_bytes, xq + i * x_row_bytes);
}

void matmul(ThreadPool& pool, Type wtype, const void* W, int64_t rows, int64_t k, const float* x, int64_t n,
            float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa) {
    const TypeTraits& wt = traits(wtype, isa);
    if (!wt.vec_dot) throw std::invalid_argument(std::string("no dot product for type ") + wt.name);
    if (k % wt.block_size) throw std::invalid_argument("k is not a multiple of the block size");
    scratch.resize(activation_row_bytes(wtype, k) * size_t(n));
    uint8_t* xq = scratch.data();
    pool.run([&](int ith, int nth) {
        quantize_activations(wtype, x, n, k, xq, ith, nth, isa);
        pool.barrier();
        matmul_rows(wtype, W, rows, k, xq, n, y, ldy, ith, nth, isa);
    });
}

}  // namespace rz
