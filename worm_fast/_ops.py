"""Schemas and fake (meta) implementations of every worm_fast op.

This module is the single place that declares the ops. Backends register kernels for
them: ``backends.reference`` as the default (any device), the compiled extension
``worm_fast._C`` for CPU (and CUDA when built with a toolkit), and the Triton backend
as ``triton_*`` twins declared through ``torch.library.triton_op``.

The schemas live in Python rather than in the C++ ``TORCH_LIBRARY`` block so that the
ops exist, and work on the reference kernels, even when the extension is not built.
Each op's argument contract is in ``worm_fast._checks``; the fake kernels check it too,
since a meta tensor among real ones dispatches to them.
"""

from dataclasses import dataclass

import torch

from worm_fast import _checks
from worm_fast._checks import WORD_BITS, packed_nbytes  # noqa: F401  (re-exported)

NAMESPACE = "worm_fast"


@dataclass(frozen=True)
class MagnitudeKey:
    """How magnitude_histogram reads a float dtype: the bits of ``|x|`` (the sign bit
    cleared) as an unsigned integer of ``bits`` bits, which orders like ``|x|``:
    +0 = -0 < subnormals < normals < inf (key ``inf``) < NaN (every larger key)."""

    bits: int
    storage: torch.dtype  # the signed integer dtype of the same width, to view the data
    inf: int


MAGNITUDE_KEYS = {
    torch.float32: MagnitudeKey(31, torch.int32, 0x7F80_0000),
    torch.float64: MagnitudeKey(63, torch.int64, 0x7FF0_0000_0000_0000),
    torch.float16: MagnitudeKey(15, torch.int16, 0x7C00),
    torch.bfloat16: MagnitudeKey(15, torch.int16, 0x7F80),
}

# magnitude_histogram: the most digit bits one pass may count (2**18 + 2 int64 counts per
# row), and the elements per block of its sampling stride.
MAX_HISTOGRAM_BITS = 18
SAMPLE_BLOCK = 64


_SCHEMAS = {
    # kept = |values| > threshold; values flattened row-major; threshold a 0-d tensor.
    "pack_mask": "(Tensor values, Tensor threshold) -> Tensor",
    # The bool mask of the first `numel` bits of a packed mask.
    "unpack_mask": "(Tensor packed, SymInt numel) -> Tensor",
    # Differing bits between `current` [nbytes] and each row of `window` [l, nbytes].
    "hamming_window": "(Tensor current, Tensor window) -> Tensor",
    # Counts of the magnitude keys (the bits of |x| as an unsigned integer; they sort like
    # |x|) of `tensors` (one float dtype), as int64 [rows, 2**bits + 2]: column d < 2**bits
    # counts keys with lo[r] <= key and (key - lo[r]) >> shift == d (the window
    # [lo, lo + 2**(shift + bits)) in 2**bits digits), column 2**bits the keys below lo[r],
    # column 2**bits + 1 the NaNs. lo is int64 [1] (one row over all tensors) or
    # [len(tensors)] (row i counts tensors[i]). With stride s > 1 only the elements of
    # every s-th block of SAMPLE_BLOCK in each tensor count (a sample). See radix_select.
    "magnitude_histogram": (
        "(Tensor[] tensors, Tensor lo, int shift, int bits, int stride=1) -> Tensor"
    ),
    # One fused SGD step over a list of tensors, in place on params and momentum
    # buffers. `masks` is empty or has one entry per param (None = no truncation).
    # `lr_tensor` and `truncation_tensor`, when given, replace `lr` and `truncation`: read
    # where they live, so neither syncs nor is a constant of a torch.compile graph.
    "masked_sgd_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, "
        "Tensor(b!)[] momentum_buffers, Tensor?[] masks, *, float lr, "
        "float weight_decay, float momentum, float dampening, bool nesterov, "
        "bool maximize, bool is_first_step, float truncation, "
        "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
        "Tensor? truncation_tensor=None) -> ()"
    ),
    # One fused AdamW step (decoupled weight decay); increments the float32 `state_steps`.
    # Truncation scales the Adam update of pruned elements (truncate="update") or their
    # raw gradient (truncate="gradient"); see backends.reference.
    "masked_adamw_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
        "Tensor?[] masks, *, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, bool amsgrad, bool maximize, float truncation, Tensor? lr_tensor=None, "
        'Tensor? grad_scale=None, Tensor? found_inf=None, str truncate="update", '
        "Tensor? truncation_tensor=None) -> ()"
    ),
    # WORM-gradient's mask distance: the mean over the rows of `window` [l, nbytes] and the
    # elements of `values` of |sigmoid((|v| - thresholds[k]) / temperatures[k]) - bit|, v an
    # element of values[k] and bit its bit in the row. A row is a MaskWindow row: the
    # packed masks of the tensors one after the other, each padded to whole words.
    # Differentiable in `values` (thresholds and temperatures are constants).
    "soft_mask_distance": (
        "(Tensor[] values, Tensor window, Tensor thresholds, Tensor temperatures) -> Tensor"
    ),
    # Its gradient with respect to each of `values`, given the output's gradient `grad`.
    "soft_mask_distance_backward": (
        "(Tensor grad, Tensor[] values, Tensor window, Tensor thresholds, "
        "Tensor temperatures) -> Tensor[]"
    ),
}

