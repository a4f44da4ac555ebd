"""What the Early-Bird search needs from torch.distributed (DESIGN §3.4).

Where the representative parameters live decides what a check communicates
(:func:`placement`):

* :class:`Local`: one process, or ranks that each run their own search
  (``process_group=None``). Nothing is communicated.
* :class:`Replicated`: every rank holds every parameter (DDP). Each rank computes the
  masks itself; one all-reduce (MAX) of the check's counts and of a checksum of the
  newest mask, with its negation (``l + 3`` int64), proves that every rank computed the
  same mask, and a rank whose mask differs fails every rank's check with
  :class:`ReplicasDivergedError` naming it.
* :class:`Sharded`: FSDP2 parameters, DTensors sharded on dim 0 over a 1-D mesh. Each
  rank works on its local shards only, and no magnitude or mask crosses processes:
  the threshold is the radix select of :mod:`worm_fast.radix_select` on all-reduced
  digit histograms (bit for bit the single-process threshold), ``ties="exact"``
  all-gathers each rank's counts below and at the threshold, the masks are packed per
  local shard, and the distances are local XOR-popcounts plus one all-reduce (SUM) of
  the check's ``l + 1`` counts.

A NaN stops every rank at once (its count is in the first all-reduced histogram, or in
the counts), and so does an inf (in the counts): no rank is left waiting in a collective.
Every rank must build the search with the same settings: the constructor compares them
with one all-reduce and names the first rank and setting that differ.
"""

import functools
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from worm_fast import ops

# EarlyBirdSearch's default process group: the default (world) group when
# torch.distributed is initialized, else none.
WORLD = "world"

# The checksum (and its negation) must fit an int64.
_CHECKSUM_MASK = (1 << 62) - 1


# The entries of a search's state that grow with every check.
_HISTORY = ("records", "features")


class ReplicasDivergedError(RuntimeError):
    """Replicated (DDP) ranks computed different masks: their parameters are not equal."""


