// STREAM-style memory-bandwidth kernels: the roofline the optimizer kernels are measured
// against. Benchmark-only; compiled at bench time by benchmarks/roofline.py and called
// through ctypes (plain C entry points, no torch headers, so it compiles in a second).
//
// Each thread works on one fixed, contiguous, cache-line-aligned slice of every array, in
// init and in the kernels alike, so the pages a thread streams are the ones it touched
// first (they live on its NUMA node).
//
// copy and triad write to a third array and store non-temporally: a normal store first
// reads the line it overwrites (write-allocate), a hidden read per written element that
// would understate what the memory system can move. update reads three arrays and writes
// two of them back in place, the traffic of an SGD step with momentum (3 reads, 2 writes,
// no write-allocate); on machines whose read bandwidth is far below their write
// bandwidth, that mix moves more bytes per second than a triad's 2 reads and 1 write.
// dot only reads (two arrays): the roofline of read-only kernels such as mask distances.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kLineFloats = 64 / sizeof(float);

// This thread's slice [begin, end) of n floats, boundaries on cache lines.
void thread_slice(int64_t n, int64_t& begin, int64_t& end) {
  const int64_t lines = (n + kLineFloats - 1) / kLineFloats;
  const int64_t per = (lines + omp_get_num_threads() - 1) / omp_get_num_threads();
  begin = std::min(n, omp_get_thread_num() * per * kLineFloats);
  end = std::min(n, begin + per * kLineFloats);
}

// dst = a + scalar * b (kTriad) or dst = a, over [begin, end).
template <bool kTriad>
void stream_slice(float* dst, const float* a, const float* b, float scalar, int64_t begin,
                  int64_t end) {
  int64_t i = begin;
#if defined(__AVX512F__)
  if (reinterpret_cast<uintptr_t>(dst + begin) % 64 == 0) {
    const __m512 s = _mm512_set1_ps(scalar);
    for (; i + 16 <= end; i += 16) {
      __m512 v = _mm512_loadu_ps(a + i);
      if constexpr (kTriad) v = _mm512_fmadd_ps(s, _mm512_loadu_ps(b + i), v);
      _mm512_stream_ps(dst + i, v);
    }
  }
#elif defined(__AVX__)
  if (reinterpret_cast<uintptr_t>(dst + begin) % 32 == 0) {
    const __m256 s = _mm256_set1_ps(scalar);
    for (; i + 8 <= end; i += 8) {
      __m256 v = _mm256_loadu_ps(a + i);
      if constexpr (kTriad) v = _mm256_add_ps(v, _mm256_mul_ps(s, _mm256_loadu_ps(b + i)));
      _mm256_stream_ps(dst + i, v);
    }
  }
#endif
  for (; i < end; ++i) dst[i] = kTriad ? a[i] + scalar * b[i] : a[i];
}

// b = scalar * b + c, then a = a + scalar * b, over [begin, end): plain stores, as the
// lines were just read (vectorized by the compiler).
void update_slice(float* __restrict a, float* __restrict b, const float* __restrict c,
                  float scalar, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    b[i] = scalar * b[i] + c[i];
    a[i] += scalar * b[i];
  }
}

// The sum of a[i] * b[i] over [begin, end) (vectorized by the compiler).
double dot_slice(const float* __restrict a, const float* __restrict b, int64_t begin,
                 int64_t end) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) sum += a[i] * b[i];
  return sum;
}

// Runs body(begin, end) on `threads` OpenMP threads, each on its own slice.
template <typename Body>
void parallel_slices(int64_t n, int threads, Body body) {
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    thread_slice(n, begin, end);
    body(begin, end);
  }
  _mm_sfence();  // non-temporal stores are weakly ordered
}

}  // namespace

extern "C" {

// First touch: every thread writes its own slice of each array.
void stream_init(float* a, float* b, float* c, int64_t n, int threads) {
  parallel_slices(n, threads, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) a[i] = 1.0f, b[i] = 2.0f, c[i] = 0.0f;
  });
}

void stream_copy(float* dst, const float* src, int64_t n, int threads) {
  parallel_slices(n, threads, [=](int64_t begin, int64_t end) {
    stream_slice<false>(dst, src, nullptr, 0.0f, begin, end);
  });
}

void stream_triad(float* dst, const float* a, const float* b, float scalar, int64_t n,
                  int threads) {
  parallel_slices(n, threads, [=](int64_t begin, int64_t end) {
    stream_slice<true>(dst, a, b, scalar, begin, end);
  });
}

void stream_update(float* a, float* b, const float* c, float scalar, int64_t n, int threads) {
  parallel_slices(n, threads, [=](int64_t begin, int64_t end) {
    update_slice(a, b, c, scalar, begin, end);
  });
}

// Returns the sum so that the reads cannot be optimized away.
double stream_dot(const float* a, const float* b, int64_t n, int threads) {
  double total = 0.0;
  parallel_slices(n, threads, [&](int64_t begin, int64_t end) {
    const double part = dot_slice(a, b, begin, end);
#pragma omp atomic
    total += part;
  });
  return total;
}

}  // extern "C"