# Every op, by name: each backend implements them all (``backends.reference`` is the oracle).
OP_NAMES = tuple(_SCHEMAS)

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{NAMESPACE}::{_name}", _schema)


# Fake kernels: the op's checks (a meta tensor among real ones dispatches here), then
# outputs of the right shape.
@torch.library.register_fake(f"{NAMESPACE}::pack_mask")
def _pack_mask_fake(values, threshold):
    _checks.check_pack_mask(values, threshold)
    return values.new_empty(packed_nbytes(values.numel()), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::unpack_mask")
def _unpack_mask_fake(packed, numel):
    _checks.check_unpack_mask(packed, numel)
    return packed.new_empty(numel, dtype=torch.bool)


@torch.library.register_fake(f"{NAMESPACE}::hamming_window")
def _hamming_window_fake(current, window):
    _checks.check_hamming_window(current, window)
    return window.new_empty(window.shape[0], dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::magnitude_histogram")
def _magnitude_histogram_fake(tensors, lo, shift, bits, stride=1):
    _checks.check_magnitude_histogram(tensors, lo, shift, bits, stride)
    return lo.new_empty(lo.shape[0], (1 << bits) + 2, dtype=torch.int64)


# The steps return nothing: their fakes check the arguments; the schema's (a!) marks say
# which lists are written, which is what torch.compile's functionalization reads.
@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_step_")
def _masked_sgd_step_fake(
    params, grads, momentum_buffers, masks, *, momentum, truncation, lr_tensor=None,
    grad_scale=None, found_inf=None, truncation_tensor=None, **hyperparameters,
):  # fmt: skip
    _checks.check_sgd_step(
        params, grads, momentum_buffers, masks, momentum=momentum, truncation=truncation,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        fake=True,
    )  # fmt: skip


@torch.library.register_fake(f"{NAMESPACE}::masked_adamw_step_")
def _masked_adamw_step_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *, beta1,
    beta2, amsgrad, truncation, lr_tensor=None, grad_scale=None, found_inf=None,
    truncate="update", truncation_tensor=None, **hyperparameters,
):  # fmt: skip
    _checks.check_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks,
        beta1=beta1, beta2=beta2, amsgrad=amsgrad, truncation=truncation, truncate=truncate,
        scalars=dict(
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
            truncation_tensor=truncation_tensor,
        ),
        fake=True,
    )  # fmt: skip


@torch.library.register_fake(f"{NAMESPACE}::soft_mask_distance")
def _soft_mask_distance_fake(values, window, thresholds, temperatures):
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures)
    # The compute dtype of the values: fp64 for fp64, else fp32 (reference.compute_dtype).
    return window.new_empty(
        (), dtype=torch.float64 if values[0].dtype == torch.float64 else torch.float32
    )


@torch.library.register_fake(f"{NAMESPACE}::soft_mask_distance_backward")
def _soft_mask_distance_backward_fake(grad, values, window, thresholds, temperatures):
    _checks.check_soft_mask_distance(values, window, thresholds, temperatures, grad)
    return [torch.empty_like(v, memory_format=torch.contiguous_format) for v in values]


def soft_mask_distance_autograd(backward_op) -> tuple:
    """``(backward, setup_context)`` for a soft_mask_distance op whose gradient comes from
    ``backward_op`` (a soft_mask_distance_backward op, which reads the packed window)."""

    def setup_context(ctx, inputs, output):
        values, window, thresholds, temperatures = inputs
        ctx.save_for_backward(window, thresholds, temperatures, *values)

    def backward(ctx, grad):
        window, thresholds, temperatures, *values = ctx.saved_tensors
        grads = backward_op(grad, values, window, thresholds, temperatures)
        return list(grads), None, None, None

    return backward, setup_context


# The backward is itself an op that reads the packed window: one kernel per backend.
_backward, _setup_context = soft_mask_distance_autograd(
    torch.ops.worm_fast.soft_mask_distance_backward
)
torch.library.register_autograd(
    f"{NAMESPACE}::soft_mask_distance", _backward, setup_context=_setup_context
)
