// CUDA kernels of worm_fast::masked_adamw_step_: multi-tensor launches update every
// parameter and its AdamW states (of one dtype) in place, reading the packed truncation
// masks and the step counts on the device, with no host synchronization: lr, grad_scale,
// found_inf and r are read on the device when given as device scalars, and found_inf != 0
// makes every block return at once.
//
// Per tensor, once per block (thread 0, in double, as torch.optim.AdamW does on the host):
//   t = step + 1 (float32);  step_size = lr / (1 - beta1^t);  c2 = sqrt(1 - beta2^t)
// Per element, in float (double for float64 parameters), as in
// worm_fast/backends/reference.py and with the CPU kernel's rounding (torch's lerp and
// addcmul as FMAs):
//   g = grad / grad_scale;  g = maximize ? -g : g;  p *= 1 - lr * weight_decay
//   g *= kept ? 1 : r (truncate="gradient")
//   m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) g, g, beta2 v)
//   v_max = max(v_max, v) (amsgrad);  denom = sqrt(v or v_max) / c2 + eps
//   p += (-step_size * (kept ? 1 : r)) * m / denom (truncate="update", the default)
//   p += -step_size * m / denom (truncate="gradient")
//
// Every block reads the step count of before the step; a second, tiny kernel enqueued
// after the last update launch increments the counts (also skipped when found_inf != 0).

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <vector>

#include "elementwise.cuh"
#include "multi_tensor_apply.cuh"
#include "worm_fast/cuda_kernels.h"

