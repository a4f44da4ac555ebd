"""The compiled extension ``worm_fast._C``: C++ kernels for CPU tensors.

Importing ``_C`` registers its kernels for the ops of ``worm_fast._ops`` with the
dispatcher, so the functions here are plain calls to ``torch.ops.worm_fast``.
"""

import torch

from worm_fast.backends import BackendStatus

try:
    from worm_fast import _C  # noqa: F401  (import registers the kernels)

    LOAD_ERROR = None
except ImportError as error:  # the package still works on the reference backend
    LOAD_ERROR = f"worm_fast._C is not built ({error}); build it with `pip install -e .`"

_OPS = (
    "pack_mask",
    "unpack_mask",
    "hamming_window",
    "magnitude_histogram",
    "masked_sgd_step_",
    "masked_adamw_step_",
)


def missing_kernels(dispatch_key: str) -> list[str]:
    """The ops ``_C`` has no ``dispatch_key`` (CPU, CUDA) kernel for; calls to them fall
    through to the reference kernel, registered for every device."""
    return [
        op
        for op in _OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", dispatch_key)
    ]


def describe(dispatch_key: str, what: str) -> str:
    missing = missing_kernels(dispatch_key)
    return what + (f" (reference kernels for: {', '.join(missing)})" if missing else "")


def status() -> BackendStatus:
    if LOAD_ERROR is not None:
        return BackendStatus("cpp", False, LOAD_ERROR, ("cpu",))
    reason = describe("CPU", "C++ kernels, multi-threaded over CPU tensors")
    return BackendStatus("cpp", True, reason, ("cpu",))


pack_mask = torch.ops.worm_fast.pack_mask
unpack_mask = torch.ops.worm_fast.unpack_mask
hamming_window = torch.ops.worm_fast.hamming_window
magnitude_histogram = torch.ops.worm_fast.magnitude_histogram
masked_sgd_step_ = torch.ops.worm_fast.masked_sgd_step_
masked_adamw_step_ = torch.ops.worm_fast.masked_adamw_step_
