"""The compiled extension ``worm_fast._C``: C++ kernels for CPU tensors.

Importing ``_C`` registers its kernels for the ops of ``worm_fast._ops`` with the
dispatcher, so the functions here are plain calls to ``torch.ops.worm_fast``.

``_C`` is linked against the torch it was compiled with and only runs under that same
release: under another it may fail to load with an undefined symbol or, worse, load and
misbehave. So the torch version it records is read from the file first, and a module
built against another torch is not loaded at all: one warning says so, and the ops run
on the reference (and Triton) kernels.
"""

import importlib
import importlib.util
import mmap
import warnings
from pathlib import Path

import torch

from worm_fast._ops import OP_NAMES
from worm_fast.backends import BackendStatus

# The prefix of the version record in the file (kBuildRecord in csrc/worm_fast.cpp).
BUILD_RECORD = b"worm_fast._C built against torch "


def recorded_torch_version(path: str | Path) -> str | None:
    """The torch version the extension at ``path`` was compiled against, read without
    loading it; None when it records none (built by an older worm_fast)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(BUILD_RECORD)
        if start < 0:
            return None
        start += len(BUILD_RECORD)
        return data[start : data.find(b"\0", start)].decode("ascii", "replace")


def rebuild_command() -> str:
    """How to rebuild ``_C`` against the torch of this environment."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file():  # a source checkout (editable or built in place)
        return f"pip install --no-build-isolation -e {root}"
    return (
        "pip install --no-build-isolation --force-reinstall --no-deps "
        "<worm_fast source directory or sdist>"
    )


def _load() -> str | None:
    """Imports ``_C`` when it was built against the running torch; else says why not
    (and warns, unless it was never built)."""
    spec = importlib.util.find_spec("worm_fast._C")
    if spec is None or spec.origin is None:
        return f"worm_fast._C is not built; build it with `{rebuild_command()}`"
    built_against = recorded_torch_version(spec.origin)
    running = str(torch.__version__)
    if built_against != running:
        problem = (
            f"worm_fast._C was built against torch {built_against or '(unrecorded)'} but "
            f"torch {running} is running, so it is not loaded"
        )
    else:
        try:
            importlib.import_module("worm_fast._C")
            return None
        except ImportError as error:
            problem = f"worm_fast._C failed to load ({error})"
    reason = (
        f"{problem}: the ops run on the reference (and Triton) backends instead. "
        f"Rebuild it against this torch with `{rebuild_command()}`"
    )
    # Shown at the import of worm_fast (stack: here, this module, worm_fast/__init__).
    warnings.warn(reason, RuntimeWarning, stacklevel=4)
    return reason


LOAD_ERROR = _load()


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
magnitude_histogram = torch.ops.worm_fast.magnitude_histogram
masked_sgd_step_ = torch.ops.worm_fast.masked_sgd_step_
masked_adamw_step_ = torch.ops.worm_fast.masked_adamw_step_
soft_mask_distance = torch.ops.worm_fast.soft_mask_distance  # autograd: worm_fast._ops
