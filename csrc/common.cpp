#include "worm_fast/common.h"

#include <c10/util/Exception.h>

#include <string>
#include <unordered_map>

namespace worm_fast {

namespace {

constexpr const char* kSgd = "worm_fast.masked_sgd_step_: ";
constexpr const char* kAdamW = "worm_fast.masked_adamw_step_: ";

// params[i] and grads[i]: defined, strided, on `device`, a supported float dtype; the
// param contiguous (it is written in place), the grad of the param's dtype and size.
void check_param_and_grad(const char* op, const at::Tensor& p, const at::Tensor& g, size_t i,
                          const c10::Device& device, c10::DeviceType device_type) {
  TORCH_CHECK(p.defined(), op, "params[", i, "] is undefined");
  TORCH_CHECK(p.layout() == at::kStrided, op, "params[", i, "] must be a strided tensor");
  TORCH_CHECK(p.device().type() == device_type && p.device() == device, op, "params[", i,
              "] is on ", p.device(), ", expected ", device);
  TORCH_CHECK(is_supported_float(p.scalar_type()), op, "params[", i, "] has dtype ",
              p.scalar_type(), ", expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(p.is_contiguous(), op, "params[", i,
              "] must be contiguous (it is updated in place)");

  TORCH_CHECK(g.defined(), op, "grads[", i, "] is undefined");
  TORCH_CHECK(g.layout() == at::kStrided, op, "grads[", i,
              "] is sparse; sparse gradients are not supported");
  TORCH_CHECK(g.device() == device, op, "grads[", i, "] is on ", g.device(), ", expected ",
              device);
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, "grads[", i, "] has dtype ",
              g.scalar_type(), ", expected the dtype of params[", i, "] (", p.scalar_type(),
              ")");
  TORCH_CHECK(g.numel() == p.numel(), op, "grads[", i, "] has ", g.numel(),
              " elements, params[", i, "] has ", p.numel());
}

// An optimizer state of params[i] (`name`[i]), updated in place: like the param.
void check_state(const char* op, const char* name, const at::Tensor& b, size_t i,
                 const at::Tensor& p, const c10::Device& device) {
  TORCH_CHECK(b.defined(), op, name, "[", i, "] is undefined");
  TORCH_CHECK(b.layout() == at::kStrided, op, name, "[", i, "] must be a strided tensor");
  TORCH_CHECK(b.device() == device, op, name, "[", i, "] is on ", b.device(), ", expected ",
              device);
  TORCH_CHECK(b.scalar_type() == p.scalar_type(), op, name, "[", i, "] has dtype ",
              b.scalar_type(), ", expected ", p.scalar_type());
  TORCH_CHECK(b.numel() == p.numel(), op, name, "[", i, "] has ", b.numel(),
              " elements, params[", i, "] has ", p.numel());
  TORCH_CHECK(b.is_contiguous(), op, name, "[", i,
              "] must be contiguous (it is updated in place)");
}

// masks[i], when given: the packed uint8 mask of params[i] (any strides).
void check_mask(const char* op, const c10::List<std::optional<at::Tensor>>& masks, size_t i,
                const at::Tensor& p, const c10::Device& device) {
  if (masks.empty()) {
    return;
  }
  const std::optional<at::Tensor> mask = masks.get(i);
  if (!mask.has_value() || !mask->defined()) {
    return;
  }
  TORCH_CHECK(mask->scalar_type() == at::kByte, op, "masks[", i,
              "] must be a packed uint8 mask, got dtype ", mask->scalar_type());
  TORCH_CHECK(mask->layout() == at::kStrided, op, "masks[", i, "] must be a strided tensor");
  TORCH_CHECK(mask->device() == device, op, "masks[", i, "] is on ", mask->device(),
              ", expected ", device);
  TORCH_CHECK(mask->numel() == packed_nbytes(p.numel()), op, "masks[", i, "] has ",
              mask->numel(), " bytes, expected ", packed_nbytes(p.numel()),
              " (the packed mask of params[", i, "] with ", p.numel(), " elements)");
}

void check_list_sizes(const char* op, size_t n, at::TensorList grads,
                      const c10::List<std::optional<at::Tensor>>& masks) {
  TORCH_CHECK(grads.size() == n, op, "expected one grad per param (", n, "), got ",
              grads.size());
  TORCH_CHECK(masks.empty() || masks.size() == n, op,
              "masks must be empty or have one entry (or None) per param (", n, "), got ",
              masks.size());
}

c10::Device device_of(at::TensorList params, c10::DeviceType device_type) {
  return params[0].defined() ? params[0].device() : c10::Device(device_type);
}

// `value` in [0, 1] (closed) or [0, 1); NaN never is.
void check_fraction(const char* op, const char* name, double value, bool closed) {
  const bool inside = closed ? (value >= 0.0 && value <= 1.0) : (value >= 0.0 && value < 1.0);
  TORCH_CHECK(inside, op, name, " must be >= 0 and ", closed ? "<=" : "<", " 1, got ", value);
}

// The tensors a step writes, by name and index; no two may share memory, or one backend
// would advance a shared buffer or step count twice and another once.
class DistinctOutputs {
 public:
  explicit DistinctOutputs(const char* op) : op_(op) {}
  void add(const char* name, size_t i, const at::Tensor& t) {
    if (t.numel() == 0) {
      return;
    }
    const auto [it, inserted] = seen_.emplace(t.const_data_ptr(), std::make_pair(name, i));
    TORCH_CHECK(inserted, op_, name, "[", i, "] and ", it->second.first, "[", it->second.second,
                "] are the same memory; a step writes each of its params and states once, so "
                "they must be distinct tensors");
  }

