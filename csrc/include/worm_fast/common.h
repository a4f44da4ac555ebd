// Shared by the CPU and CUDA registrations: the packed-mask layout, the argument checks
// of every op (so both backends reject bad input with the same message, naming the
// argument and what was expected, before they touch anything), the staging of strided
// gradients and masks, and the kernels that refuse sparse tensors.
//
// The op schemas themselves live in worm_fast/_ops.py; csrc/ only registers kernels with
// TORCH_LIBRARY_IMPL(worm_fast, <key>, m).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace worm_fast {

// DESIGN §3.1: bit i at byte i / 8, bit i % 8 (LSB first), 1 = kept; the byte length
// is padded to whole 64-bit words.
constexpr int64_t kWordBits = 64;

constexpr int64_t packed_nbytes(int64_t numel) {
  return (numel + kWordBits - 1) / kWordBits * (kWordBits / 8);
}

// float32, float64, float16 and bfloat16: the parameter dtypes the steps support.
bool is_supported_float(at::ScalarType dtype);

// The arguments of masked_sgd_step_: tensors all on `device_type` (and on one device).
// Parameters and momentum buffers must be contiguous (they are written in place) and
// distinct; gradients and masks may have any strides (the kernels copy them when
// needed); truncation is in [0, 1]. The rules of worm_fast/_checks.py, which the
// Python kernels follow.
void check_masked_sgd_args(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers,
                           const c10::List<std::optional<at::Tensor>>& masks, double momentum,
                           double truncation, c10::DeviceType device_type);

// The arguments of masked_adamw_step_: tensors all on `device_type` (and on one
// device): params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad) contiguous,
// of one dtype and size per param; state_steps float32 tensors of one element on the
// params' device; every tensor the step writes distinct; grads and masks of any strides;
// beta1 and beta2 in [0, 1), truncation in [0, 1], truncate "update" or "gradient".
// Returns whether the step truncates the raw gradient (truncate == "gradient").
bool check_masked_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const c10::List<std::optional<at::Tensor>>& masks, double beta1,
                             double beta2, double truncation, bool amsgrad,
                             c10::string_view truncate, c10::DeviceType device_type);

// lr_tensor / grad_scale / found_inf of the op `op` ("worm_fast.masked_sgd_step_"): one
// element, on the parameters' device or the CPU.
void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& like, const char* op);

// truncation_tensor of the step `op`: a scalar tensor as above; one on the CPU is read
// here and must be in [0, 1] (one on the device is read by the kernels, unchecked: the
// optimizers check r when it is set).
void check_truncation_tensor(const std::optional<at::Tensor>& t, const at::Tensor& like,
                             const char* op);

// The data of `t` in contiguous memory: its own, or that of a contiguous copy kept alive
// in `keep_alive` (for gradients and masks, which may have any strides).
const void* contiguous_data(const at::Tensor& t, std::vector<at::Tensor>& keep_alive);

// The packed mask of params[i] as contiguous bytes, or null when it has none.
const uint8_t* mask_data(const c10::List<std::optional<at::Tensor>>& masks, size_t i,
                         std::vector<at::Tensor>& keep_alive);

// The kernels for a sparse tensor among the arguments (SparseCPU, SparseCUDA): the
// argument checks first, so sparse inputs get the same errors on every device, then a
// clear refusal instead of a fall-through to the reference kernel.
template <c10::DeviceType kDevice>
void masked_sgd_step_sparse(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers,
                            const c10::List<std::optional<at::Tensor>>& masks, double, double,
                            double momentum, double, bool, bool, bool, double truncation,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_masked_sgd_args(params, grads, momentum_buffers, masks, momentum, truncation, kDevice);
  TORCH_CHECK(false, "worm_fast.masked_sgd_step_: sparse tensors are not supported");
}

template <c10::DeviceType kDevice>
void masked_adamw_step_sparse(at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                              const c10::List<std::optional<at::Tensor>>& masks, double,
                              double beta1, double beta2, double, double, bool amsgrad, bool,
                              double truncation, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, c10::string_view truncate,
                              const std::optional<at::Tensor>&) {
  check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                          masks, beta1, beta2, truncation, amsgrad, truncate, kDevice);
  TORCH_CHECK(false, "worm_fast.masked_adamw_step_: sparse tensors are not supported");
}

void check_pack_mask_args(const at::Tensor& values, const at::Tensor& threshold);
void check_unpack_mask_args(const at::Tensor& packed, int64_t numel);
void check_hamming_window_args(const at::Tensor& current, const at::Tensor& window);
// soft_mask_distance (and its backward, whose `grad` is one element): values of one
// supported float dtype on one device, the window uint8 [rows >= 1, the tensors' packed
// bytes] on it, thresholds and temperatures one float per tensor, anywhere (`op` names
// the op in the messages).
void check_soft_mask_distance_args(at::TensorList values, const at::Tensor& window,
                                   const at::Tensor& thresholds, const at::Tensor& temperatures,
                                   const char* op);

// magnitude_histogram (worm_fast/_ops.py): the most digit bits of one pass, and the width
// of the magnitude keys of a dtype (31 for float32, 63 for float64, 15 for the 16-bit).
constexpr int64_t kMaxHistogramBits = 18;
int64_t magnitude_key_bits(at::ScalarType dtype);

// One float dtype and one device for all tensors (at least one, strided), on
// `device_type`; lo int64 [1] or [tensors.size()] on their device; 1 <= bits <=
// kMaxHistogramBits, shift >= 0, shift + bits <= the key bits; stride >= 1.
void check_magnitude_histogram_args(at::TensorList tensors, const at::Tensor& lo, int64_t shift,
                                    int64_t bits, int64_t stride, c10::DeviceType device_type);

}  // namespace worm_fast
