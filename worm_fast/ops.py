"""Public functional ops: validate the inputs, then run the chosen backend's kernel.

Validation happens here, once, before any kernel runs, so bad input raises a clear
error and never leaves parameters or buffers half-updated. ``backend`` is ``None``
(``$WORM_FAST_BACKEND`` or auto), or one of ``worm_fast.backends.NAMES``.
"""

from collections.abc import Sequence

import torch

from worm_fast import _ops
from worm_fast.backends import reference, resolve  # reference: registers default kernels

packed_nbytes = _ops.packed_nbytes

__all__ = [
    "hamming_window",
    "magnitude_histogram",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "pack_mask",
    "packed_nbytes",
    "unpack_mask",
]


def pack_mask(
    values: torch.Tensor, threshold: float | torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Pack ``|values| > threshold`` (flattened row-major) into a uint8 mask, 1 = kept."""
    if not (values.is_floating_point() or values.dtype == torch.bool):
        raise TypeError(f"pack_mask: values must be floating point or bool, got {values.dtype}")
    if values.dtype == torch.bool:
        values = values.to(torch.float32)
    threshold = torch.as_tensor(threshold, device=values.device)
    if threshold.numel() != 1:
        raise ValueError(
            f"pack_mask: threshold must be a scalar, got shape {tuple(threshold.shape)}"
        )
    if threshold.device != values.device:
        raise ValueError(
            f"pack_mask: threshold is on {threshold.device}, values on {values.device}"
        )
    threshold = threshold.reshape(()).to(reference.compute_dtype(values.dtype))
    return resolve(backend, values.device).pack_mask(values, threshold)


def unpack_mask(packed: torch.Tensor, numel: int, *, backend: str | None = None) -> torch.Tensor:
    """The bool mask (1-D, ``numel`` elements) stored in a packed mask."""
    _check_packed(packed, numel, "unpack_mask: packed")
    return resolve(backend, packed.device).unpack_mask(packed, numel)


def hamming_window(
    current: torch.Tensor, window: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Differing bits (int64[l]) between ``current`` [nbytes] and each row of ``window``."""
    if current.dtype != torch.uint8 or window.dtype != torch.uint8:
        raise TypeError(
            f"hamming_window: masks must be uint8, got {current.dtype} and {window.dtype}"
        )
    if current.dim() != 1 or window.dim() != 2 or window.shape[1] != current.numel():
        raise ValueError(
            "hamming_window: expected current [nbytes] and window [l, nbytes], got "
            f"{tuple(current.shape)} and {tuple(window.shape)}"
        )
    if current.numel() % 8:
        raise ValueError(f"hamming_window: nbytes must be a multiple of 8, got {current.numel()}")
    if current.device != window.device:
        raise ValueError(f"hamming_window: current on {current.device}, window on {window.device}")
    return resolve(backend, window.device).hamming_window(current.contiguous(), window.contiguous())


def magnitude_histogram(
    tensors: Sequence[torch.Tensor],
    lo: torch.Tensor,
    shift: int,
    bits: int,
    *,
    stride: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Counts (int64 [rows, 2**bits + 2]) of the magnitude keys of ``tensors`` in the
    window of keys [lo, lo + 2**(shift + bits)): by digit ``(key - lo) >> shift``, then
    the keys below ``lo``, then the NaNs. ``lo`` is int64 [1] (one row for all tensors)
    or [len(tensors)] (a row per tensor), each in [0, 2**key_bits); ``stride`` > 1 counts
    only every stride-th block of 64 elements of each tensor. The exact contract is in
    ``worm_fast._ops``; ``worm_fast.radix_select`` selects exact magnitudes with it.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("magnitude_histogram: expected at least one tensor")
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in _ops.MAGNITUDE_KEYS:
        raise TypeError(
            f"magnitude_histogram: tensors must be float32, float64, float16 or bfloat16, "
            f"got {dtype}"
        )
    for i, tensor in enumerate(tensors):
        if tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"magnitude_histogram: tensors[{i}] is {tensor.dtype} on {tensor.device}, "
                f"tensors[0] is {dtype} on {device} (one dtype and device per call)"
            )
    if lo.dtype != torch.int64 or lo.dim() != 1 or lo.numel() not in (1, len(tensors)):
        raise ValueError(
            f"magnitude_histogram: lo must be int64 of shape [1] or [{len(tensors)}], got "
            f"{lo.dtype}{tuple(lo.shape)}"
        )
    if lo.device != device:
        raise ValueError(f"magnitude_histogram: lo is on {lo.device}, tensors on {device}")
    key_bits = _ops.MAGNITUDE_KEYS[dtype].bits
    if not (1 <= bits <= _ops.MAX_HISTOGRAM_BITS and shift >= 0 and shift + bits <= key_bits):
        raise ValueError(
            f"magnitude_histogram: need 1 <= bits <= {_ops.MAX_HISTOGRAM_BITS}, shift >= 0 "
            f"and shift + bits <= {key_bits} (the key bits of {dtype}), got shift={shift}, "
            f"bits={bits}"
        )
    if stride < 1:
        raise ValueError(f"magnitude_histogram: stride must be >= 1, got {stride}")
    kernel = resolve(backend, device).magnitude_histogram
    return kernel([t.contiguous() for t in tensors], lo, shift, bits, stride)


def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    truncation: float = 1.0,
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One fused SGD step with WORM truncation, in place (formula: ``reference``).

    All tensors must be on one device. ``momentum_buffers`` is empty when
    ``momentum == 0``; ``masks`` is empty or holds one packed mask (or None) per param.
    Non-contiguous parameters or buffers (e.g. channels_last weights) are updated
    through contiguous copies.
    """
    _fused_step(
        "masked_sgd_step_",
        params,
        grads,
        {"momentum buffer": (momentum_buffers, momentum != 0)},
        masks,
        scalars=dict(
            lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
            dampening=float(dampening), nesterov=bool(nesterov), maximize=bool(maximize),
            is_first_step=bool(is_first_step), truncation=float(truncation),
        ),
        tensors=dict(lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf),
        backend=backend,
    )  # fmt: skip


def masked_adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
    truncation: float = 1.0,
    lr_tensor: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One fused AdamW step with WORM truncation, in place (formula: ``reference``).

    ``state_steps`` are float32 scalar tensors on the params' device, incremented here
    (not when ``found_inf`` is set); ``max_exp_avg_sqs`` is empty unless ``amsgrad``.
    """
    _fused_step(
        "masked_adamw_step_",
        params,
        grads,
        {
            "exp_avg": (exp_avgs, True),
            "exp_avg_sq": (exp_avg_sqs, True),
            "max_exp_avg_sq": (max_exp_avg_sqs, amsgrad),
            "step": (state_steps, True),
        },
        masks,
        scalars=dict(
            lr=float(lr), beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(weight_decay), eps=float(eps), amsgrad=bool(amsgrad),
            maximize=bool(maximize), truncation=float(truncation),
        ),
        tensors=dict(lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf),
        backend=backend,
    )  # fmt: skip


def _fused_step(op, params, grads, states, masks, *, scalars, tensors, backend) -> None:
    """Validate a fused optimizer step's inputs, stage strided tensors, run the kernel.

    ``states`` maps a state's name to (its tensors, whether the step uses it); a used
    state has one tensor per param, an unused one none. ``"step"`` holds scalar counters.
    """
    params, grads, masks = list(params), list(grads), list(masks)
    states = {name: (list(tensors_), used) for name, (tensors_, used) in states.items()}
    _check_step_inputs(op, params, grads, states, masks, scalars["truncation"])
    if not params:
        return
    device = params[0].device
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.numel() != 1 or tensor.device != device):
            raise ValueError(
                f"{op}: {name} must be a 1-element tensor on {device}, "
                f"got shape {tuple(tensor.shape)} on {tensor.device}"
            )
    kernel = getattr(resolve(backend, device), op)

    # Kernels need contiguous storage; stage any strided tensor and write it back after.
    originals = params + [t for tensors_, _ in states.values() for t in tensors_]
    staged = [t if t.is_contiguous() else t.contiguous() for t in originals]
    staged_states, at = [], len(params)
    for tensors_, _ in states.values():
        staged_states.append(staged[at : at + len(tensors_)])
        at += len(tensors_)
    kernel(
        staged[: len(params)],
        [g.contiguous() for g in grads],
        *staged_states,
        masks,
        **scalars,
        **{name: None if t is None else t.reshape(1) for name, t in tensors.items()},
    )
    for original, work in zip(originals, staged):
        if work is not original:
            original.copy_(work)


