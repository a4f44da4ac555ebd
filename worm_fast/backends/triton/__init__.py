"""Triton kernels for CUDA tensors (``kernels.py``), registered as ops in ``ops.py``.

Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the same kernels run
on CPU tensors in Triton's interpreter: slow, but it lets CI without a GPU prove them
against the reference backend.
"""

from collections.abc import Callable

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


def _kernel(name: str) -> Callable:
    """The op ``worm_fast::triton_<name>``: the signature of ``backends.reference.<name>``
    (its optional scalar tensors may be passed by keyword, as every caller does), or,
    without triton, a function that says why it cannot run."""
    if LOAD_ERROR is None:
        return getattr(torch.ops.worm_fast, f"triton_{name}")

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"the triton backend is not available: {LOAD_ERROR}")

    return unavailable


pack_mask = _kernel("pack_mask")
unpack_mask = _kernel("unpack_mask")
magnitude_histogram = _kernel("magnitude_histogram")
hamming_window = _kernel("hamming_window")
masked_sgd_step_ = _kernel("masked_sgd_step_")
masked_adamw_step_ = _kernel("masked_adamw_step_")
soft_mask_distance = _kernel("soft_mask_distance")  # differentiable: its backward is a Triton op
