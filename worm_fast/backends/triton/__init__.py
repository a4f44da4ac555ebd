"""Triton kernels for CUDA tensors (``kernels.py``), registered as ops in ``ops.py``.

Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the same kernels run
on CPU tensors in Triton's interpreter: slow, but it lets CI without a GPU prove them
against the reference backend.
"""

import torch

from worm_fast.backends import BackendStatus

try:
    from worm_fast.backends.triton import ops  # noqa: F401  (registers the ops)
    from worm_fast.backends.triton.kernels import INTERPRETED

    LOAD_ERROR = None
except ImportError as error:  # no triton: the other backends still work
    LOAD_ERROR = f"triton is not installed ({error})"

__all__ = [
    "hamming_window",
    "magnitude_histogram",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "pack_mask",
    "status",
    "unpack_mask",
]


def status() -> BackendStatus:
    if LOAD_ERROR is not None:
        return BackendStatus("triton", False, LOAD_ERROR, ("cuda",))
    if INTERPRETED:
        reason = "Triton interpreter (TRITON_INTERPRET=1): CPU and CUDA tensors, slowly"
        return BackendStatus("triton", True, reason, ("cpu", "cuda"))
    if torch.cuda.is_available():
        return BackendStatus("triton", True, "Triton kernels on CUDA tensors", ("cuda",))
    reason = "no CUDA device, and TRITON_INTERPRET=1 was not set before triton was imported"
    return BackendStatus("triton", False, reason, ("cuda",))


def pack_mask(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    _require()
    return torch.ops.worm_fast.triton_pack_mask(values, threshold)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    _require()
    return torch.ops.worm_fast.triton_unpack_mask(packed, numel)


def hamming_window(current: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    _require()
    return torch.ops.worm_fast.triton_hamming_window(current, window)


def magnitude_histogram(
    tensors: list[torch.Tensor], lo: torch.Tensor, shift: int, bits: int, stride: int = 1
) -> torch.Tensor:
    _require()
    return torch.ops.worm_fast.triton_magnitude_histogram(tensors, lo, shift, bits, stride)


def masked_sgd_step_(
    params,
    grads,
    momentum_buffers,
    masks,
    *,
    lr,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    is_first_step,
    truncation,
    lr_tensor=None,
    grad_scale=None,
    found_inf=None,
):
    """``reference.masked_sgd_step_`` (same signature), one kernel launch per tensor."""
    _require()
    torch.ops.worm_fast.triton_masked_sgd_step_(
        params,
        grads,
        momentum_buffers,
        masks,
        lr_tensor,
        grad_scale,
        found_inf,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
        truncation=truncation,
    )


def masked_adamw_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    masks,
    *,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad,
    maximize,
    truncation,
    lr_tensor=None,
    grad_scale=None,
    found_inf=None,
):
    """``reference.masked_adamw_step_`` (same signature), one kernel launch per tensor."""
    _require()
    torch.ops.worm_fast.triton_masked_adamw_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        masks,
        lr_tensor,
        grad_scale,
        found_inf,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
        truncation=truncation,
    )


def _require() -> None:
    if LOAD_ERROR is not None:
        raise RuntimeError(f"the triton backend is not available: {LOAD_ERROR}")