 private:
  const char* op_;
  std::unordered_map<const void*, std::pair<const char*, size_t>> seen_;
};

}  // namespace

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

void check_masked_sgd_args(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers,
                           const c10::List<std::optional<at::Tensor>>& masks, double momentum,
                           double truncation, c10::DeviceType device_type) {
  const auto n = params.size();
  check_list_sizes(kSgd, n, grads, masks);
  check_fraction(kSgd, "truncation", truncation, true);
  if (momentum != 0.0) {
    TORCH_CHECK(momentum_buffers.size() == n, kSgd, "momentum=", momentum,
                " needs one momentum buffer per param (", n, "), got ",
                momentum_buffers.size());
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, kSgd,
                "momentum_buffers must be empty or have one entry per param (", n, "), got ",
                momentum_buffers.size());
  }
  if (n == 0) {
    return;
  }
  const c10::Device device = device_of(params, device_type);
  DistinctOutputs written(kSgd);
  for (size_t i = 0; i < n; ++i) {
    check_param_and_grad(kSgd, params[i], grads[i], i, device, device_type);
    written.add("params", i, params[i]);
    if (momentum != 0.0) {
      check_state(kSgd, "momentum_buffers", momentum_buffers[i], i, params[i], device);
      written.add("momentum_buffers", i, momentum_buffers[i]);
    }
    check_mask(kSgd, masks, i, params[i], device);
  }
}

bool check_masked_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const c10::List<std::optional<at::Tensor>>& masks, double beta1,
                             double beta2, double truncation, bool amsgrad,
                             c10::string_view truncate, c10::DeviceType device_type) {
  const auto n = params.size();
  check_list_sizes(kAdamW, n, grads, masks);
  check_fraction(kAdamW, "beta1", beta1, false);
  check_fraction(kAdamW, "beta2", beta2, false);
  check_fraction(kAdamW, "truncation", truncation, true);
  TORCH_CHECK(truncate == "update" || truncate == "gradient", kAdamW,
              "truncate must be 'update' or 'gradient', got '", std::string(truncate), "'");
  const bool truncate_gradient = truncate == "gradient";
  TORCH_CHECK(exp_avgs.size() == n, kAdamW, "expected one exp_avg per param (", n, "), got ",
              exp_avgs.size());
  TORCH_CHECK(exp_avg_sqs.size() == n, kAdamW, "expected one exp_avg_sq per param (", n,
              "), got ", exp_avg_sqs.size());
  TORCH_CHECK(state_steps.size() == n, kAdamW, "expected one state_step per param (", n,
              "), got ", state_steps.size());
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.size() == n, kAdamW,
                "amsgrad=True needs one max_exp_avg_sq per param (", n, "), got ",
                max_exp_avg_sqs.size());
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, kAdamW,
                "max_exp_avg_sqs must be empty or have one entry per param (", n, "), got ",
                max_exp_avg_sqs.size());
  }
  if (n == 0) {
    return truncate_gradient;
  }
  const c10::Device device = device_of(params, device_type);
  DistinctOutputs written(kAdamW);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param_and_grad(kAdamW, p, grads[i], i, device, device_type);
    check_state(kAdamW, "exp_avgs", exp_avgs[i], i, p, device);
    check_state(kAdamW, "exp_avg_sqs", exp_avg_sqs[i], i, p, device);
    written.add("params", i, p);
    written.add("exp_avgs", i, exp_avgs[i]);
    written.add("exp_avg_sqs", i, exp_avg_sqs[i]);
    if (amsgrad) {
      check_state(kAdamW, "max_exp_avg_sqs", max_exp_avg_sqs[i], i, p, device);
      written.add("max_exp_avg_sqs", i, max_exp_avg_sqs[i]);
    }
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined(), kAdamW, "state_steps[", i, "] is undefined");
    TORCH_CHECK(step.layout() == at::kStrided && step.numel() == 1 &&
                    step.scalar_type() == at::kFloat,
                kAdamW, "state_steps[", i, "] must be a float32 tensor of one element, got ",
                step.scalar_type(), " of shape ", step.sizes());
    TORCH_CHECK(step.device() == device, kAdamW, "state_steps[", i, "] is on ", step.device(),
                ", expected ", device, " (the params' device)");
    written.add("state_steps", i, step);
    check_mask(kAdamW, masks, i, p, device);
  }
  return truncate_gradient;
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& like, const char* op) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have exactly one element, got ",
              t->numel());
  TORCH_CHECK(t->device() == like.device() || t->device().is_cpu(), op, ": ", name, " is on ",
              t->device(), ", expected ", like.device(), " (or the CPU)");
}

