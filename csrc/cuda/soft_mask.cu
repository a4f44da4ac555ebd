// CUDA kernels of worm_fast::soft_mask_distance and its backward (WORM-gradient's mask
// distance; formulas in worm_fast/backends/reference.py). Each thread takes elements of
// one tensor in a grid-stride loop and reads each element's bit of every window row from
// the packed bytes (neighbouring threads share a byte, so the reads coalesce); the window
// is never unpacked. The forward writes one partial sum per block, which the caller adds
// with at::sum (a fixed order: no float atomics, the result does not vary by run). The
// thresholds, temperatures and the gradient's scale are device arrays read by the
// kernels, so nothing synchronizes with the host.

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "worm_fast/cuda_kernels.h"

namespace worm_fast::cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// v's soft mask s = sigmoid((|v| - t) / tau) and how many of the rows keep it.
template <typename opmath_t>
struct SoftMask {
  opmath_t s;
  opmath_t kept;
};

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ SoftMask<opmath_t> soft_mask(opmath_t v, const uint8_t* window,
                                                        int64_t row_stride, int64_t rows,
                                                        int64_t i, opmath_t threshold,
                                                        opmath_t temperature) {
  const opmath_t magnitude = v < opmath_t(0) ? -v : v;
  const opmath_t s = opmath_t(1) / (opmath_t(1) + exp_of((threshold - magnitude) / temperature));
  int kept = 0;
  const uint8_t* byte = window + (i >> 3);
  for (int64_t r = 0; r < rows; ++r, byte += row_stride) {
    kept += (*byte >> (i & 7)) & 1;
  }
  return {s, static_cast<opmath_t>(kept)};
}

template <typename opmath_t>
__device__ __forceinline__ opmath_t block_sum(opmath_t value) {
  __shared__ opmath_t warp_sums[kBlock / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kFullWarp, value, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlock / kWarp ? warp_sums[lane] : opmath_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(kFullWarp, value, offset);
    }
  }
  return value;  // the block's total, in thread 0
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kBlock)
    soft_mask_distance_kernel(const scalar_t* __restrict__ values, int64_t numel,
                              const uint8_t* __restrict__ window, int64_t row_stride,
                              int64_t rows, const opmath_t* __restrict__ threshold,
                              const opmath_t* __restrict__ temperature,
                              opmath_t* __restrict__ partial) {
  const opmath_t t = *threshold;
  const opmath_t tau = *temperature;
  const opmath_t l = static_cast<opmath_t>(rows);
  opmath_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const auto m = soft_mask<scalar_t, opmath_t>(static_cast<opmath_t>(values[i]), window,
                                                 row_stride, rows, i, t, tau);
    sum += m.kept + m.s * (l - 2 * m.kept);  // kept rows give 1 - s, the others s
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = sum;
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kBlock)
    soft_mask_distance_backward_kernel(const scalar_t* __restrict__ values, int64_t numel,
                                       const uint8_t* __restrict__ window, int64_t row_stride,
                                       int64_t rows, const opmath_t* __restrict__ threshold,
                                       const opmath_t* __restrict__ temperature,
                                       const opmath_t* __restrict__ scale,
                                       scalar_t* __restrict__ grad) {
  const opmath_t t = *threshold;
  const opmath_t tau = *temperature;
  const opmath_t factor = *scale;
  const opmath_t l = static_cast<opmath_t>(rows);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const auto v = static_cast<opmath_t>(values[i]);
    const auto m = soft_mask<scalar_t, opmath_t>(v, window, row_stride, rows, i, t, tau);
    const opmath_t sign = v > opmath_t(0) ? opmath_t(1) : (v < opmath_t(0) ? opmath_t(-1) : 0);
    grad[i] = static_cast<scalar_t>(factor * sign *
                                    (m.s * (opmath_t(1) - m.s) / tau * (l - 2 * m.kept)));
  }
}

template <typename scalar_t, typename opmath_t>
void launch_typed(const SoftMaskArgs& a, void* partial, const void* scale, void* grad,
                  cudaStream_t stream) {
  const auto* values = static_cast<const scalar_t*>(a.values);
  const auto* threshold = static_cast<const opmath_t*>(a.threshold) + a.index;
  const auto* temperature = static_cast<const opmath_t*>(a.temperature) + a.index;
  const int64_t blocks = soft_mask_distance_blocks(a.numel);
  if (partial != nullptr) {
    soft_mask_distance_kernel<scalar_t, opmath_t><<<blocks, kBlock, 0, stream>>>(
        values, a.numel, a.window, a.row_stride, a.rows, threshold, temperature,
        static_cast<opmath_t*>(partial));
  } else {
    soft_mask_distance_backward_kernel<scalar_t, opmath_t><<<blocks, kBlock, 0, stream>>>(
        values, a.numel, a.window, a.row_stride, a.rows, threshold, temperature,
        static_cast<const opmath_t*>(scale), static_cast<scalar_t*>(grad));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch(ScalarKind kind, const SoftMaskArgs& a, void* partial, const void* scale,
            void* grad, cudaStream_t stream) {
  if (a.numel == 0) {
    return;
  }
  switch (kind) {
    case ScalarKind::Float:
      return launch_typed<float, float>(a, partial, scale, grad, stream);
    case ScalarKind::Double:
      return launch_typed<double, double>(a, partial, scale, grad, stream);
    case ScalarKind::Half:
      return launch_typed<c10::Half, float>(a, partial, scale, grad, stream);
    case ScalarKind::BFloat16:
      return launch_typed<c10::BFloat16, float>(a, partial, scale, grad, stream);
  }
}

}  // namespace

int64_t soft_mask_distance_blocks(int64_t numel) {
  // Enough blocks to fill the GPU on the largest attention matrices, few enough that the
  // partial sums stay small; the grid-stride loop covers the rest.
  constexpr int64_t kMaxBlocks = 1024;
  return std::max<int64_t>(1, std::min<int64_t>((numel + kBlock - 1) / kBlock, kMaxBlocks));
}

void launch_soft_mask_distance(ScalarKind kind, const SoftMaskArgs& args, void* partial,
                               cudaStream_t stream) {
  launch(kind, args, partial, nullptr, nullptr, stream);
}

void launch_soft_mask_distance_backward(ScalarKind kind, const SoftMaskArgs& args,
                                        const void* scale, void* grad, cudaStream_t stream) {
  launch(kind, args, nullptr, scale, grad, stream);
}

}  // namespace worm_fast::cuda
