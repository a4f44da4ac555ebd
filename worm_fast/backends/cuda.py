"""CUDA kernels of ``worm_fast._C``, present when the extension was built with a toolkit."""

import torch

from worm_fast.backends import BackendStatus, cpp
from worm_fast.backends.cpp import (
    hamming_window,
    magnitude_histogram,
    masked_adamw_step_,
    masked_sgd_step_,
    pack_mask,
    soft_mask_distance,
    unpack_mask,
)

__all__ = [
    "hamming_window",
    "magnitude_histogram",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "pack_mask",
    "soft_mask_distance",
    "status",
    "unpack_mask",
]


def status() -> BackendStatus:
    if cpp.LOAD_ERROR is not None:
        return BackendStatus("cuda", False, cpp.LOAD_ERROR, ("cuda",))
    if "masked_sgd_step_" in cpp.missing_kernels("CUDA"):
        reason = "worm_fast._C was built without CUDA (no toolkit at build time)"
        return BackendStatus("cuda", False, reason, ("cuda",))
    if not torch.cuda.is_available():
        reason = "worm_fast._C has CUDA kernels, but there is no CUDA device here"
        return BackendStatus("cuda", False, reason, ("cuda",))
    return BackendStatus(
        "cuda", True, cpp.describe("CUDA", "CUDA kernels from worm_fast._C"), ("cuda",)
    )
