// The CPU loops for the baseline instruction set of the build (SSE2 on x86-64).
#include <cstdint>

#include "worm_fast/cpu_kernels.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // the baseline of x86-64: the vector square roots of AdamW
#define WF_HAVE_SSE2 1
#else
#define WF_HAVE_SSE2 0
#endif

#define WF_ISA isa_default
#define WF_ISA_NAME "default"
#define WF_HAVE_FMA 0
#define WF_HAVE_F16C 0
#define WF_HAVE_AVX2 0
#define WF_HAVE_AVX512 0
#include "kernels_impl.h"

namespace worm_fast::cpu {
const KernelTable& kernels_default() { return isa_default::kTable; }
}  // namespace worm_fast::cpu
