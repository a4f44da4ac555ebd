"""The memory-bandwidth roofline: STREAM-style kernels, timed in the same run.

``Stream`` (CPU): our own kernels (``stream.cpp``). copy (c = a) and triad (a = b + s c)
as in STREAM, with non-temporal stores, and update (b = s b + c; a += s b, in place): the
read/write mix of an SGD step with momentum. The roofline of the optimizer steps is the
fastest of the three: the bandwidth the memory system demonstrably delivers. dot (sum of
a b) only reads, and is the roofline of the read-only mask distances (on some machines
reads alone stream far slower than a mix). Compiled at bench time
(``torch.utils.cpp_extension``, rebuilt only when the source or flags change) and run on
as many threads as torch's CPU kernels get, and on one: where one core nearly saturates
memory, a thread that waits for a core another process holds costs a team of two more
than it adds.

``DeviceStream`` (GPU): copy, triad and dot as torch's device-to-device kernels on the
GPU's memory (HBM).

Byte counts are STREAM's (elements read + written, no write-allocate reads, which none
of the kernels incurs): copy 8 per element, triad 12, update 20, dot 8.
"""

import ctypes
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import cpp_extension

from benchmarks.timing import Timing, measure

_SOURCE = Path(__file__).with_name("stream.cpp")
_NAME = "worm_bench_stream"
BYTES_PER_ELEMENT = {"copy": 8, "triad": 12, "update": 20, "dot": 8}
READ_ONLY = "dot"
TRIAD_SCALAR = 3.0


@functools.cache
def _library() -> ctypes.CDLL:
    build = Path(tempfile.gettempdir()) / _NAME
    build.mkdir(exist_ok=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-march=native"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
    )
    lib = ctypes.CDLL(str(build / f"{_NAME}.so"))
    ptr, n, threads, scalar = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.stream_init.argtypes = [ptr, ptr, ptr, n, threads]
    lib.stream_copy.argtypes = [ptr, ptr, n, threads]
    lib.stream_triad.argtypes = [ptr, ptr, ptr, scalar, n, threads]
    lib.stream_update.argtypes = [ptr, ptr, ptr, scalar, n, threads]
    lib.stream_dot.argtypes = [ptr, ptr, n, threads]
    lib.stream_dot.restype = ctypes.c_double
    return lib


class Stream:
    """Three float32 arrays of ``numel`` elements and the kernels that stream them.

    Every kernel runs on torch's thread count and on one thread, named
    ``"{kernel}@{threads}t"``; ``bytes(name)`` is the traffic of one call.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        lib = _library()
        teams = sorted({1, torch.get_num_threads()})
        # torch.empty leaves the pages untouched, so stream_init places them (first touch).
        self._arrays = [torch.empty(numel, dtype=torch.float32) for _ in range(3)]
        a, b, c = (t.data_ptr() for t in self._arrays)
        lib.stream_init(a, b, c, numel, teams[-1])
        kernels = {
            "copy": lambda t: lib.stream_copy(c, a, numel, t),
            "triad": lambda t: lib.stream_triad(a, b, c, TRIAD_SCALAR, numel, t),
            # Scale 0.5 keeps b bounded (b -> 2c) over the repetitions.
            "update": lambda t: lib.stream_update(a, b, c, 0.5, numel, t),
            "dot": lambda t: lib.stream_dot(a, b, numel, t),
        }
        self.kernels: dict[str, Callable[[], None]] = {
            f"{name}@{t}t": functools.partial(kernel, t)
            for name, kernel in kernels.items()
            for t in teams
        }

    def bytes(self, name: str) -> int:
        return BYTES_PER_ELEMENT[name.split("@")[0]] * self.numel

    def measure(self, *, warmup: int, reps: int, budget_s: float | None) -> dict[str, Timing]:
        return measure(
            self.kernels, device=torch.device("cpu"), warmup=warmup, reps=reps, budget_s=budget_s
        )


class DeviceStream:
    """copy (c = a), triad (a = b + s c) and dot (sum of a b) as torch ops on three float32
    arrays of ``numel`` elements on ``device``: the roofline of a GPU's memory.

    The same interface as ``Stream``; the kernels are named ``"{kernel}@{device type}"``.
    Byte counts are STREAM's, as for ``Stream``.
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel, self.device = numel, device
        a, b, c = (torch.rand(numel, device=device) for _ in range(3))
        self._arrays = [a, b, c]
        kernels = {
            "copy": lambda: c.copy_(a),
            "triad": lambda: torch.add(b, c, alpha=TRIAD_SCALAR, out=a),
            "dot": lambda: torch.dot(a, b),
        }
        self.kernels = {f"{name}@{device.type}": kernel for name, kernel in kernels.items()}

    def bytes(self, name: str) -> int:
        return BYTES_PER_ELEMENT[name.split("@")[0]] * self.numel

    def measure(self, *, warmup: int, reps: int, budget_s: float | None) -> dict[str, Timing]:
        return measure(
            self.kernels, device=self.device, warmup=warmup, reps=reps, budget_s=budget_s
        )
