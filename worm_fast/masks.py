"""Early-Bird masks: threshold selection, packing, and the sliding window of distances.

Everything stays on the parameters' device: the threshold is selected there from counts
(``radix_select``, exact, in the parameters' dtype), masks are packed there (DESIGN §3.1),
and the window returns distances as device tensors, so the host reads only the
selection's NaN count (to refuse NaN) and the caller's once-per-check stop decision.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from worm_fast import ops, radix_select

if TYPE_CHECKING:
    from worm_fast.distributed import Sharded

SCOPES = ("global", "per_tensor")
# How elements whose magnitude equals the threshold are decided (compute_masks).
TIES = ("early_bird", "exact")


def check_prune_ratio(prune_ratio: float) -> None:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")


def global_threshold(
    tensors: Sequence[torch.Tensor],
    prune_ratio: float,
    *,
    backend: str | None = None,
    shards: "Sharded | None" = None,
) -> torch.Tensor:
    """The value at position ``int(total * prune_ratio)`` of the sorted ``|w|`` of all
    ``tensors`` together (the original Early-Bird rule), exactly, as a 0-d tensor in their
    dtype on their device. Raises ``ValueError`` on NaN (see ``radix_select``).
    ``shards``: see :func:`compute_masks`."""
    check_prune_ratio(prune_ratio)
    total = sum(t.numel() for t in tensors) if shards is None else sum(shards.numels)
    if total == 0:
        raise ValueError("cannot compute a threshold over zero elements")
    position = [int(total * prune_ratio)]
    return radix_select.kth_magnitudes(tensors, position, backend=backend, shards=shards)[0]


def compute_masks(
    tensors: Sequence[torch.Tensor],
    prune_ratio: float,
    *,
    scope: str = "global",
    ties: str = "early_bird",
    backend: str | None = None,
    shards: "Sharded | None" = None,
) -> list[torch.Tensor]:
    """Packed masks over each tensor, with one threshold over all of them
    (``scope="global"``) or one per tensor (``"per_tensor"``).

    ``ties="early_bird"`` (the original code's rule): kept = ``|w| > threshold``, so
    elements equal to the threshold are all pruned, and many equal magnitudes (a check
    at initialization, frozen BatchNorm γ, bf16 weights) prune far more than
    ``prune_ratio``. ``ties="exact"``: exactly ``int(total * prune_ratio)`` elements are
    pruned, the smallest magnitudes, and among equal ones those of lower index (the
    tensors' order, then row-major) first.

    ``shards`` (``worm_fast.distributed.Sharded``): ``tensors`` are this process's
    ``Shard(0)`` chunks of larger tensors, and the masks are those of the whole tensors
    restricted to the chunks: thresholds over the whole tensors (all-reduced histograms)
    and, with ``ties="exact"``, the tie order of the whole (chunks in rank order), with
    one all-gather of counts. Every process of the shards must call it.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    tensors = [t.detach() for t in tensors]
    numels = [t.numel() for t in tensors] if shards is None else shards.numels
    if scope == "global":
        groups = [list(range(len(tensors)))]
        thresholds = [global_threshold(tensors, prune_ratio, backend=backend, shards=shards)]
    else:
        check_prune_ratio(prune_ratio)
        if 0 in numels:
            raise ValueError("cannot compute a threshold over zero elements")
        groups = [[i] for i in range(len(tensors))]
        positions = [int(n * prune_ratio) for n in numels]
        thresholds = radix_select.kth_magnitudes(
            tensors, positions, per_tensor=True, backend=backend, shards=shards
        )
    if ties == "early_bird":
        return [
            ops.pack_mask(tensors[i], threshold, backend=backend)
            for group, threshold in zip(groups, thresholds)
            for i in group
        ]
    kept = _exact_count_kept(tensors, numels, groups, thresholds, prune_ratio, shards)
    return [ops.pack_mask(k, 0.5, backend=backend) for k in kept]


def _exact_count_kept(
    tensors: Sequence[torch.Tensor],
    numels: Sequence[int],
    groups: Sequence[Sequence[int]],
    thresholds: Sequence[torch.Tensor],
    prune_ratio: float,
    shards: "Sharded | None",
) -> list[torch.Tensor]:
    """Bool masks keeping all but the ``int(n * prune_ratio)`` smallest magnitudes of each
    group of tensors (``n`` its elements), ties at its threshold (that count's smallest
    magnitude) pruned by lower index first.

    On the device, without a host round trip: every magnitude below the threshold is
    pruned, and of those equal to it the first ``pruned - below`` in index order: the
    group's tensors in turn, each row-major (sharded: its chunks in rank order, so the
    ties before a chunk are the whole earlier tensors' and the earlier ranks' chunks').
    """
    threshold_of = {i: threshold for group, threshold in zip(groups, thresholds) for i in group}
    threshold_of = [threshold_of[i] for i in range(len(tensors))]
    # In the threshold's dtype (the tensors', promoted if they differ), as it was selected.
    magnitudes = [t.reshape(-1).abs().to(th.dtype) for t, th in zip(tensors, threshold_of)]
    tied = [m == t for m, t in zip(magnitudes, threshold_of)]
    below = [(m < t).sum() for m, t in zip(magnitudes, threshold_of)]
    local = torch.stack(below + [t.sum() for t in tied])  # per tensor: below, then tied
    every = local.unsqueeze(0) if shards is None else shards.all_gather(local)  # [ranks, ...]
    rank = 0 if shards is None else shards.rank
    total, earlier_ranks = every.sum(0), every[:rank].sum(0)
    count = len(tensors)
    kept = [None] * count
    for group in groups:
        pruned = int(sum(numels[i] for i in group) * prune_ratio)
        group_below = total[list(group)].sum()
        tied_before = torch.zeros((), dtype=torch.int64, device=total.device)
        for i in group:
            rank_among_tied = tied[i].cumsum(0) - 1 + tied_before + earlier_ranks[count + i]
            chosen = tied[i] & (rank_among_tied >= pruned - group_below)
            kept[i] = ((magnitudes[i] > threshold_of[i]) | chosen).view(tensors[i].shape)
            tied_before = tied_before + total[count + i]
    return kept


class MaskWindow:
    """Ring buffer of the newest ``length`` masks, each a row of packed bytes.

    A mask over several tensors is the concatenation of their packed masks: each is
    padded to whole words with zero bits, which never differ, so Hamming distances
    over the concatenation are exact and are divided by the true number of bits.
    """

    def __init__(self, length: int, numel: int, device: torch.device | str = "cpu") -> None:
        if length < 2:
            raise ValueError(f"window length must be at least 2, got {length}")
        if numel <= 0:
            raise ValueError(f"a mask must cover at least one element, got {numel}")
        self.length = length
        self.numel = numel
        self.rows = torch.zeros(length, 0, dtype=torch.uint8, device=device)
        self.count = 0  # masks pushed so far
        self._nbytes = None

    @property
    def full(self) -> bool:
        return self.count >= self.length

    @property
    def newest(self) -> int:
        """Row index of the newest mask."""
        return (self.count - 1) % self.length

    def push(self, packed: Sequence[torch.Tensor] | torch.Tensor) -> None:
        """Add the newest mask: one packed row, or the packed masks of several tensors."""
        row = packed if isinstance(packed, torch.Tensor) else torch.cat(list(packed))
        self._check_row(row)
        if self._nbytes is None:
            self._nbytes = row.numel()
            self.rows = torch.zeros(self.length, row.numel(), dtype=torch.uint8, device=row.device)
        self.count += 1
        self.rows[self.newest] = row

    def _check_row(self, row: torch.Tensor) -> None:
        # The first mask fixes the width: the packed bytes of `numel` elements, padded per
        # tensor to whole words, so at least packed_nbytes(numel).
        nbytes = self._nbytes
        if (
            row.dtype != torch.uint8
            or row.dim() != 1
            or (row.numel() != nbytes if nbytes is not None else row.numel() * 8 < self.numel)
        ):
            expected = f"{nbytes}" if nbytes is not None else f"at least {(self.numel + 7) // 8}"
            raise ValueError(
                f"MaskWindow.push: expected {expected} packed uint8 bytes, got "
                f"{row.dtype} of shape {tuple(row.shape)}"
            )

    def differing_bits(self, row: torch.Tensor) -> torch.Tensor:
        """Differing bits (int64 on the masks' device, oldest first) between ``row`` and each
        mask that would stay in the window if ``row`` were pushed; changes nothing."""
        self._check_row(row)
        held = min(self.count, self.length - 1)
        order = [(self.newest - back) % self.length for back in range(held - 1, -1, -1)]
        if not order:
            return torch.zeros(0, dtype=torch.int64, device=row.device)
        # Against every held row in place, then the counts in age order: gathering the
        # rows instead copies them byte by byte (~10 ms for BERT-base's Q/K masks, more
        # than the whole rest of a check).
        differing = ops.hamming_window(row, self.rows[: min(self.count, self.length)])
        return differing[order]

    def distances(self) -> torch.Tensor:
        """Normalized Hamming distances between the newest mask and each older one in the
        window (float32 [min(count, length) - 1], oldest first), on the masks' device."""
        if self.count < 2:
            return torch.zeros(0, device=self.rows.device)
        held = min(self.count, self.length)
        order = [(self.newest - back) % self.length for back in range(held - 1, 0, -1)]
        differing = ops.hamming_window(self.rows[self.newest], self.rows[:held])  # in place
        return differing[order].float() / self.numel

    def state_dict(self) -> dict:
        return {
            "length": self.length,
            "numel": self.numel,
            "rows": self.rows.clone(),
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a saved window; everything is checked before anything changes."""
        if state["length"] != self.length or state["numel"] != self.numel:
            raise ValueError(
                f"MaskWindow.load_state_dict: saved window of length {state['length']} over "
                f"{state['numel']} elements, this one is {self.length} over {self.numel}"
            )
        rows, count = state["rows"], state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"MaskWindow.load_state_dict: count must be an int >= 0, got {count!r}"
            )
        if (
            not isinstance(rows, torch.Tensor)
            or rows.dtype != torch.uint8
            or rows.dim() != 2
            or rows.shape[0] != self.length
            or (count and rows.shape[1] * 8 < self.numel)
        ):
            raise ValueError(
                f"MaskWindow.load_state_dict: rows must be uint8 [{self.length}, nbytes] with "
                f"nbytes * 8 >= {self.numel}, got {getattr(rows, 'dtype', type(rows).__name__)} "
                f"of shape {tuple(getattr(rows, 'shape', ()))}"
            )
        self.rows = rows.to(self.rows.device).clone()
        self.count = count
        self._nbytes = self.rows.shape[1] if self.count else None