def _check_packed(packed: torch.Tensor, numel: int, what: str) -> None:
    expected = _ops.packed_nbytes(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{what} must be a 1-D uint8 packed mask of {expected} bytes for {numel} "
            f"elements, got {packed.dtype} of shape {tuple(packed.shape)}"
        )


def _check_step_inputs(op, params, grads, states, masks, truncation):
    if not 0.0 <= truncation <= 1.0:
        raise ValueError(f"{op}: truncation must be in [0, 1], got {truncation}")
    if len(grads) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    for name, (tensors, used) in states.items():
        expected = len(params) if used else 0
        if len(tensors) != expected:
            raise ValueError(f"{op}: expected {expected} {name} tensors, got {len(tensors)}")
    if masks and len(masks) != len(params):
        raise ValueError(
            f"{op}: masks must be empty or one per param ({len(params)}), got {len(masks)}"
        )
    device = params[0].device if params else None
    for i, (param, grad) in enumerate(zip(params, grads)):
        if not param.is_floating_point():
            raise TypeError(f"{op}: param {i} must be floating point, got {param.dtype}")
        if grad.is_sparse or param.is_sparse:
            raise RuntimeError(f"{op}: param {i} has a sparse gradient; not supported")
        others = [("grad", grad)]
        for name, (tensors, used) in states.items():
            if used:
                others.append((name, tensors[i]))
        if masks and masks[i] is not None:
            _check_packed(masks[i], param.numel(), f"{op}: mask {i}")
            others.append(("mask", masks[i]))
        for what, tensor in [("param", param), *others]:
            if tensor.device != device:
                raise ValueError(
                    f"{op}: {what} {i} is on {tensor.device}, expected {device} "
                    "(one call per device)"
                )
            if what == "step":
                if tensor.numel() != 1 or tensor.dtype != torch.float32:
                    raise ValueError(
                        f"{op}: step {i} must be a float32 scalar tensor, got "
                        f"{tensor.dtype}{tuple(tensor.shape)}"
                    )
            elif what not in ("param", "mask") and (
                tensor.shape != param.shape or tensor.dtype != param.dtype
            ):
                raise ValueError(
                    f"{op}: {what} {i} is {tensor.dtype}{tuple(tensor.shape)}, "
                    f"param is {param.dtype}{tuple(param.shape)}"
                )