void check_truncation_tensor(const std::optional<at::Tensor>& t, const at::Tensor& like,
                             const char* op) {
  check_scalar_tensor(t, "truncation_tensor", like, op);
  if (t.has_value() && t->defined() && t->device().is_cpu()) {
    check_fraction(op, ": truncation_tensor", t->item<double>(), true);
  }
}

void check_pack_mask_args(const at::Tensor& values, const at::Tensor& threshold) {
  TORCH_CHECK(values.layout() == at::kStrided,
              "worm_fast.pack_mask: values must be a strided (dense) tensor");
  TORCH_CHECK(!values.is_complex() && !threshold.is_complex(),
              "worm_fast.pack_mask: complex values or thresholds are not supported");
  TORCH_CHECK(threshold.numel() == 1,
              "worm_fast.pack_mask: threshold must have exactly one element, got ",
              threshold.numel());
  TORCH_CHECK(threshold.device() == values.device() || threshold.device().is_cpu(),
              "worm_fast.pack_mask: threshold is on ", threshold.device(), ", values on ",
              values.device());
}

void check_unpack_mask_args(const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK(packed.scalar_type() == at::kByte,
              "worm_fast.unpack_mask: packed must be a uint8 mask, got dtype ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 1, "worm_fast.unpack_mask: packed must be 1-D, got shape ",
              packed.sizes());
  TORCH_CHECK(numel >= 0, "worm_fast.unpack_mask: numel must be >= 0, got ", numel);
  TORCH_CHECK(numel <= packed.numel() * 8, "worm_fast.unpack_mask: numel=", numel,
              " needs at least ", (numel + 7) / 8, " bytes, packed has ", packed.numel());
}

void check_hamming_window_args(const at::Tensor& current, const at::Tensor& window) {
  TORCH_CHECK(current.scalar_type() == at::kByte && window.scalar_type() == at::kByte,
              "worm_fast.hamming_window: expected packed uint8 masks, got current ",
              current.scalar_type(), " and window ", window.scalar_type());
  TORCH_CHECK(current.dim() == 1, "worm_fast.hamming_window: current must be 1-D [nbytes], got ",
              current.sizes());
  TORCH_CHECK(window.dim() == 2,
              "worm_fast.hamming_window: window must be 2-D [l, nbytes], got ", window.sizes());
  TORCH_CHECK(window.size(1) == current.size(0), "worm_fast.hamming_window: window rows have ",
              window.size(1), " bytes, current has ", current.size(0));
  TORCH_CHECK(current.device() == window.device(), "worm_fast.hamming_window: current is on ",
              current.device(), ", window on ", window.device());
}

