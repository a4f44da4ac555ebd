// CUDA registrations of the worm_fast ops: argument checks, device scalars, and the
// calls into the launchers of cuda_kernels.h (compiled by nvcc in *.cu). Built only when
// setup.py finds a CUDA toolkit. Nothing here synchronizes with the device: a scalar
// given as a CUDA tensor (threshold, lr, grad_scale, found_inf, r) is read by the kernels;
// one given as a CPU tensor is read on the host, which costs no sync. AdamW's step counts
// live on the device and are read and incremented by its kernels.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "worm_fast/common.h"
#include "worm_fast/cuda_kernels.h"

namespace worm_fast::cuda {
namespace {

constexpr const char* kSgdOp = "worm_fast.masked_sgd_step_";
constexpr const char* kAdamWOp = "worm_fast.masked_adamw_step_";

ScalarKind kind_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ScalarKind::Float;
    case at::kDouble:
      return ScalarKind::Double;
    case at::kHalf:
      return ScalarKind::Half;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    default:
      TORCH_CHECK(false, "worm_fast: unsupported dtype ", dtype);
  }
}

// The dtype the kernels compute in for parameters of `dtype`.
at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A CUDA scalar tensor converted (on the stream) to `dtype`, kept alive in `keep`, as a
// device pointer; a CPU one read into `host` instead (null pointer).
const void* device_scalar(const std::optional<at::Tensor>& t, at::ScalarType dtype,
                          std::vector<at::Tensor>& keep, double& host) {
  if (!t.has_value() || !t->defined()) {
    return nullptr;
  }
  if (t->device().is_cpu()) {
    host = t->item<double>();
    return nullptr;
  }
  keep.push_back(t->to(dtype).contiguous());
  return keep.back().const_data_ptr();
}

