// The CPU inner loops of worm_fast, behind a torch-free interface.
//
// csrc/cpu/kernels_impl.h holds the loops once, as templates over the storage type and
// the SGD variant; csrc/cpu/kernels_{default,avx2,avx512}.cpp compile them for one
// instruction set each (no torch header in those files, so nothing compiled for a
// wider ISA can leak into code that runs elsewhere). csrc/cpu/ops.cpp validates the
// tensors, splits the work across threads and calls the table that matches the CPU
// capability torch itself runs at (`torch.backends.cpu.get_cpu_capability()`,
// overridable with ATEN_CPU_CAPABILITY).
#pragma once

#include <cstdint>

#include "worm_fast/scalar_kind.h"

namespace worm_fast::cpu {

using ::worm_fast::ScalarKind;

// Hyperparameters of one masked SGD step, already resolved on the host (lr from the lr
// tensor, grad_scale = 1 when absent). See worm_fast/backends/reference.py.
struct SgdConfig {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
  double truncation;
  double grad_scale;
  bool nesterov;
  bool maximize;
  bool is_first_step;
};

// One tensor of the step. buf is null when momentum == 0; mask is null when the tensor
// has no truncation mask (packed, DESIGN §3.1, padded to whole 64-bit words).
struct SgdTensor {
  void* param;
  const void* grad;
  void* buf;
  const uint8_t* mask;
  int64_t numel;
  ScalarKind kind;
};

// Hyperparameters of one masked AdamW step, resolved on the host (lr from the lr tensor,
// grad_scale = 1 when absent). See worm_fast/backends/reference.py.
struct AdamConfig {
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
};

// One tensor of the AdamW step. max_exp_avg_sq is null unless amsgrad; mask is null when
// the tensor is not truncated. step_size (lr / (1 - beta1^t)) and bias_correction2_sqrt
// (sqrt(1 - beta2^t)) are this tensor's, computed once in double from its step count t.
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  const uint8_t* mask;
  int64_t numel;
  ScalarKind kind;
  double step_size;
  double bias_correction2_sqrt;
};

// One tensor of soft_mask_distance: its values and, in row 0 of the packed window, the
// first byte of its segment (whole 64-bit words, rows `row_stride` bytes apart).
struct SoftMaskTensor {
  const void* values;
  ScalarKind kind;
  const uint8_t* window;
  int64_t row_stride;
  int64_t rows;
  int64_t numel;
  double threshold;
  double temperature;
};

// One pass of magnitude_histogram (see worm_fast/_ops.py): the window of magnitude keys
// [lo, lo + 2^(shift + bits)) in 2^bits digits; only the blocks of 64 elements whose
// index is a multiple of `stride` count.
struct HistogramPass {
  uint64_t lo;
  int shift;
  int bits;
  int64_t stride;
};

struct KernelTable {
  const char* isa;
  // Elements [begin, end) of one tensor; begin is a multiple of 64.
  void (*sgd_range)(const SgdTensor& t, const SgdConfig& c, int64_t begin, int64_t end);
  // Elements [begin, end) of one tensor; begin is a multiple of 64.
  void (*adamw_range)(const AdamTensor& t, const AdamConfig& c, int64_t begin, int64_t end);
  // Packed words [word_begin, word_end) of kept = |values| > threshold, over `numel`
  // values (words past the end are written as zero).
  void (*pack_range)(const void* values, ScalarKind kind, double threshold, int64_t numel,
                     uint64_t* out, int64_t word_begin, int64_t word_end);
  // Bools [begin, end) of an unpacked mask; begin is a multiple of 8.
  void (*unpack_range)(const uint8_t* packed, bool* out, int64_t begin, int64_t end);
  // acc[r] += differing bits between current and row r over bytes [byte_begin,
  // byte_end); rows are `row_stride` bytes apart. Any alignment.
  void (*hamming_range)(const uint8_t* current, const uint8_t* window, int64_t row_stride,
                        int64_t rows, int64_t byte_begin, int64_t byte_end, int64_t* acc);
  // Elements [begin, end) of one tensor (begin a multiple of 64): counts[d] += keys of
  // digit d in the window, *below += keys under lo, *nans += NaNs (never in a digit).
  void (*histogram_range)(const void* values, ScalarKind kind, const HistogramPass& pass,
                          int64_t begin, int64_t end, uint32_t* counts, int64_t* below,
                          int64_t* nans);
  // The sum over elements [begin, end) (begin a multiple of 64) and the window's rows of
  // |sigmoid((|v| - threshold) / temperature) - bit|.
  double (*soft_mask_distance_range)(const SoftMaskTensor& t, int64_t begin, int64_t end);
  // grad[i] = scale * sign(v) s (1 - s) / temperature * (rows - 2 kept_i) over elements
  // [begin, end) (begin a multiple of 64), stored in the values' dtype.
  void (*soft_mask_distance_grad_range)(const SoftMaskTensor& t, double scale, void* grad,
                                        int64_t begin, int64_t end);
};

const KernelTable& kernels_default();
const KernelTable& kernels_avx2();    // AVX2 + FMA + F16C + POPCNT
const KernelTable& kernels_avx512();  // AVX-512 F/BW/VL/DQ + the above

// The table the CPU ops use (chosen once, from torch's CPU capability and the CPU).
const KernelTable& selected_kernels();

}  // namespace worm_fast::cpu
