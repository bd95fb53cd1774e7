// AVX2 (+FMA, F16C) kernels. Compiled with -mavx2 -mfma -mf16c; only reached when cpuid says so.
#include "quants.h"

namespace rz {
void fill_kernels_avx2(KernelTable&) {}
}  // namespace rz
