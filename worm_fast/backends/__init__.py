"""Kernel backends and how one is chosen.

Every backend exposes one function per op of ``worm_fast._ops.OP_NAMES`` (``pack_mask``,
``unpack_mask``, ``hamming_window``, ``magnitude_histogram``, ``soft_mask_distance``,
``masked_sgd_step_``, ``masked_adamw_step_``) with the signature of ``backends.reference``.
``auto`` picks the fastest one for the tensors' device: CPU → ``cpp``, CUDA → ``cuda``
then ``triton``, anything else → ``reference``. ``WORM_FAST_BACKEND`` or a ``backend=``
argument forces one.
"""

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

NAMES = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "WORM_FAST_BACKEND"
# This package: a backend's module is its attribute once imported (see ``resolve``).
_PACKAGE = sys.modules[__name__]
# What ``auto`` tries for each device type, fastest first (anything else: reference).
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs on
    device_types: tuple[str, ...] | None  # None: any device


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"worm_fast.backends.{name}")


@functools.cache
def _status(name: str) -> BackendStatus:
    # Fixed once the backend's module is imported (its kernels are registered then);
    # cached because every op call resolves a backend.
    return _module(name).status()


def available() -> dict[str, BackendStatus]:
    """Every backend, whether it can run here, and why not when it cannot."""
    return {name: _status(name) for name in NAMES}


def resolve(backend: str | None, device: torch.device) -> ModuleType:
    """The backend module to run on ``device``: ``backend`` or $WORM_FAST_BACKEND or auto."""
    # An attribute of this package, which Dynamo can trace and guard.
    return getattr(_PACKAGE, _resolved_name(backend, device.type))


# Under torch.compile the choice is made once, when the call is traced, and is a
# constant of the graph: Dynamo cannot trace it (it imports the backend's module).
@torch.compiler.assume_constant_result
def _resolved_name(backend: str | None, device_type: str) -> str:
    module = _resolve(backend or os.environ.get(ENV_VAR) or "auto", device_type)
    return module.__name__.rpartition(".")[2]


@functools.cache
def _resolve(choice: str, device_type: str) -> ModuleType:
    # Cached: every op call resolves, and after the forward and backward passes have
    # swept the caches the import machinery's Python code costs ~0.1 ms to run cold.
    if choice == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            status = _status(name)
            if status.available and _supports(status, device_type):
                return _module(name)
        raise AssertionError("the reference backend always runs")  # pragma: no cover
    if choice not in NAMES:
        raise ValueError(f"unknown backend {choice!r}; expected 'auto' or one of {NAMES}")
    status = _status(choice)
    if not status.available:
        raise RuntimeError(f"backend {choice!r} is not available: {status.reason}")
    if not _supports(status, device_type):
        raise RuntimeError(
            f"backend {choice!r} runs on {status.device_types} tensors, got {device_type}"
        )
    return _module(choice)


def _supports(status: BackendStatus, device_type: str) -> bool:
    return status.device_types is None or device_type in status.device_types
