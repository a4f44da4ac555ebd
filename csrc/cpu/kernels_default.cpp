// The CPU loops for the baseline instruction set of the build (SSE2 on x86-64).
#include <cstdint>

#include "worm_fast/cpu_kernels.h"

#define WF_ISA isa_default
#define WF_ISA_NAME "default"
#define WF_HAVE_FMA 0
#define WF_HAVE_F16C 0
#define WF_HAVE_AVX512 0
#include "kernels_impl.h"

namespace worm_fast::cpu {
const KernelTable& kernels_default() { return isa_default::kTable; }
}  // namespace worm_fast::cpu