at::Tensor pack_mask_cuda(const at::Tensor& values, const at::Tensor& threshold) {
  check_pack_mask_args(values, threshold);
  TORCH_CHECK(values.is_cuda(), "worm_fast.pack_mask (CUDA): values are on ", values.device());
  const c10::cuda::CUDAGuard device_guard(values.device());
  // Non-float values compare in float32, as the reference does.
  const at::Tensor v = is_supported_float(values.scalar_type())
                           ? values.contiguous()
                           : values.contiguous().to(at::kFloat);
  const int64_t nbytes = packed_nbytes(v.numel());
  at::Tensor out = at::empty({nbytes}, v.options().dtype(at::kByte));
  std::vector<at::Tensor> keep;
  double threshold_host = 0.0;
  const void* threshold_device = device_scalar(
      std::optional<at::Tensor>(threshold), compute_dtype(v.scalar_type()), keep, threshold_host);
  launch_pack_mask(kind_of(v.scalar_type()), v.const_data_ptr(), v.numel(), threshold_device,
                   threshold_host, reinterpret_cast<uint64_t*>(out.data_ptr<uint8_t>()),
                   nbytes / 8, c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, c10::SymInt numel_sym) {
  const int64_t numel = numel_sym.guard_int(__FILE__, __LINE__);
  check_unpack_mask_args(packed, numel);
  const c10::cuda::CUDAGuard device_guard(packed.device());
  const at::Tensor p = packed.contiguous();
  at::Tensor out = at::empty({numel}, p.options().dtype(at::kBool));
  launch_unpack_mask(p.const_data_ptr<uint8_t>(), out.data_ptr<bool>(), numel,
                     c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor hamming_window_cuda(const at::Tensor& current, const at::Tensor& window) {
  check_hamming_window_args(current, window);
  TORCH_CHECK(window.is_cuda(), "worm_fast.hamming_window (CUDA): window is on ",
              window.device());
  const c10::cuda::CUDAGuard device_guard(window.device());
  at::Tensor out = at::zeros({window.size(0)}, window.options().dtype(at::kLong));
  const at::Tensor cur = current.contiguous();
  const at::Tensor win = window.contiguous();
  launch_hamming_window(cur.const_data_ptr<uint8_t>(), win.const_data_ptr<uint8_t>(),
                        win.size(0), win.size(1), out.data_ptr<int64_t>(),
                        c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor magnitude_histogram_cuda(at::TensorList tensors, const at::Tensor& lo, int64_t shift,
                                    int64_t bits, int64_t stride) {
  check_magnitude_histogram_args(tensors, lo, shift, bits, stride, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = lo.numel();
  const int64_t width = (int64_t{1} << bits) + 2;
  at::Tensor out = at::zeros({rows, width}, lo.options());
  const at::Tensor starts = lo.contiguous();
  std::vector<at::Tensor> keep;  // contiguous copies of strided tensors
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t row = rows == 1 ? 0 : static_cast<int64_t>(i);
    launch_magnitude_histogram(kind_of(tensors[i].scalar_type()),
                               contiguous_data(tensors[i], keep), tensors[i].numel(),
                               starts.const_data_ptr<int64_t>() + row, static_cast<int>(shift),
                               static_cast<int>(bits), stride,
                               out.data_ptr<int64_t>() + row * width, stream);
  }
  return out;
}

void masked_sgd_step_cuda(at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers,
                          const c10::List<std::optional<at::Tensor>>& masks, double lr,
                          double weight_decay, double momentum, double dampening, bool nesterov,
                          bool maximize, bool is_first_step, double truncation,
                          const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& truncation_tensor) {
  check_masked_sgd_args(params, grads, momentum_buffers, masks, momentum, truncation,
                        c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  check_scalar_tensor(lr_tensor, "lr_tensor", params[0], kSgdOp);
  check_scalar_tensor(grad_scale, "grad_scale", params[0], kSgdOp);
  check_scalar_tensor(found_inf, "found_inf", params[0], kSgdOp);
  check_truncation_tensor(truncation_tensor, params[0], kSgdOp);
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> keep;  // converted scalars, contiguous grads and masks
  double found_inf_host = 0.0;
  const auto* found_inf_device =
      static_cast<const float*>(device_scalar(found_inf, at::kFloat, keep, found_inf_host));
  if (found_inf_host != 0.0) {
    return;  // a CPU flag: nothing to launch
  }

  // One launch sequence per parameter dtype (each computes in its own dtype).
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<SgdTensor> tensors;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtype || params[i].numel() == 0) {
        continue;
      }
      const void* grad = contiguous_data(grads[i], keep);
      const uint8_t* mask = mask_data(masks, i, keep);
      void* buf = momentum != 0.0 ? momentum_buffers[i].data_ptr() : nullptr;
      tensors.push_back({params[i].data_ptr(), grad, buf, mask, params[i].numel()});
    }
    if (tensors.empty()) {
      continue;
    }
    SgdStep step{lr,       weight_decay, momentum,      dampening, truncation, 1.0,
                 nesterov, maximize,     is_first_step, nullptr,   nullptr,    found_inf_device,
                 nullptr};
    step.lr_device = device_scalar(lr_tensor, compute_dtype(dtype), keep, step.lr);
    step.grad_scale_device =
        device_scalar(grad_scale, compute_dtype(dtype), keep, step.grad_scale);
    step.truncation_device = static_cast<const double*>(
        device_scalar(truncation_tensor, at::kDouble, keep, step.truncation));
    launch_masked_sgd(kind_of(dtype), tensors.data(), static_cast<int64_t>(tensors.size()),
                      step, stream);
  }
}

void masked_adamw_step_cuda(at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                            const c10::List<std::optional<at::Tensor>>& masks, double lr,
                            double beta1, double beta2, double weight_decay, double eps,
                            bool amsgrad, bool maximize, double truncation,
                            const std::optional<at::Tensor>& lr_tensor,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf,
                            c10::string_view truncate,
                            const std::optional<at::Tensor>& truncation_tensor) {
  const bool truncate_gradient =
      check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                              state_steps, masks, beta1, beta2, truncation, amsgrad, truncate,
                              c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  check_scalar_tensor(lr_tensor, "lr_tensor", params[0], kAdamWOp);
  check_scalar_tensor(grad_scale, "grad_scale", params[0], kAdamWOp);
  check_scalar_tensor(found_inf, "found_inf", params[0], kAdamWOp);
  check_truncation_tensor(truncation_tensor, params[0], kAdamWOp);
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> keep;  // converted scalars, contiguous grads and masks
  double found_inf_host = 0.0;
  const auto* found_inf_device =
      static_cast<const float*>(device_scalar(found_inf, at::kFloat, keep, found_inf_host));
  if (found_inf_host != 0.0) {
    return;  // a CPU flag: nothing to launch, the step counts stay
  }

  // One launch sequence per parameter dtype (each computes in its own dtype). Empty
  // tensors go in too: their step counts advance, as torch.optim.AdamW's do.
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<AdamTensor> tensors;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtype) {
        continue;
      }
      const void* grad = contiguous_data(grads[i], keep);
      const uint8_t* mask = mask_data(masks, i, keep);
      tensors.push_back({params[i].data_ptr(), grad, exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(),
                         amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, mask,
                         state_steps[i].data_ptr<float>(), params[i].numel()});
    }
    if (tensors.empty()) {
      continue;
    }
    AdamStep step{lr,      beta1,    beta2,    weight_decay,      eps,
                  truncation, 1.0,   amsgrad,  maximize, truncate_gradient, nullptr,
                  nullptr, found_inf_device, nullptr};
    step.lr_device = device_scalar(lr_tensor, compute_dtype(dtype), keep, step.lr);
    step.grad_scale_device =
        device_scalar(grad_scale, compute_dtype(dtype), keep, step.grad_scale);
    step.truncation_device = static_cast<const double*>(
        device_scalar(truncation_tensor, at::kDouble, keep, step.truncation));
    launch_masked_adamw(kind_of(dtype), tensors.data(), static_cast<int64_t>(tensors.size()),
                        step, stream);
  }
}

