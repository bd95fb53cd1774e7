#include "packed.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "matmul.h"

namespace rz {
namespace {

constexpr int64_t kClaimUnits = 8;  // most units a thread claims at once from a shared counter

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

size_t packed_block_bytes(Type wtype) {
    switch (wtype) {
        case Type::Q4_0: return sizeof(block_q4_0x8);
        case Type::Q4_1: return sizeof(block_q4_1x8);
        case Type::Q5_0: return sizeof(block_q5_0x8);
        case Type::Q8_0: return sizeof(block_q8_0x8);
        case Type::Q4_K: return sizeof(block_q4_Kx8);
        default: return 0;
    }
}

int64_t block_elems(Type wtype) { return wtype == Type::Q4_K ? QK_K : 32; }

// Block b of rows 8g..8g+7 -> one packed block: scales (and mins) in row order, then the quant bytes in chunks
// of 4 bytes per row (P's layout in packed.h; Q4_K's qs[p][j] is chunk 8p + j).
template <typename B, typename P>
void pack_blocks(const B* w, int64_t rows, int64_t nb, P* out) {
    constexpr int kChunks = sizeof(B::qs) / 4;
    for (int64_t g = 0; g < rows / kPackRows; ++g)
        for (int64_t b = 0; b < nb; ++b) {
            P& o = out[g * nb + b];
            uint8_t* qs = reinterpret_cast<uint8_t*>(o.qs);
            for (int r = 0; r < kPackRows; ++r) {
                const B& src = w[(g * kPackRows + r) * nb + b];
                o.d[r] = src.d;
                if constexpr (std::is_same_v<B, block_q4_1>) o.m[r] = src.m;
                if constexpr (std::is_same_v<B, block_q4_K>) {
                    o.dmin[r] = src.dmin;
                    for (int sb = 0; sb < 8; ++sb)
                        get_scale_min_k4(sb, src.scales, &o.sc[sb][r], &o.m[sb / 2][r][sb % 2]);
                }
                if constexpr (std::is_same_v<B, block_q5_0>) {
                    uint32_t qh;
                    std::memcpy(&qh, src.qh, 4);
                    for (int i = 0; i < 4; ++i) {
                        uint8_t v = 0;
                        for (int h = 0; h < 8; ++h) v |= uint8_t(((qh >> (16 * (h % 2) + 4 * (h / 2) + i)) & 1) ^ 1) << h;
                        o.nq[4 * r + i] = v;
                    }
                }
                for (int j = 0; j < kChunks; ++j) std::memcpy(qs + 32 * j + 4 * r, src.qs + 4 * j, 4);
            }
        }
}

int scale_floats_per_block(Type wtype) {  // in the activation row's tail
    switch (wtype) {
        case Type::Q4_1: return 2;  // Q8_1: d, s
        case Type::Q4_0:
        case Type::Q5_0:
        case Type::Q8_0: return 1;  // Q8_0: d
        default: return 0;
    }
}

// A packed tile and the pass shape it takes: up to `groups` groups of 8 rows x `cols` activation rows.
struct PackedKernel {
    packed_tile_fn tile;
    int groups, cols;
};
PackedKernel packed_kernel(Type wtype, Isa isa) {
    const PackedKernel k = isa == Isa::Avx512 ? PackedKernel{packed_tile_avx512(wtype), kPassGroupsAvx512, kPassColsAvx512}
                                              : PackedKernel{packed_tile_avx2(wtype), kPassGroups, kPassCols};
    if (!k.tile || isa == Isa::Scalar)
        throw std::invalid_argument(std::string("no packed kernel for ") + traits(wtype, Isa::Scalar).name + " at " +
                                    isa_name(isa));
    return k;
}

// How matmul_packed_rows splits a product into work units: (activation block, pass of the kernel's groups).
// Activation blocks stay in L2 while the passes go over them, each pass's weights reused from L1.
struct UnitPlan {
    size_t group_bytes, x_row_bytes;
    int64_t pass_groups, groups, passes, block, units, claim;
    UnitPlan(Type wtype, int64_t rows, int64_t k, int64_t n, int nth, const PackedKernel& kern)
        : group_bytes(size_t(k / block_elems(wtype)) * packed_block_bytes(wtype)),
          x_row_bytes(packed_activation_row_bytes(wtype, k)), pass_groups(kern.groups), groups(rows / kPackRows),
          passes((groups + pass_groups - 1) / pass_groups) {
        block = std::max<int64_t>(kern.cols, int64_t(kActivationBlockBytes / x_row_bytes) / kern.cols * kern.cols);
        units = passes * ((n + block - 1) / block);
        // with a shared counter, claims of a few consecutive units: the next one's weights are known
        claim = std::max<int64_t>(1, std::min<int64_t>(kClaimUnits, units / (4 * nth)));
    }
    int64_t first_group(int64_t u) const { return u % passes * pass_groups; }
};

}  // namespace

bool packable(Type wtype, int64_t rows, int64_t k) {
    return packed_block_bytes(wtype) && rows > 0 && rows % kPackRows == 0 && k > 0 && k % block_elems(wtype) == 0 &&
           int(best_supported_isa()) >= int(Isa::Avx2);
}

size_t packed_bytes(Type wtype, int64_t rows, int64_t k) {
    return size_t(rows / kPackRows) * size_t(k / block_elems(wtype)) * packed_block_bytes(wtype);
}

size_t packed_activation_row_bytes(Type wtype, int64_t k) {
    const int per = scale_floats_per_block(wtype);
    const size_t q = activation_row_bytes(wtype, k);
    const size_t sums = per == 1 ? sizeof(int32_t) : 0;  // Q8_0 rows: each block's quant sum after the scales
    return per ? packed_scales_offset(q) + size_t(k / 32) * (size_t(per) * sizeof(float) + sums) : q;
}

void quantize_packed_row(Type wtype, const float* x, int64_t k, uint8_t* out, Isa isa) {
    const TypeTraits& at = traits(traits(wtype, isa).vec_dot_type, isa);
    at.quantize(x, out, k);
    const int64_t nb = k / 32;
    float* sc = reinterpret_cast<float*>(out + packed_scales_offset(activation_row_bytes(wtype, k)));
    switch (scale_floats_per_block(wtype)) {
        case 2: {
            const block_q8_1* b = reinterpret_cast<const block_q8_1*>(out);
            for (int64_t i = 0; i < nb; ++i) {
                sc[2 * i] = f16_to_f32(b[i].d);
                sc[2 * i + 1] = f16_to_f32(b[i].s);
            }
            break;
        }
        case 1: {
            const block_q8_0* b = reinterpret_cast<const block_q8_0*>(out);
            int32_t* sums = reinterpret_cast<int32_t*>(sc + nb);
            for (int64_t i = 0; i < nb; ++i) {
                sc[i] = f16_to_f32(b[i].d);
                int32_t sum = 0;
                for (int j = 0; j < 32; ++j) sum += b[i].qs[j];
                sums[i] = sum;
            }
            break;
        }
        default: break;
    }
}

std::vector<uint8_t> pack_weights(Type wtype, const void* w, int64_t rows, int64_t k) {
    if (!packable(wtype, rows, k))
        throw std::invalid_argument(std::string("no packed layout for a ") + std::to_string(rows) + " x " +
                                    std::to_string(k) + " " + traits(wtype, Isa::Scalar).name + " matrix here");
    const int64_t nb = k / block_elems(wtype);
    std::vector<uint8_t> out(packed_bytes(wtype, rows, k));
    uint8_t* o = out.data();
    switch (wtype) {
        case Type::Q4_0: pack_blocks(static_cast<const block_q4_0*>(w), rows, nb, reinterpret_cast<block_q4_0x8*>(o)); break;
        case Type::Q4_1: pack_blocks(static_cast<const block_q4_1*>(w), rows, nb, reinterpret_cast<block_q4_1x8*>(o)); break;
        case Type::Q5_0: pack_blocks(static_cast<const block_q5_0*>(w), rows, nb, reinterpret_cast<block_q5_0x8*>(o)); break;
        case Type::Q4_K: pack_blocks(static_cast<const block_q4_K*>(w), rows, nb, reinterpret_cast<block_q4_Kx8*>(o)); break;
        default: pack_blocks(static_cast<const block_q8_0*>(w), rows, nb, reinterpret_cast<block_q8_0x8*>(o)); break;
    }
    return out;
}

void matmul_packed_rows(Type wtype, const uint8_t* packed, int64_t rows, int64_t k, const uint8_t* xq, int64_t n,
                        float* y, int64_t ldy, int ith, int nth, Isa isa, std::atomic<int64_t>* next) {
    const PackedKernel kern = packed_kernel(wtype, isa);
    if (n <= 0) return;
    const UnitPlan p(wtype, rows, k, n, nth, kern);
    const int64_t tc = kern.cols;
    // Unit u: activation block u / passes, pass u % passes (consecutive passes read consecutive weight bytes).
    // ahead >= 0: the unit this thread runs next. A step's matrices do not stay in cache, so its weights are
    // asked for, a slice before each tile call, and arrive in L2 while this unit computes.
    auto unit = [&](int64_t u, int64_t ahead) {
        const int64_t cb = u / p.passes * p.block, ce = min64(cb + p.block, n), g = p.first_group(u);
        const int ng = int(min64(p.pass_groups, p.groups - g));
        const int64_t ga = ahead < 0 ? 0 : p.first_group(ahead);
        const uint8_t* ahead_w = packed + size_t(ga) * p.group_bytes;
        const size_t ahead_bytes = ahead < 0 ? 0 : size_t(min64(p.pass_groups, p.groups - ga)) * p.group_bytes;
        const int64_t calls = (ce - cb + tc - 1) / tc;
        const size_t slice = (ahead_bytes / size_t(calls) + 63) / 64 * 64;
        size_t done = 0;
        for (int64_t c = cb; c < ce; c += tc) {
            for (size_t end = std::min(ahead_bytes, done + slice); done < end; done += 64)
                __builtin_prefetch(ahead_w + done, 0, 2);
            kern.tile(k, packed + size_t(g) * p.group_bytes, p.group_bytes, xq + size_t(c) * p.x_row_bytes, p.x_row_bytes,
                 y + c * ldy + g * kPackRows, ldy, ng, int(min64(tc, ce - c)));
        }
    };
    if (next && n > 1) {  // (a single activation row streams the weights: fixed contiguous shares prefetch better)
        for (int64_t u0; (u0 = next->fetch_add(p.claim, std::memory_order_relaxed)) < p.units;) {
            const int64_t u1 = min64(u0 + p.claim, p.units);
            for (int64_t u = u0; u < u1; ++u) unit(u, u + 1 < u1 ? u + 1 : -1);
        }
    } else {
        int64_t u0, u1;
        split_range(p.units, ith, nth, u0, u1);
        for (int64_t u = u0; u < u1; ++u) unit(u, n > 1 && u + 1 < u1 ? u + 1 : -1);
    }
}

void prefetch_packed_start(Type wtype, const uint8_t* packed, int64_t rows, int64_t k, int64_t n, int ith, int nth,
                           Isa isa, size_t max_bytes) {
    if (n <= 0 || !packed_block_bytes(wtype)) return;
    const UnitPlan p(wtype, rows, k, n, nth, packed_kernel(wtype, isa));
    int64_t u0 = int64_t(ith) * p.claim, u1;  // a shared counter's claims usually go in thread order
    if (n == 1) split_range(p.units, ith, nth, u0, u1);
    if (u0 >= p.units) return;
    const size_t from = size_t(p.first_group(u0)) * p.group_bytes, total = size_t(p.groups) * p.group_bytes;
    for (size_t o = from; o < std::min(total, from + max_bytes); o += 64) __builtin_prefetch(packed + o, 0, 2);
}

void matmul_packed(ThreadPool& pool, Type wtype, const uint8_t* packed, int64_t rows, int64_t k, const float* x,
                   int64_t n, float* y, int64_t ldy, std::vector<uint8_t>& scratch, Isa isa) {
    if (!packable(wtype, rows, k)) throw std::invalid_argument("matmul_packed: no packed layout for this matrix");
    const size_t row_bytes = packed_activation_row_bytes(wtype, k);
    scratch.resize(row_bytes * size_t(n));
    for (int64_t i = 0; i < n; ++i) quantize_packed_row(wtype, x + i * k, k, scratch.data() + size_t(i) * row_bytes, isa);
    if (n == 0) return;
    pool.run([&](int ith, int nth) { matmul_packed_rows(wtype, packed, rows, k, scratch.data(), n, y, ldy, ith, nth, isa); });
}

}  // namespace rz
