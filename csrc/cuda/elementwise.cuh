// What the multi-tensor optimizer kernels (masked_sgd.cu, masked_adamw.cu) share: the
// launch shape, vectorized loads and stores of kILP consecutive elements, and fused
// multiply-add in the compute type.
#pragma once

#include <cstdint>

namespace worm_fast::cuda {

constexpr int kBlockSize = 512;
constexpr int kILP = 4;  // consecutive elements per thread and iteration
constexpr int64_t kChunkSize = 65536;
static_assert(kChunkSize % (kBlockSize * kILP) == 0, "chunks start on whole vectors");

template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

template <typename T>
__device__ __forceinline__ void load_vec(T* dst, const T* src) {
  *reinterpret_cast<Vec<T>*>(dst) = *reinterpret_cast<const Vec<T>*>(src);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* dst, const T* src) {
  *reinterpret_cast<Vec<T>*>(dst) = *reinterpret_cast<const Vec<T>*>(src);
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

}  // namespace worm_fast::cuda
