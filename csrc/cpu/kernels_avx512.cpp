// The CPU loops compiled for AVX-512 (F, BW, VL, DQ) + AVX2 + FMA + F16C + POPCNT,
// chosen at run time only when the CPU has them (see selected_kernels in ops.cpp). Headers are included
// before the target pragma so that nothing outside kernels_impl.h is built for it.
#include <cstdint>

#include "worm_fast/cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt,bmi,bmi2")
#endif

#define WF_ISA isa_avx512
#define WF_ISA_NAME "avx512"
#define WF_HAVE_FMA 1
#define WF_HAVE_F16C 1
#define WF_HAVE_SSE2 1
#define WF_HAVE_AVX2 1
#define WF_HAVE_AVX512 1
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace worm_fast::cpu {
const KernelTable& kernels_avx512() { return isa_avx512::kTable; }
}  // namespace worm_fast::cpu

#else  // not x86-64: never selected, the baseline loops stand in

namespace worm_fast::cpu {
const KernelTable& kernels_avx512() { return kernels_default(); }
}  // namespace worm_fast::cpu

#endif
