"""Exact k-th magnitudes by radix selection on the floats' bits: no sort, no copy.

The magnitude key of ``x`` (``_ops.MagnitudeKey``: the bits of ``|x|`` read as an
unsigned integer) orders like ``|x|``, so the value at position ``k`` of the sorted
magnitudes is the float whose key is the ``k``-th smallest key. ``select_keys`` finds
that key from counts alone: it holds a window of keys known to contain it, and each
pass of ``ops.magnitude_histogram`` splits the window into ``2**bits`` digits and keeps
the digit where position ``k`` falls, until the window is a single key. Each pass reads
the magnitudes once; none sorts or copies them.

On the CPU, for large inputs, a sample guesses a narrow window first (every 16th block
of 64 elements, about 1/16 of a read): one pass then counts the keys below the window
and resolves it to the key, where the plain passes would take a full histogram (a
scatter per element: about three reads' time) and a second pass. The guess only decides
where to look: when the counts show that position ``k`` lies outside the guessed window,
the plain passes run, so the result is exact whatever the sample. Deciding that reads
counts on the host, free on the CPU; elsewhere (CUDA) only the plain passes run, and the
one host round trip is the NaN check at the end.

Counts add up, over the tensors of one call and over processes: a sharded selection
passes ``select_keys`` a ``histogram`` that all-reduces each pass's counts (with the
global positions and element counts), and every rank gets the key of the whole, the
same bits as one process; only the number of passes can differ (the sample's blocks
start at each shard). ``kth_magnitudes(..., shards=...)`` does this for FSDP2 shards
(``worm_fast.distributed.Sharded``, without the sample, whose 2**16 counts would cross
processes), as in this sketch::

    import torch
    from worm_fast import ops
    from worm_fast._ops import MAGNITUDE_KEYS
    from worm_fast.radix_select import (
        guess_pays, key_values, pass_bits, refuse_nans, select_keys,
    )

    local_shards = [torch.randn(700), torch.randn(300)]  # this rank's shards
    dtype, device = torch.float32, torch.device("cpu")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    totals = torch.tensor([1000 * world])  # one row: every rank's elements together
    positions = totals // 2  # e.g. int(total * prune_ratio)

    def histogram(lo, shift, bits, stride):
        counts = ops.magnitude_histogram(local_shards, lo, shift, bits, stride=stride)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # one collective per pass
        return counts

    keys, nans = select_keys(histogram, MAGNITUDE_KEYS[dtype].bits, positions, totals,
                             bits_per_pass=pass_bits(device, len(totals)),
                             guess=guess_pays(device, totals.tolist()))
    refuse_nans(nans, per_tensor=False)
    thresholds = key_values(keys, dtype)
"""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from worm_fast import ops
from worm_fast._ops import MAGNITUDE_KEYS, MAX_HISTOGRAM_BITS

if TYPE_CHECKING:
    from worm_fast.distributed import Sharded

__all__ = [
    "Histogram",
    "guess_pays",
    "key_values",
    "kth_magnitudes",
    "pass_bits",
    "refuse_nans",
    "select_keys",
]

# (lo, shift, bits, stride) -> int64 counts [rows, 2**bits + 2], as ops.magnitude_histogram.
Histogram = Callable[[torch.Tensor, int, int, int], torch.Tensor]

SAMPLE_STRIDE = 16  # the guess counts every 16th block of 64 elements
SAMPLE_BITS = 16  # ... by the top 16 bits of their keys
GUESS_MARGIN = 4.0  # binomial standard deviations of the sampled position, on each side
GUESS_MIN_ELEMENTS = 1 << 20  # below this, the plain passes take well under a millisecond
# Digit bits of a pass whose counts are all-reduced over shards: three passes of
# 2**11 + 2 counts (16 KiB) select a float32 key, where two one-process passes (16 bits)
# would all-reduce 512 KiB each.
SHARDED_PASS_BITS = 11


def pass_bits(device: torch.device, rows: int, *, sharded: bool = False) -> int:
    """Digit bits of a plain pass: 16 for one histogram on the CPU (two passes cover a
    float32 key, and each thread's counts stay in its L2 cache), else 12 (a row per
    tensor stays small, and a GPU block's counts fit in shared memory); 11 when the
    counts are all-reduced over shards (SHARDED_PASS_BITS)."""
    if sharded:
        return SHARDED_PASS_BITS
    return 16 if device.type == "cpu" and rows == 1 else 12