void check_soft_mask_distance_args(at::TensorList values, const at::Tensor& window,
                                   const at::Tensor& thresholds, const at::Tensor& temperatures,
                                   const char* op) {
  TORCH_CHECK(!values.empty(), op, ": values must hold at least one tensor");
  const at::Tensor& first = values[0];
  TORCH_CHECK(is_supported_float(first.scalar_type()), op,
              ": values must be float32, float64, float16 or bfloat16, got ",
              first.scalar_type());
  int64_t nbytes = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor& v = values[i];
    TORCH_CHECK(v.layout() == at::kStrided, op, ": values[", i, "] must be a strided tensor");
    TORCH_CHECK(v.scalar_type() == first.scalar_type() && v.device() == first.device(), op,
                ": values must share one dtype and device; values[", i, "] is ",
                v.scalar_type(), " on ", v.device(), ", values[0] ", first.scalar_type(), " on ",
                first.device());
    nbytes += packed_nbytes(v.numel());
  }
  TORCH_CHECK(window.scalar_type() == at::kByte && window.dim() == 2, op,
              ": window must be a 2-D uint8 tensor [rows, nbytes], got ", window.scalar_type(),
              " of shape ", window.sizes());
  TORCH_CHECK(window.size(0) >= 1, op, ": the window holds no mask (0 rows)");
  TORCH_CHECK(window.size(1) == nbytes, op, ": window rows have ", window.size(1),
              " bytes, the packed masks of the values take ", nbytes);
  TORCH_CHECK(window.device() == first.device(), op, ": window is on ", window.device(),
              ", values on ", first.device());
  for (const at::Tensor* t : {&thresholds, &temperatures}) {
    const char* name = t == &thresholds ? "thresholds" : "temperatures";
    TORCH_CHECK(t->is_floating_point() && t->dim() == 1 &&
                    t->numel() == static_cast<int64_t>(values.size()),
                op, ": ", name, " must be a 1-D float tensor of ", values.size(),
                " elements (one per tensor), got ", t->scalar_type(), " of shape ", t->sizes());
    TORCH_CHECK(t->device() == first.device() || t->device().is_cpu(), op, ": ", name,
                " is on ", t->device(), ", values on ", first.device());
  }
}

int64_t magnitude_key_bits(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return 31;
    case at::kDouble:
      return 63;
    case at::kHalf:
    case at::kBFloat16:
      return 15;
    default:
      TORCH_CHECK(false, "worm_fast.magnitude_histogram: tensors must be float32, float64, ",
                  "float16 or bfloat16, got ", dtype);
  }
}

void check_magnitude_histogram_args(at::TensorList tensors, const at::Tensor& lo, int64_t shift,
                                    int64_t bits, int64_t stride, c10::DeviceType device_type) {
  constexpr const char* op = "worm_fast.magnitude_histogram: ";
  TORCH_CHECK(!tensors.empty(), op, "expected at least one tensor");
  const at::Tensor& first = tensors[0];
  const int64_t key_bits = magnitude_key_bits(first.scalar_type());
  TORCH_CHECK(first.device().type() == device_type, op, "tensors[0] is on ", first.device());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, op, "tensors[", i, "] must be a strided tensor");
    TORCH_CHECK(t.scalar_type() == first.scalar_type() && t.device() == first.device(), op,
                "tensors[", i, "] is ", t.scalar_type(), " on ", t.device(), ", tensors[0] is ",
                first.scalar_type(), " on ", first.device(), " (one dtype and device per call)");
  }
  TORCH_CHECK(lo.scalar_type() == at::kLong && lo.dim() == 1 &&
                  (lo.numel() == 1 || lo.numel() == static_cast<int64_t>(tensors.size())),
              op, "lo must be int64 of shape [1] or [", tensors.size(), "], got ",
              lo.scalar_type(), " of shape ", lo.sizes());
  TORCH_CHECK(lo.device() == first.device(), op, "lo is on ", lo.device(), ", tensors on ",
              first.device());
  TORCH_CHECK(bits >= 1 && bits <= kMaxHistogramBits && shift >= 0 && shift + bits <= key_bits,
              op, "need 1 <= bits <= ", kMaxHistogramBits, ", shift >= 0 and shift + bits <= ",
              key_bits, " (the key bits of ", first.scalar_type(), "), got shift=", shift,
              ", bits=", bits);
  TORCH_CHECK(stride >= 1, op, "stride must be >= 1, got ", stride);
}

const void* contiguous_data(const at::Tensor& t, std::vector<at::Tensor>& keep_alive) {
  if (t.is_contiguous()) {
    return t.const_data_ptr();
  }
  keep_alive.push_back(t.contiguous());
  return keep_alive.back().const_data_ptr();
}

const uint8_t* mask_data(const c10::List<std::optional<at::Tensor>>& masks, size_t i,
                         std::vector<at::Tensor>& keep_alive) {
  if (masks.empty()) {
    return nullptr;
  }
  const std::optional<at::Tensor> m = masks.get(i);
  if (!m.has_value() || !m->defined()) {
    return nullptr;
  }
  return static_cast<const uint8_t*>(contiguous_data(*m, keep_alive));
}

}  // namespace worm_fast
