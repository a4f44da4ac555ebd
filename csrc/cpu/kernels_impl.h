// The CPU inner loops, written once and compiled per instruction set by
// kernels_{default,avx2,avx512}.cpp. Before including this file a translation unit
// defines WF_ISA (a namespace name), WF_ISA_NAME (a string), WF_HAVE_FMA, WF_HAVE_F16C,
// WF_HAVE_SSE2, WF_HAVE_AVX2 and WF_HAVE_AVX512 (0 or 1), and has already included
// <cstdint>, worm_fast/cpu_kernels.h (and <immintrin.h> when WF_HAVE_F16C or
// WF_HAVE_AVX2, <emmintrin.h> when WF_HAVE_SSE2); it gets
// `worm_fast::cpu::WF_ISA::kTable` and defines its accessor after the pragma region.
// This file includes nothing itself, so that the `#pragma GCC target` around it applies
// to these loops and to nothing from the standard library or torch.
//
// Most loops are plain C++ that GCC and Clang vectorize at -O3: every loop over the
// elements of a 64-bit mask word has a fixed trip count of 64, the truncation factor is
// a branchless select `kept ? 1 : r` written into a small array first, and the SGD
// variant (mask, weight decay, momentum mode, nesterov; for AdamW truncation site,
// weight decay, amsgrad) is a template parameter, so the element loop holds no branch. Two hot paths
// are intrinsics where the compiler falls short: the fp32 SGD block (AVX2 / AVX-512,
// mask bits as lane masks, prefetched streams) and the Hamming popcount.

#if !defined(WF_ISA) || !defined(WF_ISA_NAME)
#error "define WF_ISA and WF_ISA_NAME before including kernels_impl.h"
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "worm_fast's packed masks are read as little-endian 64-bit words"
#endif