constexpr const char* kSoftMaskOp = "worm_fast.soft_mask_distance";
constexpr const char* kSoftMaskBackwardOp = "worm_fast.soft_mask_distance_backward";

// The launch arguments of each tensor of a soft_mask_distance call (staged contiguous
// values, thresholds and temperatures converted on the stream, kept alive in `keep`).
std::vector<SoftMaskArgs> soft_mask_args(at::TensorList values, const at::Tensor& window,
                                         const at::Tensor& thresholds,
                                         const at::Tensor& temperatures, const char* op,
                                         std::vector<at::Tensor>& keep) {
  check_soft_mask_distance_args(values, window, thresholds, temperatures, op);
  TORCH_CHECK(window.is_cuda(), op, " (CUDA): window is on ", window.device());
  const at::ScalarType acc = compute_dtype(values[0].scalar_type());
  keep.push_back(window.contiguous());
  const at::Tensor& win = keep.back();
  keep.push_back(thresholds.to(win.device(), acc).contiguous());
  const void* threshold = keep.back().const_data_ptr();
  keep.push_back(temperatures.to(win.device(), acc).contiguous());
  const void* temperature = keep.back().const_data_ptr();
  std::vector<SoftMaskArgs> args;
  int64_t offset = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    args.push_back({contiguous_data(values[i], keep), values[i].numel(),
                    win.const_data_ptr<uint8_t>() + offset, win.size(1), win.size(0), threshold,
                    temperature, static_cast<int64_t>(i)});
    offset += packed_nbytes(values[i].numel());
  }
  return args;
}

int64_t total_numel(at::TensorList values, const char* op) {
  int64_t numel = 0;
  for (const at::Tensor& v : values) {
    numel += v.numel();
  }
  TORCH_CHECK(numel > 0, op, ": values hold no elements");
  return numel;
}

