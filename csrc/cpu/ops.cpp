// CPU kernels of the worm_fast ops: argument checks, work split across threads, and the
// call into the inner loops of the instruction set this CPU runs (cpu_kernels.h).
//
// Semantics are those of worm_fast/backends/reference.py, line for line.

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "worm_fast/common.h"
#include "worm_fast/cpu_kernels.h"

namespace worm_fast::cpu {

const KernelTable& selected_kernels() {
  static const KernelTable* table = [] {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    // Follow torch's own choice (so ATEN_CPU_CAPABILITY=avx2/default applies to us too),
    // and never pick an ISA the CPU lacks.
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2")
#if !defined(__clang__)
                          && __builtin_cpu_supports("f16c")
#endif
        ;
    const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                            __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512dq");
    if (capability == "AVX512" && has_avx512) {
      return &kernels_avx512();
    }
    if ((capability == "AVX512" || capability == "AVX2") && has_avx2) {
      return &kernels_avx2();
    }
#endif
    return &kernels_default();
  }();
  return *table;
}

namespace {

constexpr const char* kSgdOp = "worm_fast.masked_sgd_step_";
constexpr const char* kAdamWOp = "worm_fast.masked_adamw_step_";

// The value of an optional scalar tensor (lr_tensor, grad_scale, truncation_tensor),
// read on the host, or `otherwise` when it is not given.
double host_value(const std::optional<at::Tensor>& t, double otherwise) {
  return t.has_value() && t->defined() ? t->item<double>() : otherwise;
}

// Elements per work item of the SGD step (a multiple of 64, so items start on mask
// words). Items of all tensors go into one list that the threads split evenly, so a
// small tensor never costs a parallel region of its own.
constexpr int64_t kSgdChunk = 16384;
// Below this many elements in total the step runs on the calling thread.
constexpr int64_t kSgdSerialBelow = 32768;
// The same for the AdamW step (a multiple of 64); it does more work per element, so it
// goes parallel sooner.
constexpr int64_t kAdamChunk = 16384;
constexpr int64_t kAdamSerialBelow = 16384;
// Packed words per task of pack_mask (64 values each), bytes per task of unpack_mask.
constexpr int64_t kPackGrainWords = 1024;
constexpr int64_t kUnpackGrainBytes = 8192;
// Bytes per task of hamming_window (a multiple of 8).
constexpr int64_t kHammingChunkBytes = 1 << 16;
// Elements per work item of magnitude_histogram (a multiple of 64); below this many
// elements in all, the calling thread counts them.
constexpr int64_t kHistogramChunk = 1 << 16;
constexpr int64_t kHistogramSerialBelow = 1 << 16;

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

at::Tensor pack_mask_cpu(const at::Tensor& values, const at::Tensor& threshold) {
  check_pack_mask_args(values, threshold);
  TORCH_CHECK(values.device().is_cpu(), "worm_fast.pack_mask (CPU): values are on ",
              values.device());
  // Non-float values compare in float32, as the reference does.
  const at::Tensor v = is_supported_float(values.scalar_type())
                           ? values.contiguous()
                           : values.contiguous().to(at::kFloat);
  const double thr = threshold.item<double>();  // rounded to the compute dtype below
  const int64_t numel = v.numel();
  const int64_t nbytes = packed_nbytes(numel);
  at::Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  auto* words = reinterpret_cast<uint64_t*>(out.data_ptr<uint8_t>());
  const void* data = v.const_data_ptr();
  const ScalarKind kind = kind_of(v.scalar_type());
  const KernelTable& k = selected_kernels();
  at::parallel_for(0, nbytes / 8, kPackGrainWords, [&](int64_t begin, int64_t end) {
    k.pack_range(data, kind, thr, numel, words, begin, end);
  });
  return out;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, c10::SymInt numel_sym) {
  const int64_t numel = numel_sym.guard_int(__FILE__, __LINE__);
  check_unpack_mask_args(packed, numel);
  const at::Tensor p = packed.contiguous();
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  const uint8_t* src = p.const_data_ptr<uint8_t>();
  bool* dst = out.data_ptr<bool>();
  const KernelTable& k = selected_kernels();
  at::parallel_for(0, (numel + 7) / 8, kUnpackGrainBytes, [&](int64_t begin, int64_t end) {
    k.unpack_range(src, dst, begin * 8, std::min(end * 8, numel));
  });
  return out;
}

at::Tensor hamming_window_cpu(const at::Tensor& current, const at::Tensor& window) {
  check_hamming_window_args(current, window);
  const int64_t rows = window.size(0);
  const int64_t nbytes = window.size(1);
  at::Tensor out = at::zeros({rows}, at::TensorOptions().dtype(at::kLong).device(at::kCPU));
  if (rows == 0 || nbytes == 0) {
    return out;
  }
  const at::Tensor cur = current.contiguous();
  const at::Tensor win = window.contiguous();
  const int64_t chunks = (nbytes + kHammingChunkBytes - 1) / kHammingChunkBytes;
  // One row of partial sums per chunk, summed on this thread: no atomics, no sharing.
  std::vector<int64_t> partial(chunks * rows, 0);
  const uint8_t* c = cur.const_data_ptr<uint8_t>();
  const uint8_t* w = win.const_data_ptr<uint8_t>();
  const KernelTable& k = selected_kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t lo = i * kHammingChunkBytes;
      const int64_t hi = std::min(nbytes, lo + kHammingChunkBytes);
      k.hamming_range(c, w, nbytes, rows, lo, hi, partial.data() + i * rows);
    }
  });
  int64_t* result = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < chunks; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      result[r] += partial[i * rows + r];
    }
  }
  return out;
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Appends the work items of tensor `index`: its `numel` elements, `chunk` per item.
void add_work_items(std::vector<WorkItem>& items, int64_t index, int64_t numel, int64_t chunk) {
  for (int64_t begin = 0; begin < numel; begin += chunk) {
    items.push_back({index, begin, std::min(numel, begin + chunk)});
  }
}