namespace worm_fast::cuda {
namespace {

__device__ __forceinline__ float square_root(float x) { return sqrtf(x); }
__device__ __forceinline__ double square_root(double x) { return sqrt(x); }

template <typename opmath_t>
struct AdamArgs {
  // For the per-tensor scalars (double, as on the host).
  double lr;  // used when lr_ptr is null
  double beta1;
  double beta2;
  double weight_decay;
  double truncation;  // used when truncation_ptr is null
  // For the elements.
  opmath_t lerp_weight;  // torch's lerp: m + w (g - m) for w < 0.5, g + (w - 1) (g - m) else
  opmath_t beta2_elem;
  opmath_t one_minus_beta2;
  opmath_t eps;
  opmath_t grad_scale;  // used when grad_scale_ptr is null
  bool lerp_from_grad;
  bool maximize;
  bool has_weight_decay;
  bool truncate_gradient;
};

// The scalars of one tensor's step, computed by one thread of the block.
template <typename opmath_t>
struct TensorScalars {
  opmath_t neg_step_size;         // -lr / (1 - beta1^t): the factor of kept elements
  opmath_t neg_step_size_pruned;  // the same times truncation
  opmath_t truncation;            // r, the gradient factor of pruned elements (truncate_gradient)
  opmath_t decay;                 // 1 - lr * weight_decay
  opmath_t bias_correction2_sqrt;
};

// Slots of TensorListMeta<7>::ptr.
enum : int {
  kParam = 0,
  kGrad = 1,
  kExpAvg = 2,
  kExpAvgSq = 3,
  kMaxExpAvgSq = 4,
  kMask = 5,
  kStep = 6
};

template <typename scalar_t, typename opmath_t, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockSize)
    masked_adamw_kernel(TensorListMeta<7> tl, AdamArgs<opmath_t> args, const opmath_t* lr_ptr,
                        const opmath_t* grad_scale_ptr, const float* found_inf_ptr,
                        const double* truncation_ptr) {
  // GradScaler found an inf/NaN: the step is skipped, decided on the device.
  if (found_inf_ptr != nullptr && *found_inf_ptr != 0.0f) {
    return;
  }
  const int slot = tl.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tl.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t numel = tl.numel[slot];
  const int64_t end = numel < start + kChunkSize ? numel : start + kChunkSize;

  auto* __restrict__ p = static_cast<scalar_t*>(tl.ptr[kParam][slot]);
  const auto* __restrict__ g = static_cast<const scalar_t*>(tl.ptr[kGrad][slot]);
  auto* __restrict__ m = static_cast<scalar_t*>(tl.ptr[kExpAvg][slot]);
  auto* __restrict__ v = static_cast<scalar_t*>(tl.ptr[kExpAvgSq][slot]);
  auto* __restrict__ vmax = static_cast<scalar_t*>(tl.ptr[kMaxExpAvgSq][slot]);
  const auto* __restrict__ mask = static_cast<const uint8_t*>(tl.ptr[kMask][slot]);

  __shared__ TensorScalars<opmath_t> shared;
  if (threadIdx.x == 0) {
    const float* step = static_cast<const float*>(tl.ptr[kStep][slot]);
    const double t = static_cast<double>(*step + 1.0f);
    const double lr = lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : args.lr;
    const double step_size = lr / (1.0 - pow(args.beta1, t));
    shared.neg_step_size = static_cast<opmath_t>(-step_size);
    const double truncation = truncation_ptr != nullptr ? *truncation_ptr : args.truncation;
    shared.neg_step_size_pruned = static_cast<opmath_t>(-step_size * truncation);
    shared.truncation = static_cast<opmath_t>(truncation);
    shared.decay = static_cast<opmath_t>(1.0 - lr * args.weight_decay);
    shared.bias_correction2_sqrt = static_cast<opmath_t>(sqrt(1.0 - pow(args.beta2, t)));
  }
  __syncthreads();
  const TensorScalars<opmath_t> s = shared;

  const opmath_t scale = grad_scale_ptr != nullptr ? *grad_scale_ptr : args.grad_scale;
  const opmath_t sign = args.maximize ? opmath_t(-1) : opmath_t(1);
  const bool vectorized = is_aligned(p) && is_aligned(g) && is_aligned(m) && is_aligned(v) &&
                          (!kAmsgrad || is_aligned(vmax));

  for (int64_t base = start + static_cast<int64_t>(threadIdx.x) * kILP; base < end;
       base += static_cast<int64_t>(blockDim.x) * kILP) {
    const bool full = base + kILP <= end;
    scalar_t pr[kILP], gr[kILP], mr[kILP], vr[kILP], vmr[kILP];
    if (full && vectorized) {
      load_vec(pr, p + base);
      load_vec(gr, g + base);
      load_vec(mr, m + base);
      load_vec(vr, v + base);
      if (kAmsgrad) {
        load_vec(vmr, vmax + base);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const bool in = base + k < end;
        pr[k] = in ? p[base + k] : scalar_t(0);
        gr[k] = in ? g[base + k] : scalar_t(0);
        mr[k] = in ? m[base + k] : scalar_t(0);
        vr[k] = in ? v[base + k] : scalar_t(0);
        vmr[k] = in && kAmsgrad ? vmax[base + k] : scalar_t(0);
      }
    }
    // base is a multiple of kILP = 4, so the bits of its elements share one mask byte.
    const unsigned bits = mask != nullptr ? (mask[base >> 3] >> (base & 7)) : 0xFu;

#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const bool kept = (bits >> k) & 1u;
      opmath_t grad = static_cast<opmath_t>(gr[k]) / scale * sign;
      if (args.truncate_gradient && !kept) {
        grad = grad * s.truncation;
      }
      const opmath_t old = static_cast<opmath_t>(mr[k]);
      const opmath_t avg =
          fmadd(args.lerp_weight, grad - old, args.lerp_from_grad ? grad : old);
      const opmath_t sq = fmadd(args.one_minus_beta2 * grad, grad,
                                static_cast<opmath_t>(vr[k]) * args.beta2_elem);
      mr[k] = static_cast<scalar_t>(avg);
      vr[k] = static_cast<scalar_t>(sq);
      opmath_t root = sq;
      if (kAmsgrad) {
        const opmath_t prev = static_cast<opmath_t>(vmr[k]);
        root = (prev != prev || prev > sq) ? prev : sq;  // torch.maximum: NaN wins
        vmr[k] = static_cast<scalar_t>(root);
      }
      opmath_t param = static_cast<opmath_t>(pr[k]);
      if (args.has_weight_decay) {
        param = param * s.decay;
      }
      const opmath_t denom = square_root(root) / s.bias_correction2_sqrt + args.eps;
      const opmath_t factor =
          kept || args.truncate_gradient ? s.neg_step_size : s.neg_step_size_pruned;
      pr[k] = static_cast<scalar_t>(param + (factor * avg) / denom);
    }

    if (full && vectorized) {
      store_vec(p + base, pr);
      store_vec(m + base, mr);
      store_vec(v + base, vr);
      if (kAmsgrad) {
        store_vec(vmax + base, vmr);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        if (base + k < end) {
          p[base + k] = pr[k];
          m[base + k] = mr[k];
          v[base + k] = vr[k];
          if (kAmsgrad) {
            vmax[base + k] = vmr[k];
          }
        }
      }
    }
  }
}

