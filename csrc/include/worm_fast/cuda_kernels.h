// The CUDA kernels of worm_fast, behind a torch-free launch interface.
//
// csrc/cuda/*.cu hold the kernels and these launchers and include only CUDA and light
// c10 headers, so nvcc compiles them in seconds; csrc/cuda/ops.cpp (host compiler)
// validates the tensors, resolves the device scalars and registers the ops for the
// CUDA dispatch key. Every launcher enqueues on `stream` and never synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "worm_fast/scalar_kind.h"

namespace worm_fast::cuda {

// One tensor of the SGD step: buf is null when momentum == 0, mask null when the tensor
// is not truncated. param, grad and buf are contiguous, of the step's dtype.
struct SgdTensor {
  void* param;
  const void* grad;
  void* buf;
  const uint8_t* mask;
  int64_t numel;
};

// Hyperparameters of one step. The *_device pointers, when not null, override the
// host values and are read by the kernel: lr_device and grad_scale_device point to one
// element of the compute dtype (float, or double for float64 parameters),
// found_inf_device to a float32 flag that skips the whole step when nonzero, and
// truncation_device to r as a double.
struct SgdStep {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
  double truncation;
  double grad_scale;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  const void* lr_device;
  const void* grad_scale_device;
  const float* found_inf_device;
  const double* truncation_device;
};

// All `count` tensors (of one dtype, `kind`) in as few launches as the tensor-list
// limits allow.
void launch_masked_sgd(ScalarKind kind, const SgdTensor* tensors, int64_t count,
                       const SgdStep& step, cudaStream_t stream);

// One tensor of the AdamW step: max_exp_avg_sq is null unless amsgrad, mask null when
// the tensor is not truncated. param, grad and the states are contiguous, of the step's
// dtype; step points to the tensor's float32 step count on the device (read by the
// kernel, then incremented by the launcher's last kernel).
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  const uint8_t* mask;
  float* step;
  int64_t numel;
};

// Hyperparameters of one AdamW step; the *_device pointers as in SgdStep.
struct AdamStep {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  double truncation;
  double grad_scale;
  bool amsgrad;
  bool maximize;
  bool truncate_gradient;  // truncation scales the raw gradient, not the Adam update
  const void* lr_device;
  const void* grad_scale_device;
  const float* found_inf_device;
  const double* truncation_device;
};

// All `count` tensors (of one dtype, `kind`; empty ones too, whose step counts still
// advance): the update in as few launches as the tensor-list limits allow, then one
// small kernel per 384 tensors that increments the step counts (unless found_inf), so
// every block reads the count of before the step.
void launch_masked_adamw(ScalarKind kind, const AdamTensor* tensors, int64_t count,
                         const AdamStep& step, cudaStream_t stream);

// kept = |values| > threshold over `numel` contiguous values, into `words` 64-bit words
// (the packed layout of DESIGN §3.1, padding bits zero). threshold_device (compute dtype)
// overrides threshold_host when not null.
void launch_pack_mask(ScalarKind kind, const void* values, int64_t numel,
                      const void* threshold_device, double threshold_host, uint64_t* out,
                      int64_t words, cudaStream_t stream);

void launch_unpack_mask(const uint8_t* packed, bool* out, int64_t numel, cudaStream_t stream);

// out[r] += differing bits between current [nbytes] and row r of window [rows, nbytes]
// (both contiguous); `out` must be zeroed first.
void launch_hamming_window(const uint8_t* current, const uint8_t* window, int64_t rows,
                           int64_t nbytes, int64_t* out, cudaStream_t stream);

// One tensor of soft_mask_distance: `numel` contiguous values, `window` the first byte
// of its segment in row 0 of the packed window (rows `row_stride` bytes apart), and
// `threshold` / `temperature` device arrays of the compute dtype, read at `index`.
struct SoftMaskArgs {
  const void* values;
  int64_t numel;
  const uint8_t* window;
  int64_t row_stride;
  int64_t rows;
  const void* threshold;
  const void* temperature;
  int64_t index;
};

// The partial sums (one per block) launch_soft_mask_distance writes for `numel` values.
int64_t soft_mask_distance_blocks(int64_t numel);

// partial[b] (compute dtype) = block b's sum of |sigmoid((|v| - t) / tau) - bit| over its
// elements and the rows.
void launch_soft_mask_distance(ScalarKind kind, const SoftMaskArgs& args, void* partial,
                               cudaStream_t stream);

// grad = scale * sign(v) s (1 - s) / tau * (rows - 2 kept), in the values' dtype;
// `scale` is one device element of the compute dtype.
void launch_soft_mask_distance_backward(ScalarKind kind, const SoftMaskArgs& args,
                                        const void* scale, void* grad, cudaStream_t stream);

// magnitude_histogram over one contiguous tensor of `numel` values into `counts` (its row:
// 2^bits digits, the keys below the window, the NaNs; int64, zeroed first), the window
// start read from the device (`lo`, one int64).
void launch_magnitude_histogram(ScalarKind kind, const void* values, int64_t numel,
                                const int64_t* lo, int shift, int bits, int64_t stride,
                                int64_t* counts, cudaStream_t stream);

}  // namespace worm_fast::cuda