at::Tensor soft_mask_distance_cuda(at::TensorList values, const at::Tensor& window,
                                   const at::Tensor& thresholds,
                                   const at::Tensor& temperatures) {
  const c10::cuda::CUDAGuard device_guard(window.device());
  std::vector<at::Tensor> keep;
  const auto args = soft_mask_args(values, window, thresholds, temperatures, kSoftMaskOp, keep);
  const int64_t numel = total_numel(values, kSoftMaskOp);
  const at::ScalarType acc = compute_dtype(values[0].scalar_type());
  int64_t blocks = 0;
  for (const SoftMaskArgs& a : args) {
    blocks += a.numel > 0 ? soft_mask_distance_blocks(a.numel) : 0;
  }
  at::Tensor partial = at::zeros({blocks}, window.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t first = 0;
  for (const SoftMaskArgs& a : args) {
    if (a.numel > 0) {
      launch_soft_mask_distance(kind_of(values[0].scalar_type()), a,
                                static_cast<char*>(partial.data_ptr()) +
                                    first * partial.element_size(),
                                stream);
      first += soft_mask_distance_blocks(a.numel);
    }
  }
  return partial.sum().div_(static_cast<double>(window.size(0)) * numel);
}

std::vector<at::Tensor> soft_mask_distance_backward_cuda(const at::Tensor& grad,
                                                         at::TensorList values,
                                                         const at::Tensor& window,
                                                         const at::Tensor& thresholds,
                                                         const at::Tensor& temperatures) {
  const c10::cuda::CUDAGuard device_guard(window.device());
  std::vector<at::Tensor> keep;
  const auto args =
      soft_mask_args(values, window, thresholds, temperatures, kSoftMaskBackwardOp, keep);
  TORCH_CHECK(grad.numel() == 1 && grad.device() == window.device(), kSoftMaskBackwardOp,
              ": grad must be one element on ", window.device(), ", got shape ", grad.sizes(),
              " on ", grad.device());
  const int64_t numel = total_numel(values, kSoftMaskBackwardOp);
  const at::ScalarType acc = compute_dtype(values[0].scalar_type());
  const at::Tensor scale =
      grad.to(acc).reshape({1}).div(static_cast<double>(window.size(0)) * numel);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < values.size(); ++i) {
    grads.push_back(
        at::empty(values[i].sizes(), values[i].options().memory_format(at::MemoryFormat::Contiguous)));
    launch_soft_mask_distance_backward(kind_of(values[i].scalar_type()), args[i],
                                       scale.const_data_ptr(), grads.back().data_ptr(), stream);
  }
  return grads;
}

}  // namespace
}  // namespace worm_fast::cuda

TORCH_LIBRARY_IMPL(worm_fast, CUDA, m) {
  m.impl("pack_mask", &worm_fast::cuda::pack_mask_cuda);
  m.impl("unpack_mask", &worm_fast::cuda::unpack_mask_cuda);
  m.impl("hamming_window", &worm_fast::cuda::hamming_window_cuda);
  m.impl("magnitude_histogram", &worm_fast::cuda::magnitude_histogram_cuda);
  m.impl("masked_sgd_step_", &worm_fast::cuda::masked_sgd_step_cuda);
  m.impl("masked_adamw_step_", &worm_fast::cuda::masked_adamw_step_cuda);
  m.impl("soft_mask_distance", &worm_fast::cuda::soft_mask_distance_cuda);
  m.impl("soft_mask_distance_backward", &worm_fast::cuda::soft_mask_distance_backward_cuda);
}

TORCH_LIBRARY_IMPL(worm_fast, SparseCUDA, m) {
  m.impl("masked_sgd_step_", &worm_fast::masked_sgd_step_sparse<c10::DeviceType::CUDA>);
  m.impl("masked_adamw_step_", &worm_fast::masked_adamw_step_sparse<c10::DeviceType::CUDA>);
}
