// Shared by the CPU and CUDA registrations: the packed-mask layout and the argument
// checks of every op, so both backends reject bad input with the same message (naming
// the argument and what was expected) before they touch anything.
//
// The op schemas themselves live in worm_fast/_ops.py; csrc/ only registers kernels with
// TORCH_LIBRARY_IMPL(worm_fast, <key>, m).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>

namespace worm_fast {

// DESIGN §3.1: bit i at byte i / 8, bit i % 8 (LSB first), 1 = kept; the byte length
// is padded to whole 64-bit words.
constexpr int64_t kWordBits = 64;

constexpr int64_t packed_nbytes(int64_t numel) {
  return (numel + kWordBits - 1) / kWordBits * (kWordBits / 8);
}

// float32, float64, float16 and bfloat16: the parameter dtypes the steps support.
bool is_supported_float(at::ScalarType dtype);

// The tensor lists of masked_sgd_step_, all on `device_type` (and on one device).
// Parameters and momentum buffers must be contiguous (they are written in place);
// gradients and masks may have any strides (the kernels copy them when needed).
void check_masked_sgd_args(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers,
                           const c10::List<std::optional<at::Tensor>>& masks, double momentum,
                           c10::DeviceType device_type);

// The tensor lists of masked_adamw_step_, all on `device_type` (and on one device):
// params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad) contiguous, of one
// dtype and size per param; state_steps float32 tensors of one element on the params'
// device; grads and masks of any strides.
void check_masked_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const c10::List<std::optional<at::Tensor>>& masks, bool amsgrad,
                             c10::DeviceType device_type);

// lr_tensor / grad_scale / found_inf of the op `op` ("worm_fast.masked_sgd_step_"): one
// element, on the parameters' device or the CPU.
void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& like, const char* op);

void check_pack_mask_args(const at::Tensor& values, const at::Tensor& threshold);
void check_unpack_mask_args(const at::Tensor& packed, int64_t numel);
void check_hamming_window_args(const at::Tensor& current, const at::Tensor& window);

}  // namespace worm_fast
