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
    params, grads, momentum_buffers, masks = (
        list(params),
        list(grads),
        list(momentum_buffers),
        list(masks),
    )
    _check_sgd_inputs(params, grads, momentum_buffers, masks, momentum, truncation)
    if not params:
        return
    device = params[0].device
    for name, tensor in (
        ("lr_tensor", lr_tensor),
        ("grad_scale", grad_scale),
        ("found_inf", found_inf),
    ):
        if tensor is not None and (tensor.numel() != 1 or tensor.device != device):
            raise ValueError(
                f"masked_sgd_step_: {name} must be a 1-element tensor on {device}, "
                f"got shape {tuple(tensor.shape)} on {tensor.device}"
            )
    kernel = resolve(backend, device).masked_sgd_step_

    # Kernels need contiguous storage; stage any strided tensor and write it back after.
    work_params = [p if p.is_contiguous() else p.contiguous() for p in params]
    work_buffers = [b if b.is_contiguous() else b.contiguous() for b in momentum_buffers]
    kernel(
        work_params,
        [g.contiguous() for g in grads],
        work_buffers,
        masks,
        lr=float(lr),
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        dampening=float(dampening),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        is_first_step=bool(is_first_step),
        truncation=float(truncation),
        lr_tensor=None if lr_tensor is None else lr_tensor.reshape(1),
        grad_scale=None if grad_scale is None else grad_scale.reshape(1),
        found_inf=None if found_inf is None else found_inf.reshape(1),
    )
    for original, work in zip(params + momentum_buffers, work_params + work_buffers):
        if work is not original:
            original.copy_(work)


def _check_packed(packed: torch.Tensor, numel: int, what: str) -> None:
    expected = _ops.packed_nbytes(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{what} must be a 1-D uint8 packed mask of {expected} bytes for {numel} "
            f"elements, got {packed.dtype} of shape {tuple(packed.shape)}"
        )


def _check_sgd_inputs(params, grads, momentum_buffers, masks, momentum, truncation):
    if not 0.0 <= truncation <= 1.0:
        raise ValueError(f"masked_sgd_step_: truncation must be in [0, 1], got {truncation}")
    if len(grads) != len(params):
        raise ValueError(f"masked_sgd_step_: {len(params)} params but {len(grads)} grads")
    expected_buffers = len(params) if momentum != 0 else 0
    if len(momentum_buffers) != expected_buffers:
        raise ValueError(
            f"masked_sgd_step_: expected {expected_buffers} momentum buffers "
            f"(momentum={momentum}), got {len(momentum_buffers)}"
        )
    if masks and len(masks) != len(params):
        raise ValueError(
            f"masked_sgd_step_: masks must be empty or one per param ({len(params)}), "
            f"got {len(masks)}"
        )
    device = params[0].device if params else None
    for i, (param, grad) in enumerate(zip(params, grads)):
        if not param.is_floating_point():
            raise TypeError(
                f"masked_sgd_step_: param {i} must be floating point, got {param.dtype}"
            )
        if grad.is_sparse or param.is_sparse:
            raise RuntimeError(f"masked_sgd_step_: param {i} has a sparse gradient; not supported")
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise ValueError(
                f"masked_sgd_step_: grad {i} is {grad.dtype}{tuple(grad.shape)}, "
                f"param is {param.dtype}{tuple(param.shape)}"
            )
        others = [("grad", grad)]
        if momentum_buffers:
            buf = momentum_buffers[i]
            if buf.shape != param.shape or buf.dtype != param.dtype:
                raise ValueError(
                    f"masked_sgd_step_: momentum buffer {i} is {buf.dtype}{tuple(buf.shape)}, "
                    f"param is {param.dtype}{tuple(param.shape)}"
                )
            others.append(("momentum buffer", buf))
        if masks and masks[i] is not None:
            _check_packed(masks[i], param.numel(), f"masked_sgd_step_: mask {i}")
            others.append(("mask", masks[i]))
        for what, tensor in [("param", param), *others]:
            if tensor.device != device:
                raise ValueError(
                    f"masked_sgd_step_: {what} {i} is on {tensor.device}, expected {device} "
                    "(one call per device)"
                )