// Calls range(item) for every item: on this thread when the step has fewer than
// `serial_below` elements in all, else with the items split evenly across torch's threads.
template <class Range>
void run_work_items(const std::vector<WorkItem>& items, int64_t total, int64_t serial_below,
                    const Range& range) {
  const auto run = [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      range(items[j]);
    }
  };
  const auto count = static_cast<int64_t>(items.size());
  if (total < serial_below) {
    run(0, count);
  } else {
    at::parallel_for(0, count, 1, run);
  }
}

// Each thread counts into uint32 digits for the row (tensor, or all tensors) it is on,
// and adds them to the int64 result under a lock when it moves to another row, before a
// digit could overflow, and when it is done: the result is the same for any split.
at::Tensor magnitude_histogram_cpu(at::TensorList tensors, const at::Tensor& lo, int64_t shift,
                                   int64_t bits, int64_t stride) {
  check_magnitude_histogram_args(tensors, lo, shift, bits, stride, c10::DeviceType::CPU);
  const int64_t rows = lo.numel();
  const int64_t digits = int64_t{1} << bits;
  at::Tensor out =
      at::zeros({rows, digits + 2}, at::TensorOptions().dtype(at::kLong).device(at::kCPU));
  const at::Tensor starts = lo.contiguous();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided tensors
  std::vector<const void*> data(tensors.size());
  std::vector<WorkItem> items;
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t numel = tensors[i].numel();
    if (numel > 0) {
      data[i] = contiguous_data(tensors[i], keep_alive);
      add_work_items(items, static_cast<int64_t>(i), numel, kHistogramChunk);
      total += numel;
    }
  }
  const ScalarKind kind = kind_of(tensors[0].scalar_type());
  int64_t* result = out.data_ptr<int64_t>();
  std::mutex result_lock;
  const KernelTable& k = selected_kernels();
  const auto count = [&](int64_t first, int64_t last) {
    thread_local std::vector<uint32_t> counts;  // kept between calls: no page faults
    counts.assign(digits, 0);
    int64_t row = -1;
    int64_t below = 0;
    int64_t nans = 0;
    int64_t pending = 0;  // elements counted since the last flush
    const auto flush = [&] {
      if (pending == 0) {
        return;
      }
      const std::lock_guard<std::mutex> guard(result_lock);
      int64_t* r = result + row * (digits + 2);
      for (int64_t d = 0; d < digits; ++d) {
        r[d] += counts[d];
      }
      r[digits] += below;
      r[digits + 1] += nans;
      std::fill(counts.begin(), counts.end(), 0u);
      below = nans = pending = 0;
    };
    for (int64_t j = first; j < last; ++j) {
      const WorkItem& item = items[j];
      const int64_t item_row = rows == 1 ? 0 : item.tensor;
      const int64_t size = item.end - item.begin;
      if (item_row != row || pending + size > std::numeric_limits<uint32_t>::max()) {
        flush();
        row = item_row;
      }
      pending += size;
      const HistogramPass pass{static_cast<uint64_t>(start[row]), static_cast<int>(shift),
                               static_cast<int>(bits), stride};
      k.histogram_range(data[item.tensor], kind, pass, item.begin, item.end, counts.data(),
                        &below, &nans);
    }
    flush();
  };
  const auto count_items = static_cast<int64_t>(items.size());
  if (total < kHistogramSerialBelow) {
    count(0, count_items);
  } else {
    at::parallel_for(0, count_items, 1, count);
  }
  return out;
}