def _dtensor_type():
    """``DTensor``, or None while ``torch.distributed.tensor`` was never imported (then no
    DTensor exists; importing it costs ~0.3 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard, else itself."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def local_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [local_tensor(t) for t in tensors]


def placement(
    params: Mapping[str, torch.Tensor], process_group=WORLD
) -> "Local | Replicated | Sharded":
    """How a search over ``params`` communicates: sharded when they are DTensors, else
    replicated over ``process_group`` (``WORLD``: the default group when initialized),
    else local (``process_group=None``, or torch.distributed not initialized)."""
    dtensor = _dtensor_type()
    sharded = [name for name, p in params.items() if dtensor and isinstance(p, dtensor)]
    if sharded:
        if len(sharded) != len(params):
            plain = next(name for name in params if name not in sharded)
            raise ValueError(
                f"representative parameter {sharded[0]!r} is a DTensor (sharded) but "
                f"{plain!r} is not; shard them all (fully_shard the modules that hold them) "
                "or none"
            )
        return Sharded(params, process_group)
    device = next(iter(params.values())).device
    if process_group == WORLD:
        initialized = dist.is_available() and dist.is_initialized()
        process_group = dist.group.WORLD if initialized else None
    if process_group is None:
        return Local()
    return Replicated(_checked_group(process_group), device)


def _checked_group(group) -> dist.ProcessGroup:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup, None (no collectives: "
            f"each rank searches alone) or {WORLD!r} (the default group), got {group!r}"
        )
    return group


def _ranks(group: dist.ProcessGroup) -> list[int]:
    return dist.get_process_group_ranks(group)


class Local:
    """One process: nothing to agree on, nothing to reduce."""

    shards = None

    def agree(self, description: Mapping) -> None:
        pass

    def refuse_non_finite(self, counts: int) -> None:
        pass

    def reduce_counts(self, counts: torch.Tensor, row: torch.Tensor) -> list[int]:
        return counts.tolist()

    def state_dict(self, state: dict) -> dict:
        return state

    def local_state(self, state: Mapping) -> Mapping:
        if "shards" in state:
            raise ValueError(
                "EarlyBirdSearch.load_state_dict: the state was saved by a search over "
                f"parameters sharded over {state['shards']['world']} ranks; load it into a "
                "search over the same sharded model"
            )
        return state


class _Group(Local):
    """A search whose ranks communicate over ``group``, with tensors on ``device`` (the
    parameters')."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def agree(self, description: Mapping, *, empty: bool = False) -> None:
        """Raise ValueError on every rank unless every rank describes the same search (and,
        sharded, every rank holds an element); one all-reduce, more only to explain."""
        digest = hashlib.sha256(repr(sorted(description.items())).encode()).digest()
        local = int.from_bytes(digest[:8], "little") & _CHECKSUM_MASK
        seen = torch.tensor([local, -local, int(empty)], device=self.device)
        dist.all_reduce(seen, dist.ReduceOp.MAX, group=self.group)
        high, negative_low, any_empty = seen.tolist()
        if high != -negative_low:
            described = [None] * self.world
            dist.all_gather_object(described, dict(description), group=self.group)
            rank = next(r for r, d in enumerate(described) if d != described[0])
            theirs, first = described[rank], described[0]
            key = next(k for k in {**first, **theirs} if theirs.get(k) != first.get(k))
            raise ValueError(
                f"EarlyBirdSearch: the ranks disagree on the search: rank {rank} has "
                f"{key}={theirs.get(key)!r}, rank 0 has {key}={first.get(key)!r}; "
                "every rank must build the search with the same settings over the same "
                "representative parameters"
            )
        if any_empty:
            flags = [None] * self.world
            dist.all_gather_object(flags, empty, group=self.group)
            raise ValueError(
                f"EarlyBirdSearch: rank {flags.index(True)} holds no element of the "
                f"representative parameters (sharded over {self.world} ranks); shard over "
                "fewer ranks or choose more representative parameters"
            )


class Replicated(_Group):
    """DDP: every rank holds every parameter, so every rank computes the whole mask; one
    all-reduce per check proves the masks equal."""

    def refuse_non_finite(self, counts: int) -> None:
        """This rank's parameters hold NaN (it raises next): join the check's all-reduce
        with the flag set, so that every other rank raises too."""
        flagged = torch.zeros(counts + 2, dtype=torch.int64, device=self.device)
        flagged[0] = 1
        dist.all_reduce(flagged, dist.ReduceOp.MAX, group=self.group)

    def reduce_counts(self, counts: torch.Tensor, row: torch.Tensor) -> list[int]:
        """The check's counts ``[non-finite, kept, differing...]`` (equal on every rank
        when the masks are), after proving the newest masks equal: one all-reduce (MAX)
        of the counts, the checksum and its negation."""
        checksum = mask_checksum(row).reshape(1)
        seen = torch.cat([counts, checksum, -checksum])
        dist.all_reduce(seen, dist.ReduceOp.MAX, group=self.group)
        *reduced, high, negative_low = seen.tolist()
        if reduced[0] == 0 and high != -negative_low:
            every = [torch.zeros_like(checksum) for _ in range(self.world)]
            dist.all_gather(every, checksum, group=self.group)
            sums = [int(s) for s in every]
            rank = next(r for r, s in enumerate(sums) if s != sums[0])
            raise ReplicasDivergedError(
                f"EarlyBirdSearch: rank {rank} (of {self.world}) computed another mask than "
                "rank 0, so the replicas' representative parameters differ; DDP keeps them "
                "equal, so a rank changed its model alone (or the ranks train different "
                "models). Nothing of the search changed."
            )
        return reduced


def mask_checksum(row: torch.Tensor) -> torch.Tensor:
    """An int64 checksum (0-d, in [0, 2**62)) of a packed row: its 32-bit halves weighted
    by fixed random odd weights and summed (mod 2**62): one flipped bit always changes
    it (an odd weight times 2**b, b < 32), several almost surely (a random linear hash)."""
    halves = row.view(torch.int32).to(torch.int64) & 0xFFFF_FFFF
    return (halves * _checksum_weights(halves.numel(), row.device)).sum() & _CHECKSUM_MASK


@functools.lru_cache(maxsize=4)
def _checksum_weights(count: int, device: torch.device) -> torch.Tensor:
    draw = torch.Generator().manual_seed(0x5EED)
    return (torch.randint(1, 1 << 31, (count,), generator=draw) | 1).to(device)


def _chunk_rows(rows: int, world: int, rank: int) -> int:
    """Rows of dim 0 that ``rank`` holds under DTensor's ``Shard(0)`` (torch.chunk)."""
    per_rank = -(-rows // world)
    return max(0, min(per_rank, rows - rank * per_rank))


class Sharded(_Group):
    """FSDP2: each rank holds a ``Shard(0)`` chunk of every representative parameter.

    What ``masks.compute_masks`` and ``radix_select.kth_magnitudes`` need of the shards:
    ``numels`` (the whole tensors' element counts), ``all_reduce`` (a sum over the
    ranks), ``all_gather`` and ``rank`` (this shard's place in index order).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], process_group) -> None:
        from torch.distributed.tensor import Shard

        first_name, first = next(iter(params.items()))
        mesh = first.device_mesh
        for name, param in params.items():
            if param.device_mesh != mesh:
                raise ValueError(
                    f"representative parameters {first_name!r} and {name!r} are sharded over "
                    "different device meshes; the search needs one"
                )
            if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
                raise ValueError(
                    f"representative parameter {name!r} is placed {tuple(param.placements)} "
                    f"on a {mesh.ndim}-D mesh; the search supports FSDP2's default, Shard(0) "
                    "on a 1-D mesh (no HSDP, no shard_placement_fn)"
                )
        group = mesh.get_group()
        if process_group is None:
            raise ValueError(
                "process_group=None (no collectives) cannot search sharded parameters: the "
                "threshold and the distances are sums over the shards; leave process_group "
                "at its default (the parameters' mesh)"
            )
        if process_group != WORLD and _ranks(_checked_group(process_group)) != _ranks(group):
            raise ValueError(
                f"process_group spans ranks {_ranks(process_group)}, but the representative "
                f"parameters are sharded over the mesh of ranks {_ranks(group)}; pass "
                "mesh.get_group() or leave process_group at its default"
            )
        super().__init__(group, first.to_local().device)
        self.mesh = mesh
        self.shapes = [param.shape for param in params.values()]
        self.numels = [param.numel() for param in params.values()]
        self.local_numels = [self.chunk_numel(shape, self.rank) for shape in self.shapes]
        for (name, param), numel in zip(params.items(), self.local_numels):
            if param.to_local().numel() != numel:
                raise ValueError(
                    f"representative parameter {name!r}: the local shard has "
                    f"{param.to_local().numel()} elements, Shard(0) over {self.world} ranks "
                    f"gives {numel}"
                )
        self.shards = self

    def chunk_numel(self, shape: torch.Size, rank: int) -> int:
        """Elements of a tensor of ``shape`` that ``rank`` holds."""
        return _chunk_rows(shape[0], self.world, rank) * math.prod(shape[1:])

    def agree(self, description: Mapping) -> None:
        super().agree(description, empty=sum(self.local_numels) == 0)

    # -- what the masks need ----------------------------------------------------------

    def all_reduce(self, counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=self.group)
        return counts

    def all_gather(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` of every rank, stacked in rank order: [world, *counts.shape]."""
        every = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(every, counts.contiguous(), group=self.group)
        return torch.stack(every)

    def reduce_counts(self, counts: torch.Tensor, row: torch.Tensor) -> list[int]:
        """The check's counts summed over the shards: one all-reduce."""
        return self.all_reduce(counts).tolist()

    # -- state and tickets ------------------------------------------------------------

    def _row_bytes(self, rank: int) -> list[int]:
        return [ops.packed_nbytes(self.chunk_numel(shape, rank)) for shape in self.shapes]

    def _padded(self, local: torch.Tensor) -> torch.Tensor:
        """A local row padded to rank 0's width (the widest), so that every rank's part
        of a DTensor has one size."""
        width = sum(self._row_bytes(0))
        padded = local.new_zeros(*local.shape[:-1], width)
        padded[..., : local.shape[-1]] = local
        return padded

    def _as_dtensor(self, local: torch.Tensor):
        from torch.distributed.tensor import DTensor, Shard

        padded = self._padded(local)
        return DTensor.from_local(padded, self.mesh, [Shard(local.dim() - 1)], run_check=False)

    def state_dict(self, state: dict) -> dict:
        """The search's state with every tensor a DTensor of a fixed layout, for
        ``torch.distributed.checkpoint`` (which saves a plain tensor once, from one
        rank): the window's rows, the newest mask and the ticket, each rank's packed
        row padded to the widest rank's. Every other entry is equal on every rank; the
        records and features, whose number grows, are one JSON string (the checkpoint
        would flatten a list of dicts into keys that a new search's state lacks)."""
        width = sum(self._row_bytes(self.rank))
        rows = state["window"]["rows"]
        if rows.shape[1] == 0:  # no check yet: the rows take their width at the first
            rows = rows.new_zeros(rows.shape[0], width)
        empty = rows.new_zeros(width)
        ticket = state["ticket"]
        history = {key: state[key] for key in _HISTORY}
        sharded = {k: v for k, v in state.items() if k not in ("newest", "ticket", *_HISTORY)}
        sharded["history"] = json.dumps(history)
        sharded["window"] = {
            "length": state["window"]["length"],
            "count": state["window"]["count"],
            "rows": self._as_dtensor(rows),
        }
        sharded["newest"] = self._as_dtensor(
            torch.cat(state["newest"]) if state["newest"] else empty
        )
        sharded["ticket_epoch"] = None if ticket is None else ticket["epoch"]
        sharded["ticket"] = self._as_dtensor(
            torch.cat(list(ticket["packed"].values())) if ticket is not None else empty
        )
        sharded["shards"] = {"world": self.world, "shapes": [tuple(s) for s in self.shapes]}
        return sharded

    def local_state(self, state: Mapping) -> dict:
        """The state :meth:`state_dict` made (after ``torch.distributed.checkpoint`` loaded
        it), as this rank's local state: checked against this sharding first."""
        saved = state.get("shards")
        expected = {"world": self.world, "shapes": [tuple(s) for s in self.shapes]}
        if saved is None:
            raise ValueError(
                "EarlyBirdSearch.load_state_dict: the state was saved by a search over "
                "unsharded parameters; this search's parameters are sharded over "
                f"{self.world} ranks"
            )
        if saved != expected:
            raise ValueError(
                "EarlyBirdSearch.load_state_dict: the state was saved by a search sharded "
                f"over {saved['world']} ranks with shapes {saved['shapes']}; this one is "
                f"sharded over {self.world} with {expected['shapes']} (resuming needs the "
                "same sharding)"
            )
        nbytes = self._row_bytes(self.rank)
        width = sum(nbytes)
        parts = {}
        for key, tensor in (
            ("rows", state["window"]["rows"]),
            ("newest", state["newest"]),
            ("ticket", state["ticket"]),
        ):
            local = local_tensor(tensor)
            if local.dtype != torch.uint8 or local.shape[-1] != sum(self._row_bytes(0)):
                raise ValueError(
                    f"EarlyBirdSearch.load_state_dict: saved {key} is {local.dtype} with local "
                    f"shape {tuple(local.shape)}, expected uint8 of width {sum(self._row_bytes(0))}"
                )
            parts[key] = local[..., :width]
        count = state["window"]["count"]
        newest = list(parts["newest"].split(nbytes)) if count else []
        names = state["names"]
        ticket = None
        if state["ticket_epoch"] is not None:
            ticket = {
                "epoch": state["ticket_epoch"],
                "packed": dict(zip(names, parts["ticket"].split(nbytes))),
                "shapes": {name: self._local_shape(i) for i, name in enumerate(names)},
            }
        local = {k: v for k, v in state.items() if k not in ("shards", "ticket_epoch", "history")}
        local.update(json.loads(state["history"]))
        local["window"] = {
            "length": state["window"]["length"],
            "numel": sum(self.local_numels),
            "rows": parts["rows"] if count else parts["rows"][:, :0],
            "count": count,
        }
        local["newest"], local["ticket"] = newest, ticket
        return local

    def _local_shape(self, index: int) -> torch.Size:
        shape = self.shapes[index]
        return torch.Size([_chunk_rows(shape[0], self.world, self.rank), *shape[1:]])

    def gather_ticket(self, ticket):
        """The ticket over the whole parameters, from each rank's ticket over its shards:
        one all-gather of the padded packed rows."""
        local = torch.cat(list(ticket.packed.values()))
        every = self.all_gather(self._padded(local))
        packed, shapes = {}, {}
        for index, name in enumerate(ticket.packed):
            parts = []
            for rank in range(self.world):
                nbytes = self._row_bytes(rank)
                start = sum(nbytes[:index])
                piece = every[rank, start : start + nbytes[index]]
                parts.append(ops.unpack_mask(piece, self.chunk_numel(self.shapes[index], rank)))
            packed[name] = ops.pack_mask(torch.cat(parts), 0.5)
            shapes[name] = self.shapes[index]
        return replace(ticket, packed=packed, shapes=shapes)


def holders(model_or_params, params: Mapping[str, torch.Tensor]) -> list[tuple]:
    """``(name, module, attribute, parameter)`` of each of ``params`` that a module of the
    model holds, so that :func:`check_held` can tell when a wrapper (``fully_shard``)
    replaced one after the search was built; none when parameters were given directly."""
    if not isinstance(model_or_params, nn.Module):
        return []
    where = {}
    for module in model_or_params.modules():
        for attribute, param in module.named_parameters(recurse=False):
            where.setdefault(id(param), (module, attribute))
    return [(name, *where[id(p)], p) for name, p in params.items() if id(p) in where]


def check_held(held: Sequence[tuple]) -> None:
    """Raise ValueError if the model no longer holds a representative parameter."""
    for name, module, attribute, param in held:
        if getattr(module, attribute, None) is not param:
            raise ValueError(
                f"representative parameter {name!r} was replaced in the model after the "
                "search was built (by fully_shard, or another wrapper that swaps "
                "parameters), so the search would rank stale values; build the search, and "
                "the optimizer, after sharding or wrapping the model"
            )


def gather_ticket(search, ticket=None):
    """The ticket of ``search`` (or ``ticket``, e.g. ``search.candidate()``) over the
    whole representative parameters. Sharded searches hold masks over their local shards
    (shaped like them); this all-gathers them, so every rank of the mesh must call it.
    Other searches' tickets are returned as they are."""
    ticket = search.ticket if ticket is None else ticket
    if ticket is None:
        raise ValueError("the search has no ticket yet; pass search.candidate()")
    shards = search.placement.shards
    return ticket if shards is None else shards.gather_ticket(ticket)
