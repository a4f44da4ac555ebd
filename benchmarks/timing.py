"""Wall-clock timing: quantiles over repetitions after warm-up, providers interleaved."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)
MIN_REPS = 5


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th / 80th percentiles over ``reps`` calls."""

    median: float
    p20: float
    p80: float
    reps: int


def _synchronizer(device: torch.device) -> Callable[[], None]:
    # A CUDA call returns before its kernel ends; the clock must wait for it.
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), 0 where unknown."""
    largest = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        largest = max(largest, int(text.rstrip("KMG")) * scale)
    return largest


def cache_flusher(device: torch.device, nbytes: int | None = None) -> Callable[[], None]:
    """A call that evicts what the last provider left in the caches.

    In training, the forward and backward passes between two optimizer steps sweep the
    caches; without this, a provider would find the parameters and gradients its
    predecessor just streamed. Reading (not writing) a buffer of ``nbytes`` (default:
    twice the last-level cache) leaves clean lines, so the timed call pays no write-back
    for the flush.
    """
    if nbytes is None:
        if device.type == "cuda":
            cache = torch.cuda.get_device_properties(device).L2_cache_size
        else:
            cache = last_level_cache_bytes()
        nbytes = 2 * max(cache, 1 << 20)
    buffer = torch.ones(nbytes // 4, device=device)
    return lambda: buffer.sum()


def _summarize(samples: list[float]) -> Timing:
    p20, median, p80 = (
        torch.tensor(samples, dtype=torch.float64)
        .quantile(torch.tensor(QUANTILES, dtype=torch.float64))
        .tolist()
    )
    return Timing(median=median, p20=p20, p80=p80, reps=len(samples))


def measure(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    reps: int,
    budget_s: float | None = None,
    flush: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time every function of ``fns`` ``reps`` times, after ``warmup`` untimed calls each.

    ``flush`` (untimed) runs before every call, e.g. a ``cache_flusher``.

    With ``budget_s``, fewer repetitions (but at least ``MIN_REPS``) when the last
    warm-up round says that ``reps`` rounds would take longer than that.

    The functions take turns, one call each per round, and the order rotates every
    round: a slow stretch of the machine (another process, frequency changes) then
    lands on every provider alike instead of on whichever ran during it, and none of
    them always runs with the caches warmed by the same predecessor.
    """
    sync = _synchronizer(device)
    names = list(fns)

    def prepare() -> None:
        if flush is not None:
            flush()
        sync()

    round_s = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for name in names:
            prepare()
            fns[name]()
        sync()
        round_s = time.perf_counter() - start
    if budget_s is not None and round_s > 0:
        reps = max(MIN_REPS, min(reps, int(budget_s / round_s)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(reps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            prepare()
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: _summarize(values) for name, values in samples.items()}
