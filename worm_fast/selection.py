"""A representative part of a parameter: (parameter, element selection).

Most representative parameters are searched whole (a BatchNorm γ, a BERT query weight).
A fused attention projection holds query, key and value in one weight, and only some of
its rows (``nn.MultiheadAttention.in_proj_weight``, a ``qkv`` Linear, the per-head
interleaved ``query_key_value`` of GPT-NeoX) or columns (GPT-2's ``Conv1D`` ``c_attn``,
whose weight is ``[in, out]``) are query and key. A :class:`Selection` names them as
index ranges along one dimension of a 2-D weight; a :class:`Representative` pairs it with
the parameter.

The search thresholds, packs and compares only the selected elements. A selection's
packed mask (DESIGN §3.1) holds them **in the parameter's row-major order**: bit ``i``
is the ``i``-th selected element met when walking the whole parameter row by row, which
is also the row-major order of :meth:`Representative.values` (rows or columns are kept
in ascending order). The optimizer gets a mask over the whole parameter in which every
unselected element is kept, so truncation never scales it by ``r``.

Reading the selected elements costs nothing for one block of rows (a view); any other
selection (column blocks, rows interleaved per head) is gathered into a new tensor at
each read, one ``index_select`` over the selected elements.
"""

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from worm_fast import ops

DIMS = {0: "rows", 1: "columns"}


@dataclass(frozen=True)
class Selection:
    """Rows (``dim=0``) or columns (``dim=1``) of a 2-D weight: ``ranges`` of indices
    ``[start, stop)`` along ``dim``, kept sorted and merged (adjacent ranges become one)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.dim not in DIMS:
            raise ValueError(f"Selection.dim must be 0 (rows) or 1 (columns), got {self.dim!r}")
        ranges = sorted((int(start), int(stop)) for start, stop in self.ranges)
        if not ranges or any(start < 0 or stop <= start for start, stop in ranges):
            raise ValueError(
                f"Selection.ranges must be non-empty [start, stop) ranges with "
                f"0 <= start < stop, got {self.ranges!r}"
            )
        merged = [ranges[0]]
        for start, stop in ranges[1:]:
            if start < merged[-1][1]:
                raise ValueError(f"Selection.ranges overlap: {self.ranges!r}")
            if start == merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        object.__setattr__(self, "ranges", tuple(merged))

    @classmethod
    def from_state(cls, state: "Selection | Mapping") -> "Selection":
        """A selection from itself or from its ``dataclasses.asdict`` form (saved states)."""
        if isinstance(state, Selection):
            return state
        return cls(state["dim"], tuple(tuple(r) for r in state["ranges"]))

    def __or__(self, other: "Selection") -> "Selection":
        if other.dim != self.dim:
            raise ValueError(f"cannot join a selection of {DIMS[self.dim]} and one of "
                             f"{DIMS[other.dim]}")  # fmt: skip
        return Selection(self.dim, self.ranges + other.ranges)

    @property
    def count(self) -> int:
        """Rows or columns selected."""
        return sum(stop - start for start, stop in self.ranges)

    def covers(self, shape: Sequence[int]) -> bool:
        """Whether every element of a weight of ``shape`` is selected."""
        return self.ranges == ((0, shape[self.dim]),)

    def check(self, shape: Sequence[int], name: str) -> None:
        """Raise ValueError unless this selects within a 2-D weight of ``shape``."""
        if len(shape) != 2 or self.ranges[-1][1] > shape[self.dim]:
            raise ValueError(
                f"{name}: a selection of {DIMS[self.dim]} {list(self.ranges)} needs a 2-D "
                f"weight with at least {self.ranges[-1][1]} {DIMS[self.dim]}, got shape "
                f"{tuple(shape)}"
            )

    def selected_shape(self, shape: Sequence[int]) -> torch.Size:
        """The shape of the selected elements of a weight of ``shape``."""
        selected = list(shape)
        selected[self.dim] = self.count
        return torch.Size(selected)

    def read(self, weight: torch.Tensor) -> torch.Tensor:
        """The selected elements (differentiable): a view for one block of rows, a
        gathered copy otherwise."""
        if self.dim == 0 and len(self.ranges) == 1:
            start, stop = self.ranges[0]
            return weight[start:stop]
        return weight.index_select(self.dim, _index(self, weight.device))

    def expand(self, kept: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """A bool mask of ``shape``: ``kept`` (a bool mask over the selected elements, in
        their row-major order) where selected, True (kept) everywhere else."""
        whole = torch.ones(tuple(shape), dtype=torch.bool, device=kept.device)
        selected = kept.reshape(self.selected_shape(shape))
        whole.index_copy_(self.dim, _index(self, kept.device), selected)
        return whole


@functools.lru_cache(maxsize=256)
def _index(selection: Selection, device: torch.device) -> torch.Tensor:
    """The selected indices along ``selection.dim`` (int64, ascending) on ``device``."""
    ranges = [torch.arange(start, stop) for start, stop in selection.ranges]
    return torch.cat(ranges).to(device)


class Representative:
    """A representative parameter and the elements of it that are searched (all of them
    when ``selection`` is None)."""

    def __init__(
        self, param: torch.Tensor, selection: Selection | None = None, *, name: str = "param"
    ) -> None:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{name}: expected a parameter tensor, got {type(param).__name__}")
        if selection is not None:
            selection.check(param.shape, name)
            if selection.covers(param.shape):
                selection = None  # every element: searched as a whole parameter
        self.param = param
        self.selection = selection

    def __repr__(self) -> str:
        part = "all" if self.selection is None else self.selection
        return f"Representative(shape={tuple(self.param.shape)}, selection={part})"

    @property
    def shape(self) -> torch.Size:
        """The shape of the selected elements (:meth:`values`)."""
        if self.selection is None:
            return self.param.shape
        return self.selection.selected_shape(self.param.shape)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def values(self) -> torch.Tensor:
        """The selected elements, read now (differentiable in the parameter)."""
        return self.param if self.selection is None else self.selection.read(self.param)

    def whole_mask(self, packed: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """The packed mask over the whole parameter for a packed mask over the selection:
        every unselected element kept."""
        if self.selection is None:
            return packed
        kept = ops.unpack_mask(packed, self.numel, backend=backend)
        return ops.pack_mask(self.selection.expand(kept, self.param.shape), 0.5, backend=backend)
