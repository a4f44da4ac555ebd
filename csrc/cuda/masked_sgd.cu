// CUDA kernel of worm_fast::masked_sgd_step_: multi-tensor launches update every
// parameter and momentum buffer of one dtype in place, reading the packed truncation
// masks, with no host synchronization: lr, grad_scale, found_inf and r are read on the
// device when given as device scalars (found_inf != 0 makes every block return at once).
//
// Per element, in float (double for float64 parameters), as in
// worm_fast/backends/reference.py and with torch.optim.SGD's fused multiply-adds:
//   g = grad / grad_scale;  g *= kept ? 1 : r;  g = maximize ? -g : g
//   g = fma(p, weight_decay, g)
//   b = first step ? g : fma(g, 1 - dampening, momentum * b)
//   g = nesterov ? fma(b, momentum, g) : b
//   p = fma(g, -lr, p)

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <vector>

#include "elementwise.cuh"
#include "multi_tensor_apply.cuh"
#include "worm_fast/cuda_kernels.h"

namespace worm_fast::cuda {
namespace {

template <typename opmath_t>
struct SgdArgs {
  opmath_t lr;  // used when lr_ptr is null
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t truncation;  // used when truncation_ptr is null
  opmath_t grad_scale;  // used when grad_scale_ptr is null
  bool nesterov;
  bool maximize;
  bool is_first_step;
  bool has_momentum;
};

// Slots of TensorListMeta<4>::ptr.
enum : int { kParam = 0, kGrad = 1, kBuf = 2, kMask = 3 };

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kBlockSize)
    masked_sgd_kernel(TensorListMeta<4> tl, SgdArgs<opmath_t> args, const opmath_t* lr_ptr,
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
  auto* __restrict__ b = static_cast<scalar_t*>(tl.ptr[kBuf][slot]);
  const auto* __restrict__ mask = static_cast<const uint8_t*>(tl.ptr[kMask][slot]);

  const opmath_t neg_lr = -(lr_ptr != nullptr ? *lr_ptr : args.lr);
  const opmath_t scale = grad_scale_ptr != nullptr ? *grad_scale_ptr : args.grad_scale;
  const opmath_t truncation =
      truncation_ptr != nullptr ? static_cast<opmath_t>(*truncation_ptr) : args.truncation;
  const bool read_buf = args.has_momentum && !args.is_first_step;
  const bool vectorized = is_aligned(p) && is_aligned(g) && (b == nullptr || is_aligned(b));

  for (int64_t base = start + static_cast<int64_t>(threadIdx.x) * kILP; base < end;
       base += static_cast<int64_t>(blockDim.x) * kILP) {
    const bool full = base + kILP <= end;
    scalar_t pr[kILP], gr[kILP], br[kILP];
    if (full && vectorized) {
      load_vec(pr, p + base);
      load_vec(gr, g + base);
      if (read_buf) {
        load_vec(br, b + base);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const bool in = base + k < end;
        pr[k] = in ? p[base + k] : scalar_t(0);
        gr[k] = in ? g[base + k] : scalar_t(0);
        br[k] = in && read_buf ? b[base + k] : scalar_t(0);
      }
    }
    // base is a multiple of kILP = 4, so the bits of its elements share one mask byte.
    const unsigned bits = mask != nullptr ? (mask[base >> 3] >> (base & 7)) : 0xFu;

#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      opmath_t grad = static_cast<opmath_t>(gr[k]) / scale;
      grad *= ((bits >> k) & 1u) ? opmath_t(1) : truncation;
      if (args.maximize) {
        grad = -grad;
      }
      const opmath_t param = static_cast<opmath_t>(pr[k]);
      if (args.weight_decay != opmath_t(0)) {
        grad = fmadd(param, args.weight_decay, grad);
      }
      if (args.has_momentum) {
        const opmath_t buf =
            args.is_first_step
                ? grad
                : fmadd(grad, args.one_minus_dampening,
                        static_cast<opmath_t>(br[k]) * args.momentum);
        br[k] = static_cast<scalar_t>(buf);
        grad = args.nesterov ? fmadd(buf, args.momentum, grad) : buf;
      }
      pr[k] = static_cast<scalar_t>(fmadd(grad, neg_lr, param));
    }

    if (full && vectorized) {
      store_vec(p + base, pr);
      if (args.has_momentum) {
        store_vec(b + base, br);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        if (base + k < end) {
          p[base + k] = pr[k];
          if (args.has_momentum) {
            b[base + k] = br[k];
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename opmath_t>
void launch_typed(const SgdTensor* tensors, int64_t count, const SgdStep& step,
                  cudaStream_t stream) {
  const SgdArgs<opmath_t> args{static_cast<opmath_t>(step.lr),
                               static_cast<opmath_t>(step.weight_decay),
                               static_cast<opmath_t>(step.momentum),
                               static_cast<opmath_t>(1.0 - step.dampening),
                               static_cast<opmath_t>(step.truncation),
                               static_cast<opmath_t>(step.grad_scale),
                               step.nesterov,
                               step.maximize,
                               step.is_first_step,
                               step.momentum != 0.0};
  const auto* lr_ptr = static_cast<const opmath_t*>(step.lr_device);
  const auto* scale_ptr = static_cast<const opmath_t*>(step.grad_scale_device);
  std::vector<std::array<void*, 4>> addresses;
  std::vector<int64_t> numels;
  addresses.reserve(count);
  numels.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const SgdTensor& t = tensors[i];
    addresses.push_back({t.param, const_cast<void*>(t.grad), t.buf,
                         const_cast<uint8_t*>(t.mask)});
    numels.push_back(t.numel);
  }
  multi_tensor_apply<4>(kChunkSize, addresses, numels,
                        [&](const TensorListMeta<4>& meta, int blocks) {
                          masked_sgd_kernel<scalar_t, opmath_t><<<blocks, kBlockSize, 0, stream>>>(
                              meta, args, lr_ptr, scale_ptr, step.found_inf_device,
                              step.truncation_device);
                          C10_CUDA_KERNEL_LAUNCH_CHECK();
                        });
}

}  // namespace

void launch_masked_sgd(ScalarKind kind, const SgdTensor* tensors, int64_t count,
                       const SgdStep& step, cudaStream_t stream) {
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
