#include "worm_fast/common.h"

#include <c10/util/Exception.h>

namespace worm_fast {

namespace {

constexpr const char* kSgd = "worm_fast.masked_sgd_step_: ";

}  // namespace

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

void check_masked_sgd_args(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers,
                           const c10::List<std::optional<at::Tensor>>& masks, double momentum,
                           c10::DeviceType device_type) {
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n, kSgd, "expected one grad per param (", n, "), got ",
              grads.size());
  if (momentum != 0.0) {
    TORCH_CHECK(momentum_buffers.size() == n, kSgd, "momentum=", momentum,
                " needs one momentum buffer per param (", n, "), got ",
                momentum_buffers.size());
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, kSgd,
                "momentum_buffers must be empty or have one entry per param (", n, "), got ",
                momentum_buffers.size());
  }
  TORCH_CHECK(masks.empty() || masks.size() == n, kSgd,
              "masks must be empty or have one entry (or None) per param (", n, "), got ",
              masks.size());
  if (n == 0) {
    return;
  }
  const c10::Device device = params[0].defined() ? params[0].device() : c10::Device(device_type);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), kSgd, "params[", i, "] is undefined");
    TORCH_CHECK(p.layout() == at::kStrided, kSgd, "params[", i, "] must be a strided tensor");
    TORCH_CHECK(p.device().type() == device_type && p.device() == device, kSgd, "params[", i,
                "] is on ", p.device(), ", expected ", device);
    TORCH_CHECK(is_supported_float(p.scalar_type()), kSgd, "params[", i, "] has dtype ",
                p.scalar_type(), ", expected float32, float64, float16 or bfloat16");
    TORCH_CHECK(p.is_contiguous(), kSgd, "params[", i,
                "] must be contiguous (it is updated in place)");

    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), kSgd, "grads[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided, kSgd, "grads[", i,
                "] is sparse; sparse gradients are not supported");
    TORCH_CHECK(g.device() == device, kSgd, "grads[", i, "] is on ", g.device(), ", expected ",
                device);
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), kSgd, "grads[", i, "] has dtype ",
                g.scalar_type(), ", expected the dtype of params[", i, "] (", p.scalar_type(),
                ")");
    TORCH_CHECK(g.numel() == p.numel(), kSgd, "grads[", i, "] has ", g.numel(),
                " elements, params[", i, "] has ", p.numel());

    if (momentum != 0.0) {
      const at::Tensor& b = momentum_buffers[i];
      TORCH_CHECK(b.defined(), kSgd, "momentum_buffers[", i, "] is undefined");
      TORCH_CHECK(b.layout() == at::kStrided, kSgd, "momentum_buffers[", i,
                  "] must be a strided tensor");
      TORCH_CHECK(b.device() == device, kSgd, "momentum_buffers[", i, "] is on ", b.device(),
                  ", expected ", device);
      TORCH_CHECK(b.scalar_type() == p.scalar_type(), kSgd, "momentum_buffers[", i,
                  "] has dtype ", b.scalar_type(), ", expected ", p.scalar_type());
      TORCH_CHECK(b.numel() == p.numel(), kSgd, "momentum_buffers[", i, "] has ", b.numel(),
                  " elements, params[", i, "] has ", p.numel());
      TORCH_CHECK(b.is_contiguous(), kSgd, "momentum_buffers[", i,
                  "] must be contiguous (it is updated in place)");
    }

    if (!masks.empty()) {
      const std::optional<at::Tensor> mask = masks.get(i);
      if (mask.has_value() && mask->defined()) {
        TORCH_CHECK(mask->scalar_type() == at::kByte, kSgd, "masks[", i,
                    "] must be a packed uint8 mask, got dtype ", mask->scalar_type());
        TORCH_CHECK(mask->layout() == at::kStrided, kSgd, "masks[", i,
                    "] must be a strided tensor");
        TORCH_CHECK(mask->device() == device, kSgd, "masks[", i, "] is on ", mask->device(),
                    ", expected ", device);
        TORCH_CHECK(mask->numel() == packed_nbytes(p.numel()), kSgd, "masks[", i, "] has ",
                    mask->numel(), " bytes, expected ", packed_nbytes(p.numel()),
                    " (the packed mask of params[", i, "] with ", p.numel(), " elements)");
      }
    }
  }
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  TORCH_CHECK(t->numel() == 1, kSgd, name, " must have exactly one element, got ",
              t->numel());
  TORCH_CHECK(t->device() == like.device() || t->device().is_cpu(), kSgd, name, " is on ",
              t->device(), ", expected ", like.device(), " (or the CPU)");
}

void check_pack_mask_args(const at::Tensor& values, const at::Tensor& threshold) {
  TORCH_CHECK(values.layout() == at::kStrided,
              "worm_fast.pack_mask: values must be a strided (dense) tensor");
  TORCH_CHECK(!values.is_complex(), "worm_fast.pack_mask: complex values are not supported");
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

}  // namespace worm_fast
