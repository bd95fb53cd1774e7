// AVX-512 (F, BW, VL, DQ, VNNI) kernels. Compiled with their flags; only reached when cpuid says so.
#include "quants.h"

namespace rz {
void fill_kernels_avx512(KernelTable&) {}
}  // namespace rz