void masked_sgd_step_cpu(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers,
                         const c10::List<std::optional<at::Tensor>>& masks, double lr,
                         double weight_decay, double momentum, double dampening, bool nesterov,
                         bool maximize, bool is_first_step, double truncation,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& truncation_tensor) {
  check_masked_sgd_args(params, grads, momentum_buffers, masks, momentum, truncation,
                        c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  check_scalar_tensor(lr_tensor, "lr_tensor", params[0], kSgdOp);
  check_scalar_tensor(grad_scale, "grad_scale", params[0], kSgdOp);
  check_scalar_tensor(found_inf, "found_inf", params[0], kSgdOp);
  check_truncation_tensor(truncation_tensor, params[0], kSgdOp);
  // A step with an inf/NaN gradient (GradScaler) changes nothing.
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) {
    return;
  }
  const SgdConfig config{
      host_value(lr_tensor, lr),
      weight_decay,
      momentum,
      dampening,
      host_value(truncation_tensor, truncation),
      host_value(grad_scale, 1.0),
      nesterov,
      maximize,
      is_first_step};

  const size_t n = params.size();
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided grads / masks
  std::vector<SgdTensor> tensors;
  std::vector<WorkItem> items;
  tensors.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    if (numel == 0) {
      continue;
    }
    void* buf = momentum != 0.0 ? momentum_buffers[i].data_ptr() : nullptr;
    add_work_items(items, static_cast<int64_t>(tensors.size()), numel, kSgdChunk);
    tensors.push_back({p.data_ptr(), contiguous_data(grads[i], keep_alive), buf,
                       mask_data(masks, i, keep_alive), numel, kind_of(p.scalar_type())});
    total += numel;
  }

  const KernelTable& k = selected_kernels();
  run_work_items(items, total, kSgdSerialBelow, [&](const WorkItem& item) {
    k.sgd_range(tensors[item.tensor], config, item.begin, item.end);
  });
}

void masked_adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps,
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
                              c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  check_scalar_tensor(lr_tensor, "lr_tensor", params[0], kAdamWOp);
  check_scalar_tensor(grad_scale, "grad_scale", params[0], kAdamWOp);
  check_scalar_tensor(found_inf, "found_inf", params[0], kAdamWOp);
  check_truncation_tensor(truncation_tensor, params[0], kAdamWOp);
  // A step with an inf/NaN gradient (GradScaler) changes nothing, step counts included.
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) {
    return;
  }
  const AdamConfig config{
      host_value(lr_tensor, lr),
      beta1,
      beta2,
      weight_decay,
      eps,
      host_value(truncation_tensor, truncation),
      host_value(grad_scale, 1.0),
      amsgrad,
      maximize,
      truncate_gradient};

  const size_t n = params.size();
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided grads / masks
  std::vector<AdamTensor> tensors;
  std::vector<WorkItem> items;
  std::vector<float*> steps(n);
  std::vector<float> new_steps(n);
  tensors.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    // t = step + 1 in float32 (the counter's dtype), then the bias corrections in double,
    // as torch.optim.AdamW computes them from step.item().
    steps[i] = state_steps[i].data_ptr<float>();
    new_steps[i] = *steps[i] + 1.0f;
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    if (numel == 0) {
      continue;
    }
    const double t = new_steps[i];
    const double bias_correction1 = 1.0 - std::pow(beta1, t);
    const double bias_correction2 = 1.0 - std::pow(beta2, t);
    add_work_items(items, static_cast<int64_t>(tensors.size()), numel, kAdamChunk);
    tensors.push_back({p.data_ptr(), contiguous_data(grads[i], keep_alive),
                       exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                       amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                       mask_data(masks, i, keep_alive), numel, kind_of(p.scalar_type()),
                       config.lr / bias_correction1, std::sqrt(bias_correction2)});
    total += numel;
  }

  const KernelTable& k = selected_kernels();
  run_work_items(items, total, kAdamSerialBelow, [&](const WorkItem& item) {
    k.adamw_range(tensors[item.tensor], config, item.begin, item.end);
  });
  for (size_t i = 0; i < n; ++i) {
    *steps[i] = new_steps[i];
  }
}

constexpr const char* kSoftMaskOp = "worm_fast.soft_mask_distance";
constexpr const char* kSoftMaskBackwardOp = "worm_fast.soft_mask_distance_backward";
// Elements per work item of soft_mask_distance (a multiple of 64), and below how many
// in all it runs on the calling thread.
constexpr int64_t kSoftMaskChunk = 16384;
constexpr int64_t kSoftMaskSerialBelow = 32768;