namespace worm_fast::cpu {
namespace WF_ISA {
namespace {

#define WF_INLINE inline __attribute__((always_inline))

constexpr int64_t kWordBits = 64;

WF_INLINE float f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

WF_INLINE uint32_t bits_from_f32(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

WF_INLINE uint64_t load_u64(const uint8_t* p) {
  uint64_t w;
  __builtin_memcpy(&w, p, sizeof(w));
  return w;
}

// ---------------------------------------------------------------------------------
// Storage <-> compute conversions. S is the stored type, T the arithmetic type.

// Io types convert element by element inside the update loop; a "staged" one instead
// converts whole 64-element blocks to and from T arrays (hardware conversions), and the
// update runs on those arrays.
struct FloatIo {
  using S = float;
  using T = float;
  static constexpr bool kStaged = false;
  static WF_INLINE T load(S x) { return x; }
  static WF_INLINE S store(T x) { return x; }
};

struct DoubleIo {
  using S = double;
  using T = double;
  static constexpr bool kStaged = false;
  static WF_INLINE T load(S x) { return x; }
  static WF_INLINE S store(T x) { return x; }
};

// bfloat16: the high half of a float; stores round to nearest even, NaN stays a quiet
// NaN (the rounding of c10::BFloat16).
struct BFloat16Io {
  using S = uint16_t;
  using T = float;
  static constexpr bool kStaged = false;
  static WF_INLINE T load(S x) { return f32_from_bits(static_cast<uint32_t>(x) << 16); }
  static WF_INLINE S store(T x) {
    const uint32_t u = bits_from_f32(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<S>(x != x ? 0x7FC0u : rounded);
  }
};

// IEEE binary16 with integer and float operations only (the branch-free conversions of
// the FP16 library, which c10::Half also uses), exact in both directions, and
// vectorizable on any ISA (unlike _Float16, which GCC < 13 does not vectorize).
struct SoftHalfIo {
  using S = uint16_t;
  using T = float;
  static constexpr bool kStaged = false;
  static WF_INLINE T load(S h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude =
        two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized);
    return f32_from_bits(sign | magnitude);
  }
  static WF_INLINE S store(T f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_from_f32(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_from_f32(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<S>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

#if WF_HAVE_F16C
// IEEE binary16 through F16C (vcvtph2ps / vcvtps2ph, round to nearest even), 16 or 8
// values per instruction; the translation unit includes <immintrin.h> before its pragma
// (WF_HAVE_AVX512: the 16-wide forms).
struct HalfIo {
  using S = uint16_t;
  using T = float;
  static constexpr bool kStaged = true;
  static WF_INLINE void load_block(const S* __restrict src, T* __restrict dst, int64_t n) {
    int64_t i = 0;
#if WF_HAVE_AVX512
    for (; n - i >= 16; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
#endif
    for (; n - i >= 8; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) {
      dst[i] = _cvtsh_ss(src[i]);
    }
  }
  static WF_INLINE void store_block(const T* __restrict src, S* __restrict dst, int64_t n) {
    int64_t i = 0;
#if WF_HAVE_AVX512
    for (; n - i >= 16; i += 16) {
      const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
    }
#endif
    for (; n - i >= 8; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
    for (; i < n; ++i) {
      dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    }
  }
};
#else
using HalfIo = SoftHalfIo;
#endif

// a * b + c, fused where the ISA has FMA (as torch's vectorized add(alpha=) is).
WF_INLINE float fmadd(float a, float b, float c) {
#if WF_HAVE_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

WF_INLINE double fmadd(double a, double b, double c) {
#if WF_HAVE_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

WF_INLINE float absval(float x) { return __builtin_fabsf(x); }
WF_INLINE double absval(double x) { return __builtin_fabs(x); }

template <bool B>
struct Bool {
  static constexpr bool value = B;
};

template <int I>
struct Int {
  static constexpr int value = I;
};

template <class F>
WF_INLINE void with_bool(bool b, F&& f) {
  if (b) {
    f(Bool<true>{});
  } else {
    f(Bool<false>{});
  }
}

// ---------------------------------------------------------------------------------
// Masked SGD.

enum Momentum : int { kNoMomentum = 0, kFirstStep = 1, kRunning = 2 };

template <class T>
struct SgdConsts {
  T neg_lr, weight_decay, momentum, one_minus_dampening, truncation, grad_scale, sign;
};

// out[k] = bit k of `word` ? kept : pruned, in 32-bit lanes so the select vectorizes
// for float.
template <class T>
WF_INLINE void select_word(uint64_t word, T kept, T pruned, T* __restrict out) {
  const uint32_t lo = static_cast<uint32_t>(word);
  const uint32_t hi = static_cast<uint32_t>(word >> 32);
  for (int k = 0; k < 32; ++k) {
    out[k] = ((lo >> k) & 1u) ? kept : pruned;
  }
  for (int k = 0; k < 32; ++k) {
    out[32 + k] = ((hi >> k) & 1u) ? kept : pruned;
  }
}

// fac[k] = bit k of `word` ? 1 : r.
template <class T>
WF_INLINE void expand_word(uint64_t word, T r, T* __restrict fac) {
  select_word(word, T(1), r, fac);
}

// The update of n (= 64 when kFull) consecutive elements; the formula of
// reference.masked_sgd_step_, with torch.optim.SGD's rounding (add(alpha=) as FMA).
// fac[k] is the truncation factor of element k (when kMask).
template <class Io, bool kFull, bool kScaled, bool kMask, bool kWd, int kMom, bool kNesterov>
WF_INLINE void sgd_elements(typename Io::S* __restrict p, const typename Io::S* __restrict g,
                            typename Io::S* __restrict b, const typename Io::T* __restrict fac,
                            const SgdConsts<typename Io::T>& c, int64_t n) {
  using T = typename Io::T;
  const int64_t m = kFull ? kWordBits : n;
  for (int64_t k = 0; k < m; ++k) {
    T grad = Io::load(g[k]);
    if constexpr (kScaled) {
      grad = grad / c.grad_scale;
    }
    if constexpr (kMask) {
      grad = grad * fac[k];
    }
    grad = grad * c.sign;
    T param = Io::load(p[k]);
    if constexpr (kWd) {
      grad = fmadd(param, c.weight_decay, grad);
    }
    if constexpr (kMom != kNoMomentum) {
      T buf;
      if constexpr (kMom == kFirstStep) {
        buf = grad;
      } else {
        buf = fmadd(grad, c.one_minus_dampening, Io::load(b[k]) * c.momentum);
      }
      b[k] = Io::store(buf);
      grad = kNesterov ? fmadd(buf, c.momentum, grad) : buf;
    }
    p[k] = Io::store(fmadd(grad, c.neg_lr, param));
  }
}

#if WF_HAVE_AVX2
// fp32 vectors of the explicit SGD loop below. `truncate` multiplies the lanes whose mask
// bit (bits 0..kLanes-1 of `bits`) is clear by r.
#if WF_HAVE_AVX512
struct F32x {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static WF_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static WF_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static WF_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static WF_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static WF_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  static WF_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // One merge-masked multiply: the mask bits are the lane mask.
  static WF_INLINE V truncate(V g, uint64_t bits, V r) {
    return _mm512_mask_mul_ps(g, static_cast<__mmask16>(~bits), g, r);
  }
};
#else
struct F32x {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static WF_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static WF_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static WF_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static WF_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static WF_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static WF_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // Lane k is kept when bit k is set: shifted to the sign bit of lane k, where blendv
  // looks.
  static WF_INLINE V truncate(V g, uint64_t bits, V r) {
    const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i kept =
        _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(bits & 0xFF)), to_sign);
    return _mm256_blendv_ps(_mm256_mul_ps(g, r), g, _mm256_castsi256_ps(kept));
  }
};
#endif

// Elements ahead of the loads that sgd_block_simd prefetches on each stream: with the
// hardware prefetcher alone a core keeps too few misses in flight (2-5 % faster here).
constexpr int64_t kStreamPrefetch = 512;

// sgd_elements for 64 fp32 elements in explicit vectors: the mask word's bits select the
// truncated lanes directly (F32x::truncate) instead of a factor array written and read
// back, which GCC's vectorized select needs. Same operations in the same order, so the
// same results.
template <bool kScaled, bool kMask, bool kWd, int kMom, bool kNesterov>
WF_INLINE void sgd_block_simd(float* __restrict p, const float* __restrict g,
                              float* __restrict b, uint64_t word, const SgdConsts<float>& c) {
  using V = F32x::V;
  for (int64_t e = 0; e < kWordBits; e += F32x::kLanes) {
    __builtin_prefetch(g + e + kStreamPrefetch);
    __builtin_prefetch(p + e + kStreamPrefetch, 1);
    if constexpr (kMom == kRunning) {
      __builtin_prefetch(b + e + kStreamPrefetch, 1);
    }
    V grad = F32x::load(g + e);
    if constexpr (kScaled) {
      grad = F32x::div(grad, F32x::set1(c.grad_scale));
    }
    if constexpr (kMask) {
      grad = F32x::truncate(grad, word >> e, F32x::set1(c.truncation));
    }
    grad = F32x::mul(grad, F32x::set1(c.sign));
    const V param = F32x::load(p + e);
    if constexpr (kWd) {
      grad = F32x::fmadd(param, F32x::set1(c.weight_decay), grad);
    }
    if constexpr (kMom != kNoMomentum) {
      const V momentum = F32x::set1(c.momentum);
      V buf = grad;
      if constexpr (kMom == kRunning) {
        buf = F32x::fmadd(grad, F32x::set1(c.one_minus_dampening),
                          F32x::mul(F32x::load(b + e), momentum));
      }
      F32x::store(b + e, buf);
      grad = kNesterov ? F32x::fmadd(buf, momentum, grad) : buf;
    }
    F32x::store(p + e, F32x::fmadd(grad, F32x::set1(c.neg_lr), param));
  }
}
#endif

template <class Io, bool kFull, bool kScaled, bool kMask, bool kWd, int kMom, bool kNesterov>
WF_INLINE void sgd_block(typename Io::S* __restrict p, const typename Io::S* __restrict g,
                         typename Io::S* __restrict b, uint64_t word,
                         const SgdConsts<typename Io::T>& c, int64_t n) {
  using T = typename Io::T;
  if constexpr (Io::kStaged) {
    static_assert(sizeof(T) == sizeof(float), "staged conversion computes in float");
    const int64_t m = kFull ? kWordBits : n;
    T ps[kWordBits], gs[kWordBits], bs[kWordBits];
    Io::load_block(p, ps, m);
    Io::load_block(g, gs, m);
    if constexpr (kMom == kRunning) {
      Io::load_block(b, bs, m);
    }
    sgd_block<FloatIo, kFull, kScaled, kMask, kWd, kMom, kNesterov>(ps, gs, bs, word, c, n);
    Io::store_block(ps, p, m);
    if constexpr (kMom != kNoMomentum) {
      Io::store_block(bs, b, m);
    }
  } else {
#if WF_HAVE_AVX2
    if constexpr (kFull && sizeof(typename Io::S) == 4) {  // fp32 storage: FloatIo
      sgd_block_simd<kScaled, kMask, kWd, kMom, kNesterov>(p, g, b, word, c);
    } else
#endif
    {
      T fac[kWordBits];
      if constexpr (kMask) {
        expand_word(word, c.truncation, fac);
      }
      sgd_elements<Io, kFull, kScaled, kMask, kWd, kMom, kNesterov>(p, g, b, fac, c, n);
    }
  }
}

// Bytes ahead that sgd_loop prefetches the mask: a slow stream (one cache line per 512
// elements) that the hardware prefetcher does not run ahead of.
constexpr int64_t kMaskHammingPrefetchBytes = 256;

template <class Io, bool kScaled, bool kMask, bool kWd, int kMom, bool kNesterov>
void sgd_loop(const SgdTensor& t, const SgdConsts<typename Io::T>& c, int64_t begin,
              int64_t end) {
  using S = typename Io::S;
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  S* b = kMom != kNoMomentum ? static_cast<S*>(t.buf) : nullptr;
  for (int64_t base = begin; base < end; base += kWordBits) {
    uint64_t word = 0;
    if constexpr (kMask) {
      word = load_u64(t.mask + base / 8);
      __builtin_prefetch(t.mask + base / 8 + kMaskHammingPrefetchBytes);
    }
    S* bb = kMom != kNoMomentum ? b + base : nullptr;
    if (end - base >= kWordBits) {
      sgd_block<Io, true, kScaled, kMask, kWd, kMom, kNesterov>(p + base, g + base, bb, word, c,
                                                                  0);
    } else {
      sgd_block<Io, false, kScaled, kMask, kWd, kMom, kNesterov>(p + base, g + base, bb, word,
                                                                 c, end - base);
    }
  }
}

template <class Io>
void sgd_typed(const SgdTensor& t, const SgdConfig& cfg, int64_t begin, int64_t end) {
  using T = typename Io::T;
  const SgdConsts<T> c{static_cast<T>(-cfg.lr),
                       static_cast<T>(cfg.weight_decay),
                       static_cast<T>(cfg.momentum),
                       static_cast<T>(1.0 - cfg.dampening),
                       static_cast<T>(cfg.truncation),
                       static_cast<T>(cfg.grad_scale),
                       cfg.maximize ? T(-1) : T(1)};
  const int mom = cfg.momentum == 0.0 ? kNoMomentum : (cfg.is_first_step ? kFirstStep : kRunning);
  const auto run = [&](auto scaled, auto mask, auto wd, auto nesterov, auto momentum) {
    sgd_loop<Io, decltype(scaled)::value, decltype(mask)::value, decltype(wd)::value,
             decltype(momentum)::value, decltype(nesterov)::value>(t, c, begin, end);
  };
  // Dividing by a grad_scale of 1 changes no value, so it is skipped: a division per
  // element costs more than the rest of the arithmetic.
  with_bool(cfg.grad_scale != 1.0, [&](auto scaled) {
    with_bool(t.mask != nullptr, [&](auto mask) {
      with_bool(cfg.weight_decay != 0.0, [&](auto wd) {
        if (mom == kNoMomentum) {
          run(scaled, mask, wd, Bool<false>{}, Int<kNoMomentum>{});
        } else {
          with_bool(cfg.nesterov, [&](auto nesterov) {
            if (mom == kFirstStep) {
              run(scaled, mask, wd, nesterov, Int<kFirstStep>{});
            } else {
              run(scaled, mask, wd, nesterov, Int<kRunning>{});
            }
          });
        }
      });
    });
  });
}

void sgd_range(const SgdTensor& t, const SgdConfig& c, int64_t begin, int64_t end) {
  switch (t.kind) {
    case ScalarKind::Float:
      return sgd_typed<FloatIo>(t, c, begin, end);
    case ScalarKind::Double:
      return sgd_typed<DoubleIo>(t, c, begin, end);
    case ScalarKind::Half:
      return sgd_typed<HalfIo>(t, c, begin, end);
    case ScalarKind::BFloat16:
      return sgd_typed<BFloat16Io>(t, c, begin, end);
  }
}

// ---------------------------------------------------------------------------------
// Masked AdamW.

// x[k] = sqrt(x[k]) for k < n, IEEE-exact like torch's vectorized sqrt. Spelled out in
// intrinsics because GCC keeps sqrtf scalar without -fno-math-errno (it calls sqrtf for
// negative inputs, to set errno). The AVX-512 forms are the zero-masked ones with every
// lane selected: the plain ones trip GCC 12's -Wmaybe-uninitialized (_mm512_undefined).
WF_INLINE void sqrt_block(float* __restrict x, int64_t n) {
  int64_t i = 0;
#if WF_HAVE_AVX512
  for (; n - i >= 16; i += 16) {
    _mm512_storeu_ps(x + i, _mm512_maskz_sqrt_ps(0xFFFF, _mm512_loadu_ps(x + i)));
  }
#endif
#if WF_HAVE_AVX2
  for (; n - i >= 8; i += 8) {
    _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
  }
#endif
#if WF_HAVE_SSE2
  for (; n - i >= 4; i += 4) {
    _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
  }
#endif
  for (; i < n; ++i) {
    x[i] = __builtin_sqrtf(x[i]);
  }
}

WF_INLINE void sqrt_block(double* __restrict x, int64_t n) {
  int64_t i = 0;
#if WF_HAVE_AVX512
  for (; n - i >= 8; i += 8) {
    _mm512_storeu_pd(x + i, _mm512_maskz_sqrt_pd(0xFF, _mm512_loadu_pd(x + i)));
  }
#endif
#if WF_HAVE_AVX2
  for (; n - i >= 4; i += 4) {
    _mm256_storeu_pd(x + i, _mm256_sqrt_pd(_mm256_loadu_pd(x + i)));
  }
#endif
#if WF_HAVE_SSE2
  for (; n - i >= 2; i += 2) {
    _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
  }
#endif
  for (; i < n; ++i) {
    x[i] = __builtin_sqrt(x[i]);
  }
}

// torch rounds p * (1 - lr wd) before adding the update, and so do these loops: GCC
// contracts a * b + c across statements by default (-ffp-contract=fast), so contraction
// is off for them; the fused multiply-adds torch has (lerp, addcmul) are explicit.
// (Clang contracts only within one expression by default.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// Where an AdamW step truncates: nowhere (no mask), the Adam update of pruned elements
// (WormAdamW's default), or their raw gradient before the moments (truncate="gradient").
enum AdamTruncation : int { kNoTruncation = 0, kTruncateUpdate = 1, kTruncateGradient = 2 };

template <class T>
struct AdamConsts {
  T neg_step_size;         // -lr / (1 - beta1^t): the factor of kept elements
  T neg_step_size_pruned;  // the same times truncation
  T truncation;            // r, the gradient factor of pruned elements (kTruncateGradient)
  T decay;                 // 1 - lr * weight_decay
  T lerp_weight;           // torch's lerp: m + w (g - m) for w < 0.5, g + (w - 1) (g - m) else
  bool lerp_from_grad;
  T beta2, one_minus_beta2, bias_correction2_sqrt, eps, grad_scale, sign;
};

// The update of n (= 64 when kFull) consecutive elements; the formula of
// reference.masked_adamw_step_ with torch.optim.AdamW's fp32 rounding on CPU (lerp and
// addcmul as FMAs, sqrt / bias_correction2_sqrt + eps, p + (-step_size * m) / denom).
// fac[k] is, for element k, the step factor (neg_step_size or neg_step_size_pruned)
// under kTruncateUpdate, the gradient factor (1 or r) under kTruncateGradient. Three
// passes over the block: moments, square roots, parameters.
template <class Io, bool kFull, int kTrunc, bool kWd, bool kAms>
WF_INLINE void adamw_elements(typename Io::S* __restrict p, const typename Io::S* __restrict g,
                              typename Io::S* __restrict m, typename Io::S* __restrict v,
                              typename Io::S* __restrict vmax,
                              const typename Io::T* __restrict fac,
                              const AdamConsts<typename Io::T>& c, int64_t n) {
  using T = typename Io::T;
  const int64_t len = kFull ? kWordBits : n;
  T avg[kWordBits];
  T root[kWordBits];
  const bool from_grad = c.lerp_from_grad;
  for (int64_t k = 0; k < len; ++k) {
    T grad = Io::load(g[k]) / c.grad_scale * c.sign;
    if constexpr (kTrunc == kTruncateGradient) {
      grad = grad * fac[k];
    }
    const T old = Io::load(m[k]);
    const T mk = fmadd(c.lerp_weight, grad - old, from_grad ? grad : old);
    const T vk = fmadd(c.one_minus_beta2 * grad, grad, Io::load(v[k]) * c.beta2);
    m[k] = Io::store(mk);
    v[k] = Io::store(vk);
    avg[k] = mk;
    if constexpr (kAms) {
      const T prev = Io::load(vmax[k]);
      const T vm = (prev != prev || prev > vk) ? prev : vk;  // torch.maximum: NaN wins
      vmax[k] = Io::store(vm);
      root[k] = vm;
    } else {
      root[k] = vk;
    }
  }
  sqrt_block(root, len);
  for (int64_t k = 0; k < len; ++k) {
    T param = Io::load(p[k]);
    if constexpr (kWd) {
      param = param * c.decay;
    }
    const T denom = root[k] / c.bias_correction2_sqrt + c.eps;
    const T scale = kTrunc == kTruncateUpdate ? fac[k] : c.neg_step_size;
    p[k] = Io::store(param + (scale * avg[k]) / denom);
  }
}

template <class Io, bool kFull, int kTrunc, bool kWd, bool kAms>
WF_INLINE void adamw_block(typename Io::S* __restrict p, const typename Io::S* __restrict g,
                           typename Io::S* __restrict m, typename Io::S* __restrict v,
                           typename Io::S* __restrict vmax, const typename Io::T* __restrict fac,
                           const AdamConsts<typename Io::T>& c, int64_t n) {
  using T = typename Io::T;
  if constexpr (Io::kStaged) {
    static_assert(sizeof(T) == sizeof(float), "staged conversion computes in float");
    const int64_t len = kFull ? kWordBits : n;
    T ps[kWordBits], gs[kWordBits], ms[kWordBits], vs[kWordBits], vms[kWordBits];
    Io::load_block(p, ps, len);
    Io::load_block(g, gs, len);
    Io::load_block(m, ms, len);
    Io::load_block(v, vs, len);
    if constexpr (kAms) {
      Io::load_block(vmax, vms, len);
    }
    adamw_elements<FloatIo, kFull, kTrunc, kWd, kAms>(ps, gs, ms, vs, vms, fac, c, n);
    Io::store_block(ps, p, len);
    Io::store_block(ms, m, len);
    Io::store_block(vs, v, len);
    if constexpr (kAms) {
      Io::store_block(vms, vmax, len);
    }
  } else {
    adamw_elements<Io, kFull, kTrunc, kWd, kAms>(p, g, m, v, vmax, fac, c, n);
  }
}

template <class Io, int kTrunc, bool kWd, bool kAms>
void adamw_loop(const AdamTensor& t, const AdamConsts<typename Io::T>& c, int64_t begin,
                int64_t end) {
  using S = typename Io::S;
  using T = typename Io::T;
  S* p = static_cast<S*>(t.param);
  const S* g = static_cast<const S*>(t.grad);
  S* m = static_cast<S*>(t.exp_avg);
  S* v = static_cast<S*>(t.exp_avg_sq);
  S* vmax = kAms ? static_cast<S*>(t.max_exp_avg_sq) : nullptr;
  for (int64_t base = begin; base < end; base += kWordBits) {
    T fac[kWordBits];
    if constexpr (kTrunc == kTruncateUpdate) {
      select_word(load_u64(t.mask + base / 8), c.neg_step_size, c.neg_step_size_pruned, fac);
    } else if constexpr (kTrunc == kTruncateGradient) {
      expand_word(load_u64(t.mask + base / 8), c.truncation, fac);
    }
    S* vm = kAms ? vmax + base : nullptr;
    if (end - base >= kWordBits) {
      adamw_block<Io, true, kTrunc, kWd, kAms>(p + base, g + base, m + base, v + base, vm,
                                               fac, c, 0);
    } else {
      adamw_block<Io, false, kTrunc, kWd, kAms>(p + base, g + base, m + base, v + base, vm,
                                                fac, c, end - base);
    }
  }
}

template <class Io>
void adamw_typed(const AdamTensor& t, const AdamConfig& cfg, int64_t begin, int64_t end) {
  using T = typename Io::T;
  const double w = 1.0 - cfg.beta1;
  const T lerp_weight = static_cast<T>(w);
  const bool from_grad = !(absval(lerp_weight) < T(0.5));
  const AdamConsts<T> c{static_cast<T>(-t.step_size),
                        static_cast<T>(-t.step_size * cfg.truncation),
                        static_cast<T>(cfg.truncation),
                        static_cast<T>(1.0 - cfg.lr * cfg.weight_decay),
                        from_grad ? static_cast<T>(lerp_weight - T(1)) : lerp_weight,
                        from_grad,
                        static_cast<T>(cfg.beta2),
                        static_cast<T>(1.0 - cfg.beta2),
                        static_cast<T>(t.bias_correction2_sqrt),
                        static_cast<T>(cfg.eps),
                        static_cast<T>(cfg.grad_scale),
                        cfg.maximize ? T(-1) : T(1)};
  const auto run = [&](auto trunc) {
    with_bool(cfg.weight_decay != 0.0, [&](auto wd) {
      with_bool(cfg.amsgrad, [&](auto ams) {
        adamw_loop<Io, decltype(trunc)::value, decltype(wd)::value, decltype(ams)::value>(
            t, c, begin, end);
      });
    });
  };
  if (t.mask == nullptr) {
    run(Int<kNoTruncation>{});
  } else if (cfg.truncate_gradient) {
    run(Int<kTruncateGradient>{});
  } else {
    run(Int<kTruncateUpdate>{});
  }
}

void adamw_range(const AdamTensor& t, const AdamConfig& c, int64_t begin, int64_t end) {
  switch (t.kind) {
    case ScalarKind::Float:
      return adamw_typed<FloatIo>(t, c, begin, end);
    case ScalarKind::Double:
      return adamw_typed<DoubleIo>(t, c, begin, end);
    case ScalarKind::Half:
      return adamw_typed<HalfIo>(t, c, begin, end);
    case ScalarKind::BFloat16:
      return adamw_typed<BFloat16Io>(t, c, begin, end);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------
// pack_mask: bit k of word w = |values[64 w + k]| > threshold.

template <class Io>
WF_INLINE uint64_t pack_full_word(const typename Io::S* __restrict v, typename Io::T thr) {
#if WF_HAVE_AVX512
  // fp32 storage (FloatIo): compares straight into lane masks, where the loops below
  // vectorize into per-lane shifts and an OR reduction, slower than a read of the values.
  if constexpr (sizeof(typename Io::S) == 4) {
    const __m512 threshold = _mm512_set1_ps(thr);
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512 magnitude = _mm512_abs_ps(_mm512_loadu_ps(v + 16 * q));
      // Ordered: NaN > thr is false, as in the loops below.
      word |= static_cast<uint64_t>(_mm512_cmp_ps_mask(magnitude, threshold, _CMP_GT_OQ))
              << (16 * q);
    }
    return word;
  }
#endif
  if constexpr (sizeof(typename Io::T) == 8) {
    uint64_t word = 0;
    for (int k = 0; k < 64; ++k) {
      word |= static_cast<uint64_t>(absval(Io::load(v[k])) > thr) << k;
    }
    return word;
  } else {
    uint32_t lo = 0;
    uint32_t hi = 0;
    for (int k = 0; k < 32; ++k) {
      lo |= static_cast<uint32_t>(absval(Io::load(v[k])) > thr) << k;
    }
    for (int k = 0; k < 32; ++k) {
      hi |= static_cast<uint32_t>(absval(Io::load(v[32 + k])) > thr) << k;
    }
    return static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
  }
}

template <class Io>
void pack_typed(const void* values, double threshold, int64_t numel, uint64_t* out,
                int64_t word_begin, int64_t word_end) {
  using S = typename Io::S;
  using T = typename Io::T;
  const S* v = static_cast<const S*>(values);
  const T thr = static_cast<T>(threshold);
  for (int64_t w = word_begin; w < word_end; ++w) {
    const int64_t base = w * kWordBits;
    if (numel - base >= kWordBits) {
      out[w] = pack_full_word<Io>(v + base, thr);
    } else {
      uint64_t word = 0;
      for (int64_t k = 0; k < numel - base; ++k) {
        word |= static_cast<uint64_t>(absval(Io::load(v[base + k])) > thr) << k;
      }
      out[w] = word;
    }
  }
}

void pack_range(const void* values, ScalarKind kind, double threshold, int64_t numel,
                uint64_t* out, int64_t word_begin, int64_t word_end) {
  switch (kind) {
    case ScalarKind::Float:
      return pack_typed<FloatIo>(values, threshold, numel, out, word_begin, word_end);
    case ScalarKind::Double:
      return pack_typed<DoubleIo>(values, threshold, numel, out, word_begin, word_end);
    case ScalarKind::Half:
      return pack_typed<SoftHalfIo>(values, threshold, numel, out, word_begin, word_end);
    case ScalarKind::BFloat16:
      return pack_typed<BFloat16Io>(values, threshold, numel, out, word_begin, word_end);
  }
}

// ---------------------------------------------------------------------------------
// unpack_mask: one 8-byte table entry per mask byte (byte k of entry b = bit k of b).

struct ByteTable {
  uint64_t entry[256];
};

constexpr ByteTable make_byte_table() {
  ByteTable t{};
  for (int b = 0; b < 256; ++b) {
    uint64_t e = 0;
    for (int k = 0; k < 8; ++k) {
      e |= static_cast<uint64_t>((b >> k) & 1) << (8 * k);
    }
    t.entry[b] = e;
  }
  return t;
}

constexpr ByteTable kByteTable = make_byte_table();

void unpack_range(const uint8_t* packed, bool* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; end - i >= 8; i += 8) {
    __builtin_memcpy(out + i, &kByteTable.entry[packed[i / 8]], 8);
  }
  for (; i < end; ++i) {
    out[i] = (packed[i / 8] >> (i % 8)) & 1;
  }
}

// ---------------------------------------------------------------------------------
// hamming_window: popcount(current ^ row). A PopVec holds bit counts per 64-bit lane:
// with AVX2 / AVX-512BW, 32 / 64 bytes at a time by nibble lookup (two vpshufb per
// vector, bytes summed per lane by vpsadbw), which keeps a core ahead of memory;
// otherwise one 64-bit word at a time.

#if WF_HAVE_AVX512
using PopVec = __m512i;
constexpr int64_t kPopBytes = 64;
WF_INLINE PopVec pop_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
WF_INLINE PopVec pop_zero() { return _mm512_setzero_si512(); }
WF_INLINE PopVec pop_add(PopVec a, PopVec b) { return _mm512_add_epi64(a, b); }
WF_INLINE PopVec pop_xor_count(PopVec a, PopVec b) {
  // Byte k of each 128-bit lane: popcount(k).
  const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i x = _mm512_xor_si512(a, b);
  const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(x, low));
  const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(x, 4), low));
  return _mm512_sad_epu8(_mm512_add_epi8(lo, hi), _mm512_setzero_si512());
}
WF_INLINE int64_t pop_sum(PopVec v) { return _mm512_reduce_add_epi64(v); }
#elif WF_HAVE_AVX2
using PopVec = __m256i;
constexpr int64_t kPopBytes = 32;
WF_INLINE PopVec pop_load(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
WF_INLINE PopVec pop_zero() { return _mm256_setzero_si256(); }
WF_INLINE PopVec pop_add(PopVec a, PopVec b) { return _mm256_add_epi64(a, b); }
WF_INLINE PopVec pop_xor_count(PopVec a, PopVec b) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i x = _mm256_xor_si256(a, b);
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}
WF_INLINE int64_t pop_sum(PopVec v) {
  return _mm256_extract_epi64(v, 0) + _mm256_extract_epi64(v, 1) + _mm256_extract_epi64(v, 2) +
         _mm256_extract_epi64(v, 3);
}
#else
using PopVec = uint64_t;
constexpr int64_t kPopBytes = 8;
WF_INLINE PopVec pop_load(const uint8_t* p) { return load_u64(p); }
WF_INLINE PopVec pop_zero() { return 0; }
WF_INLINE PopVec pop_add(PopVec a, PopVec b) { return a + b; }
WF_INLINE PopVec pop_xor_count(PopVec a, PopVec b) { return __builtin_popcountll(a ^ b); }
WF_INLINE int64_t pop_sum(PopVec v) { return static_cast<int64_t>(v); }
#endif

// How far ahead of the loads hamming_rows prefetches each stream: software prefetches
// keep more misses in flight than the hardware prefetcher does alone (about 10 % more
// read bandwidth on the machine this was tuned on; 512 to 2048 bytes do equally well).
constexpr int64_t kHammingPrefetchBytes = 1024;

// acc[r] += differing bits of current[0, n) and rows[r][0, n), for R rows in one pass:
// each vector of `current` is loaded once, and the R + 1 streams read side by side keep
// more cache misses in flight than one stream at a time would.
template <int R>
void hamming_rows(const uint8_t* current, const uint8_t* const* rows, int64_t n,
                  int64_t* acc) {
  PopVec sums[R];
  for (int r = 0; r < R; ++r) {
    sums[r] = pop_zero();
  }
  int64_t i = 0;
  for (; n - i >= kPopBytes; i += kPopBytes) {
    const PopVec c = pop_load(current + i);
    __builtin_prefetch(current + i + kHammingPrefetchBytes);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(rows[r] + i + kHammingPrefetchBytes);
      sums[r] = pop_add(sums[r], pop_xor_count(c, pop_load(rows[r] + i)));
    }
  }
  for (int r = 0; r < R; ++r) {
    int64_t bits = pop_sum(sums[r]);
    for (int64_t j = i; j < n; ++j) {
      bits += __builtin_popcount(static_cast<unsigned>(current[j] ^ rows[r][j]));
    }
    acc[r] += bits;
  }
}

constexpr int kHammingRowsPerPass = 8;
using HammingRows = void (*)(const uint8_t*, const uint8_t* const*, int64_t, int64_t*);
constexpr HammingRows kHammingRows[kHammingRowsPerPass] = {
    hamming_rows<1>, hamming_rows<2>, hamming_rows<3>, hamming_rows<4>,
    hamming_rows<5>, hamming_rows<6>, hamming_rows<7>, hamming_rows<8>};

void hamming_range(const uint8_t* current, const uint8_t* window, int64_t row_stride,
                   int64_t rows, int64_t byte_begin, int64_t byte_end, int64_t* acc) {
  for (int64_t first = 0; first < rows; first += kHammingRowsPerPass) {
    const int count = static_cast<int>(
        rows - first < kHammingRowsPerPass ? rows - first : kHammingRowsPerPass);
    const uint8_t* row_ptrs[kHammingRowsPerPass];
    for (int r = 0; r < count; ++r) {
      row_ptrs[r] = window + (first + r) * row_stride + byte_begin;
    }
    kHammingRows[count - 1](current + byte_begin, row_ptrs, byte_end - byte_begin, acc + first);
  }
}

// ---------------------------------------------------------------------------------
// soft_mask_distance: per 64-element block, how many of the window's rows keep each
// element (one mask word per row, its bits summed in 64 lanes), then the soft mask.

// e^x in fp32 from arithmetic and bit operations, which GCC vectorizes (libm's expf is
// not vectorized without -ffast-math): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite),
// e^r by the Cephes expf polynomial (about 1 ulp), 2^n through the exponent bits. x is
// clamped to [-87, 88], where 2^n stays a normal float; a NaN passes through.
WF_INLINE float exp_vectorizable(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // The low mantissa bits of `shifted` hold n: n + 127 is the exponent field of 2^n.
  const uint32_t exponent = bits_from_f32(shifted) - bits_from_f32(kRound) + 127u;
  return p * f32_from_bits(exponent << 23);
}

WF_INLINE double exp_vectorizable(double x) { return __builtin_exp(x); }

template <class T>
WF_INLINE T sigmoid(T z) {
  return T(1) / (T(1) + exp_vectorizable(-z));
}

// kept[b] = how many rows keep element b of the 64 at window byte `byte` (in 32-bit
// halves: variable 32-bit shifts vectorize on AVX2, 64-bit ones convert poorly).
WF_INLINE void kept_counts(const SoftMaskTensor& t, int64_t byte, int32_t* kept) {
  for (int b = 0; b < 64; ++b) {
    kept[b] = 0;
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    const uint64_t word = load_u64(t.window + r * t.row_stride + byte);
    const auto lo = static_cast<uint32_t>(word);
    const auto hi = static_cast<uint32_t>(word >> 32);
    for (int b = 0; b < 32; ++b) {
      kept[b] += static_cast<int32_t>((lo >> b) & 1u);
    }
    for (int b = 0; b < 32; ++b) {
      kept[32 + b] += static_cast<int32_t>((hi >> b) & 1u);
    }
  }
}

// The sum of 64 values, pairwise (vectorizes, unlike a running float sum).
template <class T>
WF_INLINE T sum64(T* x) {
  for (int width = 32; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) {
      x[k] += x[k + width];
    }
  }
  return x[0];
}

template <class Io>
double soft_mask_distance_typed(const SoftMaskTensor& t, int64_t begin, int64_t end) {
  using S = typename Io::S;
  using T = typename Io::T;
  const S* v = static_cast<const S*>(t.values);
  const T threshold = static_cast<T>(t.threshold);
  const T temperature = static_cast<T>(t.temperature);
  const T rows = static_cast<T>(t.rows);
  double total = 0.0;
  for (int64_t base = begin; base < end; base += kWordBits) {
    const int64_t n = end - base < kWordBits ? end - base : kWordBits;
    int32_t kept[kWordBits];
    kept_counts(t, base / 8, kept);
    // Of the rows' terms |s - bit|, `kept` are 1 - s and the others s.
    T terms[kWordBits];
    for (int64_t k = 0; k < n; ++k) {
      const T s = sigmoid((absval(Io::load(v[base + k])) - threshold) / temperature);
      const T c = static_cast<T>(kept[k]);
      terms[k] = c + s * (rows - 2 * c);
    }
    for (int64_t k = n; k < kWordBits; ++k) {
      terms[k] = T(0);
    }
    total += sum64(terms);
  }
  return total;
}

template <class Io>
void soft_mask_distance_grad_typed(const SoftMaskTensor& t, double scale, void* grad,
                                   int64_t begin, int64_t end) {
  using S = typename Io::S;
  using T = typename Io::T;
  const S* v = static_cast<const S*>(t.values);
  S* g = static_cast<S*>(grad);
  const T threshold = static_cast<T>(t.threshold);
  const T temperature = static_cast<T>(t.temperature);
  const T rows = static_cast<T>(t.rows);
  const T factor = static_cast<T>(scale / t.temperature);
  for (int64_t base = begin; base < end; base += kWordBits) {
    const int64_t n = end - base < kWordBits ? end - base : kWordBits;
    int32_t kept[kWordBits];
    kept_counts(t, base / 8, kept);
    for (int64_t k = 0; k < n; ++k) {
      const T x = Io::load(v[base + k]);
      const T s = sigmoid((absval(x) - threshold) / temperature);
      const T sign = x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
      const T slope = rows - 2 * static_cast<T>(kept[k]);
      g[base + k] = Io::store(factor * sign * s * (T(1) - s) * slope);
    }
  }
}

double soft_mask_distance_range(const SoftMaskTensor& t, int64_t begin, int64_t end) {
  switch (t.kind) {
    case ScalarKind::Float:
      return soft_mask_distance_typed<FloatIo>(t, begin, end);
    case ScalarKind::Double:
      return soft_mask_distance_typed<DoubleIo>(t, begin, end);
    case ScalarKind::Half:
      return soft_mask_distance_typed<SoftHalfIo>(t, begin, end);
    case ScalarKind::BFloat16:
      return soft_mask_distance_typed<BFloat16Io>(t, begin, end);
  }
  return 0.0;
}

void soft_mask_distance_grad_range(const SoftMaskTensor& t, double scale, void* grad,
                                   int64_t begin, int64_t end) {
  switch (t.kind) {
    case ScalarKind::Float:
      return soft_mask_distance_grad_typed<FloatIo>(t, scale, grad, begin, end);
    case ScalarKind::Double:
      return soft_mask_distance_grad_typed<DoubleIo>(t, scale, grad, begin, end);
    case ScalarKind::Half:
      return soft_mask_distance_grad_typed<SoftHalfIo>(t, scale, grad, begin, end);
    case ScalarKind::BFloat16:
      return soft_mask_distance_grad_typed<BFloat16Io>(t, scale, grad, begin, end);
  }
}

// ---------------------------------------------------------------------------------
// magnitude_histogram: the key of a value is its bits with the sign cleared, an unsigned
// integer that orders like |x| (worm_fast/_ops.py, MagnitudeKey). S is the storage
// integer, K the key type (16-bit keys widen to 32 bits).

struct BlockCounts {
  uint64_t inside;  // bit k: key k lies in the window
  uint32_t below;
  uint32_t nans;
};

// Classifies 32 keys: returns bit k set when key k lies in the window, writes the digits
// (garbage outside the window) and adds the keys below it and the NaNs. One fixed-trip
// loop with local sums, as in pack_full_word, so that it vectorizes: the scatter into
// the counts that follows is the only scalar work, and only for keys in the window.
template <class S, class K>
WF_INLINE uint32_t classify_32(const S* __restrict v, K abs_mask, K inf, K lo, int window,
                               int shift, K* __restrict digits, uint32_t& below,
                               uint32_t& nans) {
  uint32_t inside = 0;
  uint32_t under = 0;
  uint32_t nan_count = 0;
  for (int k = 0; k < 32; ++k) {
    const K key = static_cast<K>(v[k]) & abs_mask;
    // Below lo the difference wraps past 2^window (keys are under half the type's range).
    const K offset = key - lo;
    digits[k] = offset >> shift;
    const bool nan = key > inf;
    under += static_cast<uint32_t>(!nan & (key < lo));
    nan_count += static_cast<uint32_t>(nan);
    inside |= static_cast<uint32_t>(!nan & ((offset >> window) == 0)) << k;
  }
  below += under;
  nans += nan_count;
  return inside;
}

template <class S, class K>
WF_INLINE BlockCounts classify_block(const S* __restrict v, K abs_mask, K inf, K lo, int window,
                                     int shift, K* __restrict digits) {
  BlockCounts c{0, 0, 0};
  const uint32_t low =
      classify_32<S, K>(v, abs_mask, inf, lo, window, shift, digits, c.below, c.nans);
  const uint32_t high = classify_32<S, K>(v + 32, abs_mask, inf, lo, window, shift, digits + 32,
                                          c.below, c.nans);
  c.inside = low | (static_cast<uint64_t>(high) << 32);
  return c;
}

// Keys of the blocks of 64 elements in [begin, end) (begin a multiple of 64) whose index
// is a multiple of pass.stride; full blocks go to count_block(first element), the last
// partial one is counted here. A sample (stride > 1) jumps between blocks, which the
// hardware prefetcher does not follow: the blocks 8 strides ahead are prefetched.
template <class S, class K, class CountBlock>
WF_INLINE void for_each_block(const S* v, K abs_mask, K inf, const HistogramPass& pass,
                              int64_t begin, int64_t end, uint32_t* __restrict counts,
                              int64_t& below, int64_t& nans, const CountBlock& count_block) {
  constexpr int64_t kPrefetchStrides = 8;
  const int64_t stride = pass.stride;
  const K lo = static_cast<K>(pass.lo);
  const int window = pass.shift + pass.bits;
  for (int64_t block = (begin / 64 + stride - 1) / stride * stride; block * 64 < end;
       block += stride) {
    const int64_t base = block * 64;
    if (stride > 1 && base + (kPrefetchStrides * stride + 1) * 64 <= end) {
      const char* ahead = reinterpret_cast<const char*>(v + base + kPrefetchStrides * stride * 64);
      for (int64_t line = 0; line < static_cast<int64_t>(64 * sizeof(S)); line += 64) {
        __builtin_prefetch(ahead + line);
      }
    }
    if (end - base >= 64) {
      count_block(v + base);
      continue;
    }
    for (int64_t i = base; i < end; ++i) {
      const K key = static_cast<K>(v[i]) & abs_mask;
      if (key > inf) {
        ++nans;
      } else if (key < lo) {
        ++below;
      } else if (((key - lo) >> window) == 0) {
        ++counts[(key - lo) >> pass.shift];
      }
    }
  }
}

#if WF_HAVE_AVX512
WF_INLINE __m512i load_keys(const uint32_t* v) { return _mm512_loadu_si512(v); }
WF_INLINE __m512i load_keys(const uint16_t* v) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
}

// 32-bit keys (float32; float16 and bfloat16 widened), 16 per vector: compares into lane
// masks, and the digits of the keys in the window compressed into a buffer, so that no
// branch depends on the data until one tight loop counts the buffer. About one read of
// the values when few keys lie in the window.
template <class S>
void histogram_avx512(const S* v, uint32_t abs_mask, uint32_t inf, const HistogramPass& pass,
                      int64_t begin, int64_t end, uint32_t* __restrict counts, int64_t* below,
                      int64_t* nans) {
  constexpr int kBuffer = 2048;
  uint32_t buffer[kBuffer + 64];
  int length = 0;
  const int window = pass.shift + pass.bits;  // <= 31
  const __m512i abs_v = _mm512_set1_epi32(static_cast<int>(abs_mask));
  const __m512i inf_v = _mm512_set1_epi32(static_cast<int>(inf));
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(pass.lo)));
  const __m512i width_v = _mm512_set1_epi32(static_cast<int>(uint32_t{1} << window));
  const __m128i shift_v = _mm_cvtsi32_si128(pass.shift);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i below_v = _mm512_setzero_si512();
  __m512i nans_v = _mm512_setzero_si512();
  int64_t below_tail = 0;
  int64_t nans_tail = 0;
  const auto drain = [&] {
    for (int i = 0; i < length; ++i) {
      ++counts[buffer[i]];
    }
    length = 0;
  };
  const auto count_block = [&](const S* block) {
    for (int q = 0; q < 4; ++q) {
      const __m512i key = _mm512_and_si512(load_keys(block + 16 * q), abs_v);
      const __m512i offset = _mm512_sub_epi32(key, lo_v);  // below lo: wraps past width
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(key, inf_v);
      const __mmask16 under = _mm512_mask_cmplt_epu32_mask(~nan, key, lo_v);
      const __mmask16 inside = _mm512_mask_cmplt_epu32_mask(~nan, offset, width_v);
      below_v = _mm512_mask_add_epi32(below_v, under, below_v, one);
      nans_v = _mm512_mask_add_epi32(nans_v, nan, nans_v, one);
      const __m512i digits = _mm512_srl_epi32(offset, shift_v);
      _mm512_storeu_si512(buffer + length, _mm512_maskz_compress_epi32(inside, digits));
      length += __builtin_popcount(inside);
    }
    if (length > kBuffer) {
      drain();
    }
  };
  for_each_block<S, uint32_t>(v, abs_mask, inf, pass, begin, end, counts, below_tail, nans_tail,
                              count_block);
  drain();
  // Lane sums stay below 2^32: a call covers one work item.
  *below += below_tail + static_cast<uint32_t>(_mm512_reduce_add_epi32(below_v));
  *nans += nans_tail + static_cast<uint32_t>(_mm512_reduce_add_epi32(nans_v));
}
#endif

template <class S, class K>
void histogram_typed(const void* values, K abs_mask, K inf, const HistogramPass& pass,
                     int64_t begin, int64_t end, uint32_t* __restrict counts, int64_t* below,
                     int64_t* nans) {
  const S* v = static_cast<const S*>(values);
#if WF_HAVE_AVX512
  if constexpr (sizeof(K) == 4) {
    return histogram_avx512<S>(v, abs_mask, inf, pass, begin, end, counts, below, nans);
  }
#endif
  const K lo = static_cast<K>(pass.lo);
  const int window = pass.shift + pass.bits;
  int64_t below_sum = 0;
  int64_t nan_sum = 0;
  const auto count_block = [&](const S* block) {
    K digits[64];
    const BlockCounts c =
        classify_block<S, K>(block, abs_mask, inf, lo, window, pass.shift, digits);
    below_sum += c.below;
    nan_sum += c.nans;
    if (c.inside == ~uint64_t{0}) {  // a full-window pass: every key counts
      for (int k = 0; k < 64; ++k) {
        ++counts[digits[k]];
      }
    } else {
      for (uint64_t in = c.inside; in != 0; in &= in - 1) {
        ++counts[digits[__builtin_ctzll(in)]];
      }
    }
  };
  for_each_block<S, K>(v, abs_mask, inf, pass, begin, end, counts, below_sum, nan_sum,
                       count_block);
  *below += below_sum;
  *nans += nan_sum;
}

// The sign masks and inf keys of worm_fast/_ops.py's MAGNITUDE_KEYS.
void histogram_range(const void* values, ScalarKind kind, const HistogramPass& pass,
                     int64_t begin, int64_t end, uint32_t* counts, int64_t* below,
                     int64_t* nans) {
  switch (kind) {
    case ScalarKind::Float:
      return histogram_typed<uint32_t, uint32_t>(values, 0x7FFFFFFFu, 0x7F800000u, pass, begin,
                                                 end, counts, below, nans);
    case ScalarKind::Double:
      return histogram_typed<uint64_t, uint64_t>(values, 0x7FFFFFFFFFFFFFFFull,
                                                 0x7FF0000000000000ull, pass, begin, end,
                                                 counts, below, nans);
    case ScalarKind::Half:
      return histogram_typed<uint16_t, uint32_t>(values, 0x7FFFu, 0x7C00u, pass, begin, end,
                                                 counts, below, nans);
    case ScalarKind::BFloat16:
      return histogram_typed<uint16_t, uint32_t>(values, 0x7FFFu, 0x7F80u, pass, begin, end,
                                                 counts, below, nans);
  }
}

// Constant-initialized: no code compiled for this ISA runs when the table is chosen.
constexpr KernelTable kTable{WF_ISA_NAME,     sgd_range,    adamw_range,  pack_range,
                             unpack_range,    hamming_range, histogram_range,
                             soft_mask_distance_range, soft_mask_distance_grad_range};

}  // namespace
}  // namespace WF_ISA
}  // namespace worm_fast::cpu

#undef WF_INLINE
