"""Early-Bird masks: threshold selection, packing, and the sliding window of distances.

Everything stays on the parameters' device: the threshold is selected there from counts
(``radix_select``, exact, in the parameters' dtype), masks are packed there (DESIGN §3.1),
and the window returns distances as device tensors, so the host reads only the
selection's NaN count (to refuse NaN) and the caller's once-per-check stop decision.
"""

from collections.abc import Sequence

import torch

from worm_fast import ops, radix_select

SCOPES = ("global", "per_tensor")


def check_prune_ratio(prune_ratio: float) -> None:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")


def global_threshold(
    tensors: Sequence[torch.Tensor], prune_ratio: float, *, backend: str | None = None
) -> torch.Tensor:
    """The value at position ``int(total * prune_ratio)`` of the sorted ``|w|`` of all
    ``tensors`` together (the original Early-Bird rule), exactly, as a 0-d tensor in their
    dtype on their device. Raises ``ValueError`` on NaN (see ``radix_select``)."""
    check_prune_ratio(prune_ratio)
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("cannot compute a threshold over zero elements")
    return radix_select.kth_magnitudes(tensors, [int(total * prune_ratio)], backend=backend)[0]


def compute_masks(
    tensors: Sequence[torch.Tensor],
    prune_ratio: float,
    *,
    scope: str = "global",
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Packed masks (kept = ``|w| > threshold``) over each tensor, with one threshold over
    all of them (``scope="global"``) or one per tensor (``"per_tensor"``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    tensors = [t.detach() for t in tensors]
    if scope == "global":
        threshold = global_threshold(tensors, prune_ratio, backend=backend)
        return [ops.pack_mask(t, threshold, backend=backend) for t in tensors]
    check_prune_ratio(prune_ratio)
    if any(t.numel() == 0 for t in tensors):
        raise ValueError("cannot compute a threshold over zero elements")
    positions = [int(t.numel() * prune_ratio) for t in tensors]
    thresholds = radix_select.kth_magnitudes(tensors, positions, per_tensor=True, backend=backend)
    return [
        ops.pack_mask(t, threshold, backend=backend) for t, threshold in zip(tensors, thresholds)
    ]


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
        parts = [packed] if isinstance(packed, torch.Tensor) else list(packed)
        nbytes = sum(part.numel() for part in parts)
        if self._nbytes is None:
            self._nbytes = nbytes
            self.rows = torch.zeros(self.length, nbytes, dtype=torch.uint8, device=parts[0].device)
        for part in parts:
            if part.dtype != torch.uint8 or part.dim() != 1 or nbytes != self._nbytes:
                shape = (nbytes,) if part.dim() == 1 else tuple(part.shape)
                raise ValueError(
                    f"MaskWindow.push: expected {self._nbytes} packed uint8 bytes, got "
                    f"{part.dtype} of shape {shape}"
                )
        # Concatenated straight into the slot of the newest mask: no row made and copied.
        torch.cat(
            [part.to(self.rows.device) for part in parts], out=self.rows[self.count % self.length]
        )
        self.count += 1

    def distances(self) -> torch.Tensor:
        """Normalized Hamming distances between the newest mask and each older one in the
        window (float32 [min(count, length) - 1], oldest first), on the masks' device."""
        if self.count < 2:
            return torch.zeros(0, device=self.rows.device)
        held = min(self.count, self.length)
        order = [(self.newest - back) % self.length for back in range(held - 1, 0, -1)]
        # Against every held row (the newest itself too, at distance 0), then the counts
        # in age order: gathering the rows instead copies them byte by byte (~10 ms for
        # BERT-base's Q/K masks, more than the whole rest of a check).
        differing = ops.hamming_window(self.rows[self.newest], self.rows[:held])
        return differing[order].float() / self.numel

    def state_dict(self) -> dict:
        return {
            "length": self.length,
            "numel": self.numel,
            "rows": self.rows.clone(),
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["length"] != self.length or state["numel"] != self.numel:
            raise ValueError(
                f"MaskWindow.load_state_dict: saved window of length {state['length']} over "
                f"{state['numel']} elements, this one is {self.length} over {self.numel}"
            )
        self.rows = state["rows"].to(self.rows.device).clone()
        self.count = int(state["count"])
        self._nbytes = self.rows.shape[1] if self.count else None
