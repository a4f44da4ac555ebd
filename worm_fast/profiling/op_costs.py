"""FLOPs and bytes moved by worm_fast's ops, and per step of its optimizers.

Each op gets a FLOP formula, registered with ``torch.utils.flop_counter`` so that a
``FlopCounterMode`` around a training step counts the ops too, and a bytes-moved formula,
since the optimizer steps and the mask ops are memory-bound: their bytes, not their
FLOPs, set their time. Every elementwise arithmetic operation, comparison or select
counts as one operation (a "FLOP"); integer bit operations on packed masks count the
same way. Scalars (lr, threshold, grad scale, found_inf) are left out of the bytes.
Model FLOPs are counted in ``profiling.flops``.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

from worm_fast._ops import packed_nbytes

_ops = torch.ops.worm_fast


@dataclass(frozen=True)
class OpCost:
    """Operations and bytes moved by some op calls; adds and scales (``cost * steps``)."""

    flops: int = 0
    bytes: int = 0

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, times: int) -> "OpCost":
        return OpCost(self.flops * times, self.bytes * times)

    __rmul__ = __mul__


def sgd_flops_per_element(
    *,
    momentum: float,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    masked: bool = False,
    grad_scaled: bool = False,
    is_first_step: bool = False,
) -> int:
    """Operations per element of one masked SGD step (the formula in DESIGN §3.3)."""
    flops = 2  # p - lr * g
    if grad_scaled:
        flops += 1  # g / grad_scale
    if masked:
        flops += 2  # factor = kept ? 1 : r (a select on the mask bit), g * factor
    if maximize:
        flops += 1  # -g
    if weight_decay != 0:
        flops += 2  # g + weight_decay * p
    if momentum != 0:
        if not is_first_step:  # the first step copies g into the buffer
            flops += 3  # momentum * b + (1 - dampening) * g
        if nesterov:
            flops += 2  # g + momentum * b
    return flops


def adamw_flops_per_element(
    *,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    masked: bool = False,
    grad_scaled: bool = False,
) -> int:
    """Operations per element of one masked AdamW step (``backends.reference``)."""
    # m lerp 2, v = b2 v + (1 - b2) g^2: 3, sqrt 1, / sqrt(bc2) 1, + eps 1, m / denom 1,
    # p - step_size * update 2.
    flops = 11
    if weight_decay != 0:
        flops += 1  # p * (1 - lr * wd)
    if amsgrad:
        flops += 1  # max(v_max, v)
    if masked:
        flops += 2  # factor = kept ? 1 : r, update * factor
    if grad_scaled:
        flops += 1
    if maximize:
        flops += 1
    return flops


def _mask_bytes(numel: int) -> int:
    # The bits a kernel reads, not the word padding after them.
    return math.ceil(numel / 8)


@register_flop_formula(_ops.masked_sgd_step_)
def _masked_sgd_step_flop(
    params,
    grads,
    momentum_buffers,
    masks,
    *,
    weight_decay,
    momentum,
    nesterov,
    maximize,
    is_first_step,
    grad_scale=None,
    out_shape=None,
    **unused,
) -> int:
    total = 0
    for i, shape in enumerate(params):
        per_element = sgd_flops_per_element(
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            masked=bool(masks) and masks[i] is not None,
            grad_scaled=grad_scale is not None,
            is_first_step=is_first_step,
        )
        total += math.prod(shape) * per_element
    return total


@register_flop_formula(_ops.masked_adamw_step_)
def _masked_adamw_step_flop(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *,
    weight_decay, amsgrad, maximize, grad_scale=None, out_shape=None, **unused,
) -> int:  # fmt: skip
    return sum(
        math.prod(shape)
        * adamw_flops_per_element(
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            masked=bool(masks) and masks[i] is not None,
            grad_scaled=grad_scale is not None,
        )
        for i, shape in enumerate(params)
    )


@register_flop_formula(_ops.pack_mask)
def _pack_mask_flop(values, threshold, *, out_shape=None) -> int:
    return 2 * math.prod(values)  # |w|, compare with the threshold


@register_flop_formula(_ops.unpack_mask)
def _unpack_mask_flop(packed, numel, *, out_shape=None) -> int:
    return 2 * numel  # shift, and


@register_flop_formula(_ops.hamming_window)
def _hamming_window_flop(current, window, *, out_shape=None) -> int:
    # One xor and one popcount per byte of each window row; a word-wise kernel issues
    # fewer instructions, but the count stays independent of the machine.
    rows, nbytes = window
    return 2 * rows * nbytes


# soft_mask_distance, per element: |v| - t, / tau, exp, + 1, reciprocal, then kept +
# s * (rows - 2 kept) (4); its backward: the soft mask (5), sign, s (1 - s) (2), and
# four products. Each window row adds a shift-and and an add per element.
_SOFT_MASK_FLOPS = 9
_SOFT_MASK_BACKWARD_FLOPS = 12


@register_flop_formula(_ops.soft_mask_distance)
def _soft_mask_distance_flop(values, window, thresholds, temperatures, *, out_shape=None) -> int:
    numel = sum(math.prod(shape) for shape in values)
    return numel * (_SOFT_MASK_FLOPS + 2 * window[0])


@register_flop_formula(_ops.soft_mask_distance_backward)
def _soft_mask_distance_backward_flop(
    grad, values, window, thresholds, temperatures, *, out_shape=None
) -> int:
    numel = sum(math.prod(shape) for shape in values)
    return numel * (_SOFT_MASK_BACKWARD_FLOPS + 2 * window[0])


def _masked_sgd_step_bytes(
    params, grads, momentum_buffers, masks, *, momentum, is_first_step, **unused
) -> int:
    total = 0
    for i, (param, grad) in enumerate(zip(params, grads)):
        p = param.numel() * param.element_size()
        total += 2 * p + grad.numel() * grad.element_size()  # read p, g; write p
        if momentum != 0:
            buf = momentum_buffers[i].numel() * momentum_buffers[i].element_size()
            total += buf if is_first_step else 2 * buf  # (read and) write the buffer
        if masks and masks[i] is not None:
            total += _mask_bytes(param.numel())
    return total


def _masked_adamw_step_bytes(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *, amsgrad,
    **unused,
) -> int:  # fmt: skip
    total = 0
    for i, (param, grad) in enumerate(zip(params, grads)):
        states = 3 if amsgrad else 2  # m, v (, v_max): each read and written
        total += param.numel() * param.element_size() * (2 + 2 * states)  # p read, written
        total += grad.numel() * grad.element_size()
        if masks and masks[i] is not None:
            total += _mask_bytes(param.numel())
    return total


def _pack_mask_bytes(values, threshold) -> int:
    return values.numel() * values.element_size() + packed_nbytes(values.numel())


def _unpack_mask_bytes(packed, numel) -> int:
    return _mask_bytes(numel) + numel  # one bool byte out per bit in


def _hamming_window_bytes(current, window) -> int:
    rows = window.shape[0]
    return window.numel() + current.numel() + rows * 8  # int64 counts out


def _soft_mask_distance_bytes(values, window, thresholds, temperatures) -> int:
    # Each value read once, each window byte once (8 elements share a byte).
    return sum(v.numel() * v.element_size() for v in values) + window.numel()


def _soft_mask_distance_backward_bytes(grad, values, window, thresholds, temperatures) -> int:
    # The forward's reads, and a gradient written per value.
    return _soft_mask_distance_bytes(values, window, thresholds, temperatures) + sum(
        v.numel() * v.element_size() for v in values
    )


_BYTES = {
    _ops.masked_sgd_step_: _masked_sgd_step_bytes,
    _ops.masked_adamw_step_: _masked_adamw_step_bytes,
    _ops.pack_mask: _pack_mask_bytes,
    _ops.unpack_mask: _unpack_mask_bytes,
    _ops.hamming_window: _hamming_window_bytes,
    _ops.soft_mask_distance: _soft_mask_distance_bytes,
    _ops.soft_mask_distance_backward: _soft_mask_distance_backward_bytes,
}
_FLOPS = {
    _ops.masked_sgd_step_: _masked_sgd_step_flop,
    _ops.masked_adamw_step_: _masked_adamw_step_flop,
    _ops.pack_mask: _pack_mask_flop,
    _ops.unpack_mask: _unpack_mask_flop,
    _ops.hamming_window: _hamming_window_flop,
    _ops.soft_mask_distance: _soft_mask_distance_flop,
    _ops.soft_mask_distance_backward: _soft_mask_distance_backward_flop,
}


def _packet(op):
    packet = getattr(op, "_overloadpacket", op)
    if packet not in _BYTES:
        names = ", ".join(str(known) for known in _BYTES)
        raise ValueError(f"no cost formula for {op}; known ops: {names}")
    return packet


def bytes_moved(op, *args, **kwargs) -> int:
    """Bytes one call of the worm_fast ``op`` reads and writes, given that call's arguments.

    Tensors may be on the meta device, so a cost can be computed without data.
    """
    return _BYTES[_packet(op)](*args, **kwargs)


def op_cost(op, *args, **kwargs) -> OpCost:
    """FLOPs (the formula ``FlopCounterMode`` uses) and bytes of one call of ``op``."""
    packet = _packet(op)
    return OpCost(_FLOPS[packet](*args, **kwargs), _BYTES[packet](*args, **kwargs))


# ------------------------------------------------------------- per-step conveniences


def sgd_step_cost(
    params: Iterable[torch.Tensor],
    *,
    momentum: float,
    masked_numel: int,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scaled: bool = False,
) -> OpCost:
    """FLOPs and bytes of one steady-state WormSGD step over ``params``.

    ``masked_numel`` elements (the representative parameters) carry a mask and are
    truncated; gradients are taken to have their parameter's dtype.
    """
    params = list(params)
    numel = sum(p.numel() for p in params)
    if not 0 <= masked_numel <= numel:
        raise ValueError(
            f"masked_numel must be in [0, {numel}] (the params' size), got {masked_numel}"
        )
    hyper = dict(
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        grad_scaled=grad_scaled,
    )
    flops = numel * sgd_flops_per_element(**hyper) + masked_numel * (
        sgd_flops_per_element(**hyper, masked=True) - sgd_flops_per_element(**hyper)
    )
    # Per element: read p and g, write p; with momentum also read and write the buffer.
    tensor_passes = 5 if momentum != 0 else 3
    data = sum(p.numel() * p.element_size() * tensor_passes for p in params)
    return OpCost(flops, data + _mask_bytes(masked_numel))


def adamw_step_cost(
    params: Iterable[torch.Tensor],
    *,
    masked_numel: int,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scaled: bool = False,
) -> OpCost:
    """FLOPs and bytes of one WormAdamW step over ``params`` (``masked_numel`` truncated)."""
    params = list(params)
    numel = sum(p.numel() for p in params)
    if not 0 <= masked_numel <= numel:
        raise ValueError(
            f"masked_numel must be in [0, {numel}] (the params' size), got {masked_numel}"
        )
    hyper = dict(weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                 grad_scaled=grad_scaled)  # fmt: skip
    flops = numel * adamw_flops_per_element(**hyper) + masked_numel * 2
    # Per element: read p and g, write p; read and write each moment.
    tensor_passes = 3 + (6 if amsgrad else 4)
    data = sum(p.numel() * p.element_size() * tensor_passes for p in params)
    return OpCost(flops, data + _mask_bytes(masked_numel))


def mask_check_cost(
    masked_numel: int, *, window: int, dtype: torch.dtype = torch.float32
) -> OpCost:
    """FLOPs and bytes of one Early-Bird check's mask ops over ``masked_numel`` values:
    packing the new mask, and its Hamming distances to the ``window - 1`` older ones.

    The threshold selection (a sort or k-th value in aten) is not included.
    """
    values = torch.empty(masked_numel, dtype=dtype, device="meta")
    packed = torch.empty(packed_nbytes(masked_numel), dtype=torch.uint8, device="meta")
    older = torch.empty(max(window - 1, 0), packed.numel(), dtype=torch.uint8, device="meta")
    threshold = torch.empty((), dtype=dtype, device="meta")
    return op_cost(_ops.pack_mask, values, threshold) + op_cost(_ops.hamming_window, packed, older)


def penalty_step_cost(
    masked_numel: int, *, rows: int, dtype: torch.dtype = torch.float32
) -> OpCost:
    """FLOPs and bytes of WORM-gradient's penalty in one training step: the forward and
    backward of ``soft_mask_distance`` over ``masked_numel`` values and ``rows`` masks.

    The threshold selection and the spread of ``|w|`` (aten) are not included.
    """
    values = [torch.empty(masked_numel, dtype=dtype, device="meta")]
    window = torch.empty(rows, packed_nbytes(masked_numel), dtype=torch.uint8, device="meta")
    constants = torch.empty(1, device="meta")
    shapes = ([values[0].shape], window.shape, constants.shape, constants.shape)
    flops = _soft_mask_distance_flop(*shapes) + _soft_mask_distance_backward_flop((), *shapes)
    data = _soft_mask_distance_bytes(values, window, constants, constants)
    data += _soft_mask_distance_backward_bytes(None, values, window, constants, constants)
    return OpCost(flops, data)


__all__ = [
    "OpCost",
    "adamw_flops_per_element",
    "adamw_step_cost",
    "bytes_moved",
    "mask_check_cost",
    "op_cost",
    "penalty_step_cost",
    "sgd_flops_per_element",
    "sgd_step_cost",
]
