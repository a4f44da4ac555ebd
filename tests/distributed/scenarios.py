"""What each rank runs in the multi-process tests (``spawn.run_ranks``).

Every scenario returns plain data for the parent to assert on: one spawn per workload
(the processes' start, ~10 s, dominates), many checks inside. A step that must fail
records the error's type and message, so that the parent can check that every rank
raised (no rank left waiting in a collective) and what the message says.

Each rank also runs the same search in one process (``process_group=None``) over a
bare copy of the model with the same values: the reference the sharded and replicated
results must equal.
"""

import contextlib
import copy
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from worm_fast import WormAdamW, WormSGD
from worm_fast import distributed as wdist
from worm_fast import masks as mask_ops
from worm_fast.representative import select
from worm_fast.search import EarlyBirdSearch

# -------------------------------------------------------------------------- helpers


def outcome(action) -> tuple[str, str] | None:
    """None when ``action()`` returns, else its error's (type name, message)."""
    try:
        action()
    except Exception as error:  # the parent asserts on the type
        return type(error).__name__, str(error)
    return None


@contextlib.contextmanager
def counted_collectives(calls: list):
    """Record (collective, bytes this rank sends) of every torch.distributed collective."""
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
             "broadcast", "reduce_scatter_tensor")  # fmt: skip
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def collective(*args, **kwargs):
            tensor = args[1] if name in ("all_gather", "all_gather_into_tensor") else args[0]
            size = tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else None
            calls.append((name, size))
            return originals[name](*args, **kwargs)

        return collective

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def local_chunk(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` under ``Shard(0)`` (torch.chunk's rows)."""
    rows = -(-full.shape[0] // world)
    return full[rank * rows : (rank + 1) * rows]


def set_values(model: nn.Module, values: dict, rank: int, world: int) -> None:
    """Set the model's parameters to ``values`` (whole tensors by name), sharded or not."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = wdist.local_tensor(param)
            local.copy_(
                local_chunk(values[name], rank, world) if local is not param else values[name]
            )


def full_values(model: nn.Module) -> dict:
    """The whole parameters (gathered when sharded), by name."""
    return {
        name: (p.full_tensor() if wdist.local_tensor(p) is not p else p).detach().clone()
        for name, p in model.named_parameters()
    }


def packed(ticket) -> dict:
    return {name: mask.clone() for name, mask in ticket.packed.items()}


# ------------------------------------------------------------------------- models


class Tower(nn.Module):
    """Odd shapes: under Shard(0) over 2 ranks, ``a`` splits 5 + 4 rows, ``b`` 2 + 1,
    ``norm`` 4 + 3, and rank 1 holds none of ``c``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 9)
        self.norm = nn.BatchNorm1d(9)
        self.b = nn.Linear(9, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.norm(self.a(x)))))


TOWER_REPRESENTATIVE = ["a.weight", "norm.weight", "b.weight", "c.weight"]
TOWER_SEARCH = dict(mode="eb", window=3, stop_distance=0.05, prune_ratio=0.5,
                    representative=TOWER_REPRESENTATIVE)  # fmt: skip


def tower_values(step: int) -> dict:
    """Whole parameters at ``step`` of a trajectory that settles: a fixed draw plus noise
    that shrinks, on a 1/16 grid (many equal magnitudes: ties, ±0)."""
    torch.manual_seed(0)
    base = {name: p.detach() for name, p in Tower().named_parameters()}
    draw = torch.Generator().manual_seed(100 + step)
    values = {}
    for name, value in base.items():
        noise = torch.randn(value.shape, generator=draw) * 0.5**step
        values[name] = torch.round((value + noise) * 16) / 16
    return values


def cnn() -> nn.Module:
    """BatchNorm γ of 5 and 7 channels: uneven shards."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 7, 3), nn.BatchNorm2d(7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3),
    )  # fmt: skip


def cnn_batches(epoch: int, steps: int = 3):
    draw = torch.Generator().manual_seed(epoch)
    for _ in range(steps):
        yield torch.randn(8, 3, 8, 8, generator=draw), torch.randint(0, 3, (8,), generator=draw)


def train_epoch(model, optimizer, epoch: int) -> None:
    for x, y in cnn_batches(epoch):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


SEARCH = dict(mode="truncate", window=3, stop_distance=0.05, trigger_margin=0.05,
              prune_ratio=0.5, truncation=3e-3)  # fmt: skip
OPTIMIZER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


# ---------------------------------------------------------------------------- DDP


def ddp(rank: int, world: int, tmp_path: Path) -> dict:
    """DDP: names, the same decisions as one process, one collective per check, and every
    rank failing together on a diverged replica, a NaN or inf on one rank, or settings
    that differ."""
    result = {}
    torch.manual_seed(0)
    bare = cnn()
    reference = copy.deepcopy(bare)
    model = nn.parallel.DistributedDataParallel(bare)
    optimizer = WormSGD(model.parameters(), lr=0.1, momentum=0.9)
    search = EarlyBirdSearch(model, optimizer, **SEARCH)
    reference_optimizer = WormSGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference_search = EarlyBirdSearch(reference, reference_optimizer, process_group=None,
                                       **SEARCH)  # fmt: skip
    result["names"] = list(search.params)
    result["bare names"] = list(select(bare, "batchnorm"))
    result["calls per check"] = []
    for epoch in range(4):
        # Every rank trains on the same batches: DDP's mean of equal gradients is exact.
        train_epoch(model, optimizer, epoch)
        train_epoch(reference, reference_optimizer, epoch)
        with counted_collectives(calls := []):
            search.check()
        result["calls per check"].append(calls)
        reference_search.check()
    result["records"] = list(search.records)
    result["reference records"] = list(reference_search.records)
    result["candidate"] = packed(search.candidate())
    result["reference candidate"] = packed(reference_search.candidate())

    checks = len(search.records)
    with torch.no_grad():
        saved = bare[1].weight.clone()
        if rank == 1:  # this replica alone changes: its mask differs
            bare[1].weight.copy_(torch.arange(5.0))
    result["diverged"] = outcome(search.check)
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            bare[1].weight.copy_(saved)
            if rank == 1:
                bare[1].weight[2] = value
        result[f"{value} on rank 1"] = outcome(search.check)
    with torch.no_grad():
        bare[1].weight.copy_(saved)
    result["unchanged after errors"] = len(search.records) == checks
    result["check after errors"] = outcome(search.check)

    ratio = 0.5 if rank == 0 else 0.6
    result["settings differ"] = outcome(
        lambda: EarlyBirdSearch(model, optimizer, **{**SEARCH, "prune_ratio": ratio})
    )
    ratio = 0.5 if rank == 0 else 1.5  # invalid on rank 1 alone: still no hang
    result["invalid on one rank"] = outcome(
        lambda: EarlyBirdSearch(model, optimizer, **{**SEARCH, "prune_ratio": ratio})
    )
    return result


# --------------------------------------------------------------------------- FSDP2


def sharded_tower(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tower()
    fully_shard(model, mesh=mesh)
    return model


def fsdp(rank: int, world: int, tmp_path: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    result = {}
    result.update(fsdp_trajectories(rank, world, mesh))
    result.update(fsdp_thresholds(rank, world, mesh))
    result.update(fsdp_checkpoint(rank, world, mesh, tmp_path))
    result.update(fsdp_training(rank, world, mesh, tmp_path))
    result.update(fsdp_adamw(mesh))
    result.update(fsdp_bad_input(rank, world, mesh))
    return result


def fsdp_trajectories(rank: int, world: int, mesh) -> dict:
    """Each (scope, ties) over the same trajectory of values, sharded and in one process:
    records, every check's gathered mask, and the ticket."""
    result = {}
    reference_model = Tower()
    model = sharded_tower(mesh)
    for scope in ("global", "per_tensor"):
        for ties in ("early_bird", "exact"):
            settings = dict(TOWER_SEARCH, scope=scope, ties=ties)
            search = EarlyBirdSearch(model, **settings)
            reference = EarlyBirdSearch(reference_model, process_group=None, **settings)
            masks, reference_masks, calls = [], [], []
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                for step in range(12):
                    values = tower_values(step)
                    set_values(model, values, rank, world)
                    set_values(reference_model, values, 0, 1)
                    with counted_collectives(calls := []):
                        search.check()
                    reference.check()
                    masks.append(packed(wdist.gather_ticket(search, search.candidate())))
                    reference_masks.append(packed(reference.candidate()))
                    if reference.converged:
                        break
            result[(scope, ties)] = dict(
                records=search.records, reference_records=reference.records, masks=masks,
                reference_masks=reference_masks, calls_of_last_check=calls,
                warnings=[str(w.message) for w in warned],
                ticket=search.ticket and packed(wdist.gather_ticket(search)),
                reference_ticket=reference.ticket and packed(reference.ticket),
                local_ticket_shapes=search.ticket and dict(search.ticket.shapes),
            )  # fmt: skip
    return result


def fsdp_thresholds(rank: int, world: int, mesh) -> dict:
    """The threshold of the shards against the whole tensors', bit for bit, per dtype and
    prune ratio (±0, ties, subnormals, inf)."""
    result = {}
    model = sharded_tower(mesh)
    params = [p for name, p in model.named_parameters() if name in TOWER_REPRESENTATIVE]
    shards = wdist.placement(dict(enumerate(params))).shards
    draw = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        wholes = []
        for p in params:
            whole = torch.randn(p.shape, generator=draw).to(dtype)
            whole.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-40]).to(dtype)
            whole.view(-1)[-1] = float("inf")
            wholes.append(whole)
        local = [local_chunk(w, rank, world) for w in wholes]
        for ratio in (0.0, 0.3, 0.5, 0.97):
            found = mask_ops.global_threshold(local, ratio, shards=shards)
            expected = mask_ops.global_threshold(wholes, ratio)
            sorted_whole = torch.cat([w.reshape(-1) for w in wholes]).abs().sort().values
            kth = sorted_whole[int(sorted_whole.numel() * ratio)]
            result[("threshold", str(dtype), ratio)] = (found.item(), expected.item(), kth.item())
    return result


def fsdp_checkpoint(rank: int, world: int, mesh, tmp_path: Path) -> dict:
    """A sharded search saved with torch.distributed.checkpoint after check 3, loaded by a
    new search, continues exactly as the uninterrupted one."""
    import torch.distributed.checkpoint as dcp

    model = sharded_tower(mesh)
    settings = dict(TOWER_SEARCH, ties="exact")
    search = EarlyBirdSearch(model, **settings)
    resumed = None
    for step in range(6):
        set_values(model, tower_values(step), rank, world)
        if resumed is not None:
            resumed.check()
        search.check()
        if step == 2:
            dcp.save({"search": search.state_dict()}, checkpoint_id=tmp_path / "checkpoint")
            resumed = EarlyBirdSearch(model, **settings)
            state = {"search": resumed.state_dict()}
            dcp.load(state, checkpoint_id=tmp_path / "checkpoint")
            resumed.load_state_dict(state["search"])
    bare = EarlyBirdSearch(Tower(), process_group=None, **settings)
    return {
        "resumed records": resumed.records,
        "uninterrupted records": search.records,
        "resumed candidate": packed(wdist.gather_ticket(resumed, resumed.candidate())),
        "uninterrupted candidate": packed(wdist.gather_ticket(search, search.candidate())),
        "unsharded state into sharded": outcome(lambda: search.load_state_dict(bare.state_dict())),
        "sharded state into unsharded": outcome(lambda: bare.load_state_dict(search.state_dict())),
    }


def sharded_cnn_run(mesh):
    """A sharded CNN, its WormSGD and its search."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = cnn()
    fully_shard(model, mesh=mesh)
    optimizer = WormSGD(model.parameters(), **OPTIMIZER)
    return model, optimizer, EarlyBirdSearch(model, optimizer, **SEARCH)


def fsdp_training(rank: int, world: int, mesh, tmp_path: Path) -> dict:
    """FSDP2 training with WormSGD truncating local shards, against one process: the
    same records, ticket and parameters; and a run resumed from a checkpoint of the
    model, the optimizer (torch.distributed.checkpoint.state_dict) and the search goes
    on exactly as the uninterrupted one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(0)
    reference = cnn()
    reference_optimizer = WormSGD(reference.parameters(), **OPTIMIZER)
    reference_search = EarlyBirdSearch(reference, reference_optimizer,
                                       process_group=None, **SEARCH)  # fmt: skip
    model, optimizer, search = sharded_cnn_run(mesh)
    for epoch in range(4):
        train_epoch(model, optimizer, epoch)
        train_epoch(reference, reference_optimizer, epoch)
        search.check()
        reference_search.check()
        if epoch == 1:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            saved = {"model": model_state, "optim": optimizer_state, "search": search.state_dict()}
            dcp.save(saved, checkpoint_id=tmp_path / "training")
    result = {
        "training records": list(search.records),
        "training reference records": reference_search.records,
        "training candidate": packed(wdist.gather_ticket(search, search.candidate())),
        "training reference candidate": packed(reference_search.candidate()),
        "training values": full_values(model),
        "training reference values": full_values(reference),
        "optimizer masks": [m.numel() for m in optimizer.truncation_masks.values()],
    }

    resumed_model, resumed_optimizer, resumed = sharded_cnn_run(mesh)
    model_state, optimizer_state = get_state_dict(resumed_model, resumed_optimizer)
    state = {"model": model_state, "optim": optimizer_state, "search": resumed.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "training")
    set_state_dict(resumed_model, resumed_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])  # fmt: skip
    # torch's optimizer state dict keeps no truncation: the search hands it back.
    result["truncation after the optimizer loaded"] = resumed_optimizer.truncation
    resumed.load_state_dict(state["search"])
    result["truncation after the search loaded"] = resumed_optimizer.truncation
    for epoch in range(2, 4):
        train_epoch(resumed_model, resumed_optimizer, epoch)
        resumed.check()
    result["resumed training records"] = resumed.records
    result["resumed training values"] = full_values(resumed_model)
    return result


def fsdp_adamw(mesh) -> dict:
    """FSDP2 training with WormAdamW truncating local shards equals one process."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = cnn()
    reference = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    runs = []
    for net, group in ((model, wdist.WORLD), (reference, None)):
        optimizer = WormAdamW(net.parameters(), lr=1e-2)
        search = EarlyBirdSearch(net, optimizer, process_group=group, **SEARCH)
        for epoch in range(2):
            search.check()  # truncating from the first check
            train_epoch(net, optimizer, epoch)
        runs.append((search.records, full_values(net)))
    return {"adamw": runs}


def fsdp_bad_input(rank: int, world: int, mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    result = {}
    settings = dict(mode="eb", representative=TOWER_REPRESENTATIVE)
    torch.manual_seed(0)
    early_model = Tower()
    early = EarlyBirdSearch(early_model, **settings)
    fully_shard(early_model, mesh=mesh)
    result["built before fully_shard"] = outcome(early.check)

    singletons = [dist.new_group([r]) for r in range(world)]
    model = sharded_tower(mesh)
    result["group not the mesh's"] = outcome(
        lambda: EarlyBirdSearch(model, process_group=singletons[rank], **settings)
    )
    result["no group"] = outcome(lambda: EarlyBirdSearch(model, process_group=None, **settings))
    result["window differs"] = outcome(lambda: EarlyBirdSearch(model, **settings, window=3 + rank))
    result["gradient mode"] = outcome(
        lambda: EarlyBirdSearch(model, **{**settings, "mode": "gradient"})
    )
    search = EarlyBirdSearch(model, **settings)
    set_values(model, tower_values(0), rank, world)
    search.check()
    for value in (float("nan"), float("inf")):
        values = tower_values(1)
        values["a.weight"][-1, -1] = value  # in rank 1's shard
        set_values(model, values, rank, world)
        result[f"{value} in rank 1's shard"] = outcome(search.check)
    result["unchanged after errors"] = len(search.records) == 1
    set_values(model, tower_values(1), rank, world)
    result["check after errors"] = outcome(search.check)
    return result
