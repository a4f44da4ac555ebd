// CUDA kernels of worm_fast::pack_mask, unpack_mask, hamming_window (the packed layout of
// DESIGN §3.1) and magnitude_histogram (the counts that select the threshold). None
// synchronizes with the host: a device threshold or window start is read by the kernel,
// and counts and distances are reduced into device int64 tensors.

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "worm_fast/cuda_kernels.h"

namespace worm_fast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// Enough blocks for the work, at most `blocks_per_sm` per multiprocessor of the current
// device; grid-stride loops cover the rest.
int64_t grid_size(int64_t work_items, int64_t per_block, int64_t blocks_per_sm) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (work_items + per_block - 1) / per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{sms} * blocks_per_sm));
}

// ---------------------------------------------------------------------------------
// pack_mask: one warp per 64-bit word. Lane l looks at elements 64 w + l and
// 64 w + 32 + l (coalesced), and two ballots give the word's low and high halves.

constexpr int kPackBlock = 256;

template <typename T>
__device__ __forceinline__ T absval(T x) {
  return x < T(0) ? -x : x;  // NaN stays NaN, and NaN > threshold is false
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kPackBlock)
    pack_mask_kernel(const scalar_t* __restrict__ values, int64_t numel,
                     const opmath_t* threshold_ptr, opmath_t threshold_host,
                     uint64_t* __restrict__ out, int64_t words) {
  const opmath_t threshold = threshold_ptr != nullptr ? *threshold_ptr : threshold_host;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t w = warp; w < words; w += warps) {  // uniform across the warp
    const int64_t lo_i = w * 64 + lane;
    const int64_t hi_i = lo_i + kWarp;
    const bool lo_kept = lo_i < numel && absval(static_cast<opmath_t>(values[lo_i])) > threshold;
    const bool hi_kept = hi_i < numel && absval(static_cast<opmath_t>(values[hi_i])) > threshold;
    const unsigned lo = __ballot_sync(kFullWarp, lo_kept);
    const unsigned hi = __ballot_sync(kFullWarp, hi_kept);
    if (lane == 0) {
      out[w] = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
    }
  }
}

template <typename scalar_t, typename opmath_t>
void launch_pack_typed(const void* values, int64_t numel, const void* threshold_device,
                       double threshold_host, uint64_t* out, int64_t words,
                       cudaStream_t stream) {
  const int64_t blocks = grid_size(words, kPackBlock / kWarp, 16);
  pack_mask_kernel<scalar_t, opmath_t><<<blocks, kPackBlock, 0, stream>>>(
      static_cast<const scalar_t*>(values), numel, static_cast<const opmath_t*>(threshold_device),
      static_cast<opmath_t>(threshold_host), out, words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------
// unpack_mask: one thread per element.

constexpr int kUnpackBlock = 256;

__global__ void __launch_bounds__(kUnpackBlock)
    unpack_mask_kernel(const uint8_t* __restrict__ packed, bool* __restrict__ out,
                       int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    out[i] = (packed[i >> 3] >> (i & 7)) & 1;
  }
}

// ---------------------------------------------------------------------------------
// hamming_window: blockIdx.y is the window row. Each thread popcounts the xor of 64-bit
// words (of bytes when the rows are not 8-byte aligned), the block reduces with warp
// shuffles, and one atomicAdd per block adds into the row's int64 total.

constexpr int kHammingBlock = 256;

__device__ __forceinline__ long long warp_sum(long long value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(kFullWarp, value, offset);
  }
  return value;
}

__device__ __forceinline__ long long block_sum(long long value) {
  __shared__ long long warp_sums[kHammingBlock / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  value = warp_sum(value);
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / kWarp) ? warp_sums[lane] : 0;
    value = warp_sum(value);
  }
  return value;  // the block's total, in thread 0
}