// The tensors of a soft_mask_distance call, each with its segment of the window, and
// the work items over all of them. Non-contiguous values are staged in `keep_alive`.
struct SoftMaskWork {
  std::vector<at::Tensor> keep_alive;
  std::vector<SoftMaskTensor> tensors;
  std::vector<WorkItem> items;
  int64_t numel = 0;

  SoftMaskWork(at::TensorList values, const at::Tensor& window, const at::Tensor& thresholds,
               const at::Tensor& temperatures, const char* op) {
    check_soft_mask_distance_args(values, window, thresholds, temperatures, op);
    TORCH_CHECK(window.device().is_cpu(), op, " (CPU): window is on ", window.device());
    const at::Tensor win = window.contiguous();
    keep_alive.push_back(win);
    const at::Tensor t = thresholds.to(at::kCPU, at::kDouble).contiguous();
    const at::Tensor tau = temperatures.to(at::kCPU, at::kDouble).contiguous();
    const uint8_t* row0 = win.const_data_ptr<uint8_t>();
    int64_t offset = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      const int64_t n = values[i].numel();
      add_work_items(items, static_cast<int64_t>(i), n, kSoftMaskChunk);
      tensors.push_back({contiguous_data(values[i], keep_alive), kind_of(values[i].scalar_type()),
                         row0 + offset, win.size(1), win.size(0), n,
                         t.const_data_ptr<double>()[i], tau.const_data_ptr<double>()[i]});
      offset += packed_nbytes(n);
      numel += n;
    }
    TORCH_CHECK(numel > 0, op, ": values hold no elements");
  }
};

at::Tensor soft_mask_distance_cpu(at::TensorList values, const at::Tensor& window,
                                  const at::Tensor& thresholds, const at::Tensor& temperatures) {
  const SoftMaskWork work(values, window, thresholds, temperatures, kSoftMaskOp);
  // One partial sum per work item, added in order: the result does not depend on threads.
  std::vector<double> partial(work.items.size(), 0.0);
  const KernelTable& k = selected_kernels();
  run_work_items(work.items, work.numel, kSoftMaskSerialBelow, [&](const WorkItem& item) {
    partial[&item - work.items.data()] =
        k.soft_mask_distance_range(work.tensors[item.tensor], item.begin, item.end);
  });
  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  const at::ScalarType dtype =
      values[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(total / (static_cast<double>(window.size(0)) * work.numel),
                           at::TensorOptions().dtype(dtype).device(at::kCPU));
}

std::vector<at::Tensor> soft_mask_distance_backward_cpu(const at::Tensor& grad,
                                                        at::TensorList values,
                                                        const at::Tensor& window,
                                                        const at::Tensor& thresholds,
                                                        const at::Tensor& temperatures) {
  const SoftMaskWork work(values, window, thresholds, temperatures, kSoftMaskBackwardOp);
  TORCH_CHECK(grad.numel() == 1 && grad.device().is_cpu(), kSoftMaskBackwardOp,
              ": grad must be one element on the CPU, got shape ", grad.sizes(), " on ",
              grad.device());
  const double scale = grad.item<double>() / (static_cast<double>(window.size(0)) * work.numel);
  std::vector<at::Tensor> grads;
  grads.reserve(values.size());
  for (const at::Tensor& v : values) {
    grads.push_back(at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  const KernelTable& k = selected_kernels();
  run_work_items(work.items, work.numel, kSoftMaskSerialBelow, [&](const WorkItem& item) {
    k.soft_mask_distance_grad_range(work.tensors[item.tensor], scale,
                                    grads[item.tensor].data_ptr(), item.begin, item.end);
  });
  return grads;
}

}  // namespace
}  // namespace worm_fast::cpu

TORCH_LIBRARY_IMPL(worm_fast, SparseCPU, m) {
  m.impl("masked_sgd_step_", &worm_fast::masked_sgd_step_sparse<c10::DeviceType::CPU>);
  m.impl("masked_adamw_step_", &worm_fast::masked_adamw_step_sparse<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(worm_fast, CPU, m) {
  m.impl("pack_mask", &worm_fast::cpu::pack_mask_cpu);
  m.impl("unpack_mask", &worm_fast::cpu::unpack_mask_cpu);
  m.impl("hamming_window", &worm_fast::cpu::hamming_window_cpu);
  m.impl("magnitude_histogram", &worm_fast::cpu::magnitude_histogram_cpu);
  m.impl("masked_sgd_step_", &worm_fast::cpu::masked_sgd_step_cpu);
  m.impl("masked_adamw_step_", &worm_fast::cpu::masked_adamw_step_cpu);
  m.impl("soft_mask_distance", &worm_fast::cpu::soft_mask_distance_cpu);
  m.impl("soft_mask_distance_backward", &worm_fast::cpu::soft_mask_distance_backward_cpu);
}