def select_keys(
    histogram: Histogram,
    key_bits: int,
    positions: torch.Tensor,
    totals: torch.Tensor | None = None,
    *,
    bits_per_pass: int = 12,
    guess: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key at position ``positions[r]`` (0-based) of the sorted keys of row ``r`` that
    ``histogram`` counts, and the number of NaNs in the row: ``(keys, nans)``, int64
    [rows], on the positions' device.

    ``key_bits``: the width of the keys (``MagnitudeKey.bits``). Each position must be
    below its row's count of non-NaN elements. ``guess`` (needs ``totals``, the elements
    of each row) first guesses a window from a sample; it reads counts on the host, and
    is skipped for keys that one pass resolves (float16, bfloat16).
    """
    k = positions.clone()
    lo = torch.zeros_like(k)
    span = key_bits  # the window is [lo, lo + 2**span); k is relative to lo
    nans = None
    if guess and key_bits > MAX_HISTOGRAM_BITS:
        start, shift, bits = _guess_window(histogram, key_bits, positions, totals)
        counts = histogram(start, shift, bits, 1)
        nans, below = counts[:, -1], counts[:, -2]
        cumulative = counts[:, :-2].cumsum(1)
        if bool(((below <= k) & (k < below + cumulative[:, -1])).all()):
            lo, k = _narrow(start, k - below, cumulative, shift)
            span = shift
    while span > 0:
        bits = min(span, bits_per_pass)
        shift = span - bits
        counts = histogram(lo, shift, bits, 1)
        if nans is None:
            nans = counts[:, -1]
        lo, k = _narrow(lo, k, counts[:, :-2].cumsum(1), shift)
        span = shift
    return lo, nans


def _narrow(
    lo: torch.Tensor, k: torch.Tensor, cumulative: torch.Tensor, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit window that holds position ``k`` of each row, and ``k`` within it, from
    the cumulative counts of the digits of the window ``lo``."""
    digit = torch.searchsorted(cumulative, k.unsqueeze(1), right=True).squeeze(1)
    # Only NaNs (excluded from the digits, then refused) can push k past the last digit.
    digit = digit.clamp_max(cumulative.shape[1] - 1)
    before = cumulative.gather(1, (digit - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    return lo + (digit << shift), k - torch.where(digit > 0, before, 0)


def _guess_window(
    histogram: Histogram, key_bits: int, positions: torch.Tensor, totals: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """A window (start [rows], shift, bits) that likely holds each row's position: the
    top-16-bit digits of a sample around the sampled position, with GUESS_MARGIN
    binomial standard deviations on each side, and as few bits as cover them."""
    shift = key_bits - SAMPLE_BITS
    zeros = torch.zeros_like(positions)
    counts = histogram(zeros, shift, SAMPLE_BITS, SAMPLE_STRIDE)[:, :-2]
    sampled = counts.sum(1)
    fraction = positions.double() / totals.double()
    center = fraction * sampled
    spread = GUESS_MARGIN * (center * (1 - fraction)).sqrt() + 1
    last = (sampled - 1).clamp_min(0)
    first = torch.minimum((center - spread).floor().long().clamp_min(0), last)
    final = torch.minimum((center + spread).ceil().long(), last)
    cumulative = counts.cumsum(1)
    first_digit = torch.searchsorted(cumulative, first.unsqueeze(1), right=True).squeeze(1)
    final_digit = torch.searchsorted(cumulative, final.unsqueeze(1), right=True).squeeze(1)
    first_digit = first_digit.clamp_max(counts.shape[1] - 1)
    digits = int((final_digit - first_digit).max().clamp_min(0)) + 1
    window_bits = shift + (digits - 1).bit_length()  # 2**window_bits >= digits << shift
    bits = min(window_bits, MAX_HISTOGRAM_BITS)
    return first_digit << shift, window_bits - bits, bits


def guess_pays(device: torch.device, totals: Sequence[int]) -> bool:
    """Whether ``select_keys`` should guess a window first: on the CPU, for every row of
    at least GUESS_MIN_ELEMENTS elements."""
    return device.type == "cpu" and min(totals) >= GUESS_MIN_ELEMENTS


class NaNMagnitudesError(ValueError):
    """The magnitudes to select from hold NaN (raised by :func:`refuse_nans`)."""


def refuse_nans(nans: torch.Tensor, per_tensor: bool) -> None:
    """Raises :class:`NaNMagnitudesError` naming the NaNs ``select_keys`` counted, if any (one host
    read): magnitudes with a NaN have no order, so no threshold over them is meaningful."""
    if not bool(nans.any()):
        return
    found = nans.tolist()
    if per_tensor:
        where = ", ".join(f"tensors[{i}]: {n}" for i, n in enumerate(found) if n)
    else:
        where = str(found[0])
    raise NaNMagnitudesError(
        f"kth_magnitudes: NaN values found ({where}); magnitudes with a NaN have no order, "
        "so there is no threshold over them"
    )


def key_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The floats of ``dtype`` whose magnitude keys are ``keys`` (int64): non-negative."""
    storage = MAGNITUDE_KEYS[dtype].storage
    return keys.to(storage).view(dtype)


def kth_magnitudes(
    tensors: Sequence[torch.Tensor],
    positions: Sequence[int],
    *,
    per_tensor: bool = False,
    backend: str | None = None,
    guess: bool | None = None,
    shards: "Sharded | None" = None,
) -> torch.Tensor:
    """The value at position ``positions[r]`` (0-based) of the sorted ``|x|`` of all
    ``tensors`` together (one position, ``per_tensor=False``) or of ``tensors[r]`` (one
    position per tensor): exactly ``kthvalue(positions[r] + 1)`` of those magnitudes, as
    a 1-D tensor on the tensors' device, in their dtype (tensors of several dtypes are
    read in the one they promote to, which holds each of their values exactly).

    Raises ``ValueError`` when a tensor holds a NaN: magnitudes with a NaN have no
    order, so no threshold over them is meaningful. ``guess``: None = where it pays
    (large inputs on the CPU); True / False force it (tests).

    ``shards``: ``tensors`` are this process's shards of larger tensors
    (``worm_fast.distributed.Sharded``); positions count in the whole tensors, every
    pass's counts are all-reduced, and every process gets the same values (a NaN on any
    shard raises on every process).
    """
    tensors = [t.detach() for t in tensors]
    if not tensors:
        raise ValueError("kth_magnitudes: expected at least one tensor")
    for i, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise TypeError(
                f"kth_magnitudes: tensors[{i}] must be floating point, got {tensor.dtype}"
            )
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    tensors = [t.to(dtype) for t in tensors]  # a copy only where the dtypes are mixed
    device = tensors[0].device
    numels = [t.numel() for t in tensors] if shards is None else shards.numels
    totals = numels if per_tensor else [sum(numels)]
    positions = list(positions)
    if len(positions) != len(totals):
        raise ValueError(
            f"kth_magnitudes: expected {len(totals)} position(s), got {len(positions)}"
        )
    for row, (position, total) in enumerate(zip(positions, totals)):
        if not 0 <= position < total:
            what = f"tensors[{row}]" if per_tensor else "the tensors"
            raise ValueError(
                f"kth_magnitudes: position {position} is outside the {total} elements of {what}"
            )
    key = MAGNITUDE_KEYS[dtype]
    rows = len(totals)
    if guess is None:
        guess = shards is None and guess_pays(device, totals)

    def histogram(lo: torch.Tensor, shift: int, bits: int, stride: int) -> torch.Tensor:
        counts = ops.magnitude_histogram(tensors, lo, shift, bits, stride=stride, backend=backend)
        return counts if shards is None else shards.all_reduce(counts)

    as_tensor = dict(dtype=torch.int64, device=device)
    keys, nans = select_keys(
        histogram,
        key.bits,
        torch.tensor(positions, **as_tensor),
        torch.tensor(totals, **as_tensor),
        bits_per_pass=pass_bits(device, rows, sharded=shards is not None),
        guess=guess,
    )
    refuse_nans(nans, per_tensor)
    return key_values(keys, dtype)
