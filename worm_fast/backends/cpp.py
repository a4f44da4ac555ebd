"""The compiled extension ``worm_fast._C``: C++ kernels for CPU tensors.

Importing ``_C`` registers its kernels for the ops of ``worm_fast._ops`` with the
dispatcher, so the functions here are plain calls to ``torch.ops.worm_fast``.
"""

import importlib.util

import torch

from worm_fast._ops import OP_NAMES
from worm_fast.backends import BackendStatus

BUILD_HINT = "build it with `pip install -e .` (or `python setup.py build_ext --inplace`)"


def load_error_reason(error: ImportError) -> str:
    """Why ``_C`` is unusable. A missing file surfaces as "cannot import name '_C' from
    partially initialized module (most likely due to a circular import)", which says
    nothing about the cause: say it is not built."""
    if importlib.util.find_spec("worm_fast._C") is None:
        return f"worm_fast._C is not built; {BUILD_HINT}"
    return f"worm_fast._C is built but does not load ({error}); rebuild it: {BUILD_HINT}"


try:
    from worm_fast import _C  # noqa: F401  (import registers the kernels)

    LOAD_ERROR = None
except ImportError as error:  # the package still works on the reference backend
    LOAD_ERROR = load_error_reason(error)


def missing_kernels(dispatch_key: str) -> list[str]:
    """The ops ``_C`` has no ``dispatch_key`` (CPU, CUDA) kernel for; calls to them fall
    through to the reference kernel, registered for every device."""
    return [
        op
        for op in OP_NAMES
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
masked_sgd_step_ = torch.ops.worm_fast.masked_sgd_step_
masked_adamw_step_ = torch.ops.worm_fast.masked_adamw_step_
soft_mask_distance = torch.ops.worm_fast.soft_mask_distance  # autograd: worm_fast._ops
