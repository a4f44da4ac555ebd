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

_OPS = ("pack_mask", "unpack_mask", "hamming_window", "masked_sgd_step_", "masked_adamw_step_")


def has_kernels(dispatch_key: str) -> bool:
    """Whether ``_C`` registered a kernel of every op for ``dispatch_key`` (CPU, CUDA)."""
    return LOAD_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", dispatch_key)
        for op in _OPS
    )


def status() -> BackendStatus:
    if LOAD_ERROR is not None:
        return BackendStatus("cpp", False, LOAD_ERROR, ("cpu",))
    return BackendStatus("cpp", True, "C++ kernels, multi-threaded over CPU tensors", ("cpu",))


pack_mask = torch.ops.worm_fast.pack_mask
unpack_mask = torch.ops.worm_fast.unpack_mask
hamming_window = torch.ops.worm_fast.hamming_window
masked_sgd_step_ = torch.ops.worm_fast.masked_sgd_step_
masked_adamw_step_ = torch.ops.worm_fast.masked_adamw_step_
