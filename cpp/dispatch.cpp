// Runtime ISA selection and the per-ISA kernel tables.
#include <cpuid.h>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "matmul.h"

namespace rz {
namespace {

uint64_t xgetbv0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t(edx) << 32) | eax;
}

Isa detect_best_isa() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::Scalar;
    const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!(osxsave && avx && fma && f16c)) return Isa::Scalar;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return Isa::Scalar;  // OS saves SSE and AVX state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::Scalar;
    const bool avx2 = b & (1u << 5);
    if (!avx2) return Isa::Scalar;
    const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    const bool vnni = c & (1u << 11);
    const bool os_zmm = (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM0-15 upper halves, ZMM16-31
    if (f && dq && bw && vl && vnni && os_zmm) return Isa::Avx512;
    return Isa::Avx2;
}

struct Tables {
    KernelTable t[kNumIsa];
    Isa best;
    Isa active;
    Tables() {
        fill_kernels_scalar(t[0]);
        for (int i = 0; i < kNumTypeIds; ++i) t[1][i] = t[0][i];
        fill_kernels_avx2(t[1]);
        for (int i = 0; i < kNumTypeIds; ++i) t[2][i] = t[1][i];
        fill_kernels_avx512(t[2]);
        best = detect_best_isa();
        active = best;
    }
};

Tables& tables() {
    static Tables tb;
    return tb;
}

}  // namespace

Isa best_supported_isa() { return tables().best; }
Isa active_isa() { return tables().active; }

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Scalar: return "scalar";
        case Isa::Avx2: return "avx2";
        case Isa::Avx512: return "avx512";
    }
    return "?";
}

Isa parse_isa(const std::string& name) {
    for (int i = 0; i < kNumIsa; ++i)
        if (name == isa_name(Isa(i))) return Isa(i);
    throw std::invalid_argument("unknown ISA level '" + name + "' (expected scalar, avx2 or avx512)");
}

Isa checked_isa(Isa isa) {
    if (int(isa) > int(best_supported_isa()))
        throw std::invalid_argument(std::string("ISA level '") + isa_name(isa) +
                                    "' is not supported by this CPU (best: " + isa_name(best_supported_isa()) + ")");
    return isa;
}

void set_active_isa(Isa isa) { tables().active = checked_isa(isa); }

bool type_supported(Type t) {
    const int id = int(t);
    return id >= 0 && id < kNumTypeIds && tables().t[0][id].name != nullptr;
}

const TypeTraits& traits(Type t, Isa isa) {
    if (!type_supported(t)) throw std::invalid_argument("unsupported tensor type id " + std::to_string(int(t)));
    return tables().t[int(checked_isa(isa))][int(t)];
}

const TypeTraits& traits(Type t) { return traits(t, active_isa()); }

}  // namespace rz