// The step counts of up to kMaxSteps tensors, passed by value.
constexpr int kMaxSteps = 384;

struct StepList {
  float* ptr[kMaxSteps];
  int count;
};

static_assert(sizeof(StepList) <= kMetaBytes, "kernel arguments must stay under 4 KiB");

__global__ void __launch_bounds__(kMaxSteps)
    increment_steps_kernel(StepList steps, const float* found_inf_ptr) {
  if (found_inf_ptr != nullptr && *found_inf_ptr != 0.0f) {
    return;
  }
  if (static_cast<int>(threadIdx.x) < steps.count) {
    *steps.ptr[threadIdx.x] += 1.0f;
  }
}

template <typename scalar_t, typename opmath_t>
void launch_typed(const AdamTensor* tensors, int64_t count, const AdamStep& step,
                  cudaStream_t stream) {
  const double w = 1.0 - step.beta1;
  const auto lerp_weight = static_cast<opmath_t>(w);
  const bool from_grad = !(lerp_weight < opmath_t(0.5) && lerp_weight > opmath_t(-0.5));
  const AdamArgs<opmath_t> args{step.lr,
                                step.beta1,
                                step.beta2,
                                step.weight_decay,
                                step.truncation,
                                from_grad ? static_cast<opmath_t>(lerp_weight - opmath_t(1))
                                          : lerp_weight,
                                static_cast<opmath_t>(step.beta2),
                                static_cast<opmath_t>(1.0 - step.beta2),
                                static_cast<opmath_t>(step.eps),
                                static_cast<opmath_t>(step.grad_scale),
                                from_grad,
                                step.maximize,
                                step.weight_decay != 0.0,
                                step.truncate_gradient};
  const auto* lr_ptr = static_cast<const opmath_t*>(step.lr_device);
  const auto* scale_ptr = static_cast<const opmath_t*>(step.grad_scale_device);
  std::vector<std::array<void*, 7>> addresses;
  std::vector<int64_t> numels;
  addresses.reserve(count);
  numels.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const AdamTensor& t = tensors[i];
    addresses.push_back({t.param, const_cast<void*>(t.grad), t.exp_avg, t.exp_avg_sq,
                         step.amsgrad ? t.max_exp_avg_sq : nullptr,
                         const_cast<uint8_t*>(t.mask), t.step});
    numels.push_back(t.numel);
  }
  multi_tensor_apply<7>(kChunkSize, addresses, numels,
                        [&](const TensorListMeta<7>& meta, int blocks) {
                          if (step.amsgrad) {
                            masked_adamw_kernel<scalar_t, opmath_t, true>
                                <<<blocks, kBlockSize, 0, stream>>>(meta, args, lr_ptr, scale_ptr,
                                                                    step.found_inf_device,
                                                                    step.truncation_device);
                          } else {
                            masked_adamw_kernel<scalar_t, opmath_t, false>
                                <<<blocks, kBlockSize, 0, stream>>>(meta, args, lr_ptr, scale_ptr,
                                                                    step.found_inf_device,
                                                                    step.truncation_device);
                          }
                          C10_CUDA_KERNEL_LAUNCH_CHECK();
                        });
  // After every update launch (same stream): the counts they read were the old ones.
  for (int64_t first = 0; first < count; first += kMaxSteps) {
    StepList list{};
    list.count = static_cast<int>(std::min<int64_t>(kMaxSteps, count - first));
    for (int k = 0; k < list.count; ++k) {
      list.ptr[k] = tensors[first + k].step;
    }
    increment_steps_kernel<<<1, kMaxSteps, 0, stream>>>(list, step.found_inf_device);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_masked_adamw(ScalarKind kind, const AdamTensor* tensors, int64_t count,
                         const AdamStep& step, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float:
      return launch_typed<float, float>(tensors, count, step, stream);
    case ScalarKind::Double:
      return launch_typed<double, double>(tensors, count, step, stream);
    case ScalarKind::Half:
      return launch_typed<c10::Half, float>(tensors, count, step, stream);
    case ScalarKind::BFloat16:
      return launch_typed<c10::BFloat16, float>(tensors, count, step, stream);
  }
}

}  // namespace worm_fast::cuda