__global__ void __launch_bounds__(kHammingBlock)
    hamming_window_kernel(const uint8_t* __restrict__ current,
                          const uint8_t* __restrict__ window, int64_t nbytes, bool words,
                          unsigned long long* __restrict__ out) {
  const uint8_t* row = window + static_cast<int64_t>(blockIdx.y) * nbytes;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  long long count = 0;
  int64_t tail = 0;  // the first byte not covered by whole words
  if (words) {
    const auto* c64 = reinterpret_cast<const unsigned long long*>(current);
    const auto* r64 = reinterpret_cast<const unsigned long long*>(row);
    const int64_t nwords = nbytes / 8;
    for (int64_t w = first; w < nwords; w += stride) {
      count += __popcll(c64[w] ^ r64[w]);
    }
    tail = nwords * 8;
  }
  for (int64_t i = tail + first; i < nbytes; i += stride) {
    count += __popc(static_cast<unsigned>(current[i] ^ row[i]));
  }
  count = block_sum(count);
  if (threadIdx.x == 0 && count != 0) {
    atomicAdd(out + blockIdx.y, static_cast<unsigned long long>(count));
  }
}

// ---------------------------------------------------------------------------------
// magnitude_histogram: each thread classifies the keys of the elements it strides over
// (the sampled blocks of 64 only); a window of at most 2^12 digits is counted in shared
// memory first (one atomic per digit and block in global memory), a wider one (few keys
// in it: the narrowing passes) with one global atomic per key. Keys below the window
// and NaNs are reduced per block. S is the storage integer, K the key type.

constexpr int kHistogramBlock = kHammingBlock;  // block_sum's size
constexpr int kSharedHistogramBits = 12;

template <typename S, typename K, bool kShared>
__global__ void __launch_bounds__(kHistogramBlock)
    magnitude_histogram_kernel(const S* __restrict__ values, int64_t numel,
                               const int64_t* __restrict__ lo_ptr, int shift, int window,
                               int64_t stride, K abs_mask, K inf,
                               unsigned long long* __restrict__ counts, int digits) {
  extern __shared__ unsigned int shared_counts[];  // `digits` of them when kShared
  if (kShared) {
    for (int d = threadIdx.x; d < digits; d += blockDim.x) {
      shared_counts[d] = 0;
    }
    __syncthreads();
  }
  const K lo = static_cast<K>(*lo_ptr);
  // Sampled element slots: 64 per counted block.
  const int64_t slots = ((numel + 63) / 64 + stride - 1) / stride * 64;
  long long below = 0;
  long long nans = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < slots;
       j += step) {
    const int64_t i = j / 64 * stride * 64 + j % 64;
    if (i >= numel) {
      continue;
    }
    const K key = static_cast<K>(values[i]) & abs_mask;
    if (key > inf) {
      ++nans;
    } else if (key < lo) {
      ++below;
    } else if (((key - lo) >> window) == 0) {
      const auto digit = static_cast<int>((key - lo) >> shift);
      if (kShared) {
        atomicAdd(shared_counts + digit, 1u);
      } else {
        atomicAdd(counts + digit, 1ull);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int d = threadIdx.x; d < digits; d += blockDim.x) {
      if (shared_counts[d] != 0) {
        atomicAdd(counts + d, static_cast<unsigned long long>(shared_counts[d]));
      }
    }
  }
  below = block_sum(below);
  __syncthreads();  // block_sum's shared partial sums are reused
  nans = block_sum(nans);
  if (threadIdx.x == 0) {
    atomicAdd(counts + digits, static_cast<unsigned long long>(below));
    atomicAdd(counts + digits + 1, static_cast<unsigned long long>(nans));
  }
}

template <typename S, typename K>
void launch_histogram_typed(const void* values, int64_t numel, const int64_t* lo, int shift,
                            int bits, int64_t stride, K abs_mask, K inf, int64_t* counts,
                            cudaStream_t stream) {
  const int64_t slots = ((numel + 63) / 64 + stride - 1) / stride * 64;
  const int64_t blocks = grid_size(slots, kHistogramBlock, 8);
  const int digits = 1 << bits;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "int64 counts");
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  const auto* v = static_cast<const S*>(values);
  if (bits <= kSharedHistogramBits) {
    magnitude_histogram_kernel<S, K, true>
        <<<blocks, kHistogramBlock, digits * sizeof(unsigned int), stream>>>(
            v, numel, lo, shift, shift + bits, stride, abs_mask, inf, out, digits);
  } else {
    magnitude_histogram_kernel<S, K, false><<<blocks, kHistogramBlock, 0, stream>>>(
        v, numel, lo, shift, shift + bits, stride, abs_mask, inf, out, digits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_pack_mask(ScalarKind kind, const void* values, int64_t numel,
                      const void* threshold_device, double threshold_host, uint64_t* out,
                      int64_t words, cudaStream_t stream) {
  if (words == 0) {
    return;
  }
  switch (kind) {
    case ScalarKind::Float:
      return launch_pack_typed<float, float>(values, numel, threshold_device, threshold_host,
                                             out, words, stream);
    case ScalarKind::Double:
      return launch_pack_typed<double, double>(values, numel, threshold_device,
                                               threshold_host, out, words, stream);
    case ScalarKind::Half:
      return launch_pack_typed<c10::Half, float>(values, numel, threshold_device,
                                                 threshold_host, out, words, stream);
    case ScalarKind::BFloat16:
      return launch_pack_typed<c10::BFloat16, float>(values, numel, threshold_device,
                                                     threshold_host, out, words, stream);
  }
}

void launch_unpack_mask(const uint8_t* packed, bool* out, int64_t numel, cudaStream_t stream) {
  if (numel == 0) {
    return;
  }
  const int64_t blocks = grid_size(numel, kUnpackBlock, 32);
  unpack_mask_kernel<<<blocks, kUnpackBlock, 0, stream>>>(packed, out, numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_hamming_window(const uint8_t* current, const uint8_t* window, int64_t rows,
                           int64_t nbytes, int64_t* out, cudaStream_t stream) {
  if (rows == 0 || nbytes == 0) {
    return;
  }
  TORCH_CHECK(rows <= 65535, "worm_fast.hamming_window: at most 65535 window rows, got ", rows);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; };
  const bool words = nbytes % 8 == 0 && aligned(current) && aligned(window);
  const int64_t items = words ? nbytes / 8 : nbytes;
  const int64_t blocks_x = grid_size(items, kHammingBlock, std::max<int64_t>(1, 8 / rows));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "int64 totals");
  hamming_window_kernel<<<grid, kHammingBlock, 0, stream>>>(
      current, window, nbytes, words, reinterpret_cast<unsigned long long*>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The sign masks and inf keys of worm_fast/_ops.py's MAGNITUDE_KEYS.
void launch_magnitude_histogram(ScalarKind kind, const void* values, int64_t numel,
                                const int64_t* lo, int shift, int bits, int64_t stride,
                                int64_t* counts, cudaStream_t stream) {
  if (numel == 0) {
    return;
  }
  switch (kind) {
    case ScalarKind::Float:
      return launch_histogram_typed<uint32_t, uint32_t>(values, numel, lo, shift, bits, stride,
                                                        0x7FFFFFFFu, 0x7F800000u, counts,
                                                        stream);
    case ScalarKind::Double:
      return launch_histogram_typed<uint64_t, uint64_t>(
          values, numel, lo, shift, bits, stride, 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ull,
          counts, stream);
    case ScalarKind::Half:
      return launch_histogram_typed<uint16_t, uint32_t>(values, numel, lo, shift, bits, stride,
                                                        0x7FFFu, 0x7C00u, counts, stream);
    case ScalarKind::BFloat16:
      return launch_histogram_typed<uint16_t, uint32_t>(values, numel, lo, shift, bits, stride,
                                                        0x7FFFu, 0x7F80u, counts, stream);
  }
}

}  // namespace worm_fast::cuda
