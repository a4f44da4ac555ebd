"""Data parallelism for the harness: one process, or one rank of several under torchrun.

``torchrun --nproc-per-node N`` starts N copies of a command and tells each its place
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). :meth:`DataParallel.from_environment` reads
them; with none set the run is one process (:data:`SINGLE_PROCESS`) and nothing here
changes it. Under torchrun, every rank runs the same search:

* the model trains wrapped in DistributedDataParallel (gloo on the CPU, NCCL on CUDA,
  one GPU per rank: ``cuda:LOCAL_RANK``), so its parameters stay identical on every
  rank and every rank's search takes the same decisions;
* each global batch of ``--batch-size`` samples is split over the ranks
  (DistributedSampler: a new seeded order at every pass, the same on every rank;
  ``batch_size / N`` samples per rank, which must divide evenly);
* evaluation is split into contiguous shards, one per rank, of the model with rank
  0's buffers (BatchNorm's running statistics, which DDP broadcasts before every
  training step anyway), and the correct counts are summed: every rank gets the same
  accuracy. Training losses and accuracies are summed over the ranks the same way.

Every collective has the process group's timeout, so a rank that fails or stops
answering makes the others fail too instead of waiting for ever.
"""

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from worm_fast.experiments.data import make_loader

# What torchrun sets for every rank it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# torch's own default for gloo; a training epoch between two collectives must fit in it.
DEFAULT_TIMEOUT_SECONDS = 1800.0


class _PassSeededSampler(DistributedSampler):
    """DistributedSampler that calls ``set_epoch`` itself at every pass (0, 1, …), so the
    loader draws a new order each pass, as the single-process seeded loader does, and the
    search and retraining phases sharing a loader never repeat one."""

    def __iter__(self) -> Iterator:
        indices = super().__iter__()  # the whole pass's indices, drawn now
        self.set_epoch(self.epoch + 1)
        return indices


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of a run (``launched``: under torchrun, where
    even a world of one trains through DistributedDataParallel)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "DataParallel":
        """The ranks torchrun describes in ``environ``; one process when it describes none."""
        found = {name: environ[name] for name in TORCHRUN_VARIABLES if name in environ}
        if not found:
            return SINGLE_PROCESS
        if len(found) < len(TORCHRUN_VARIABLES):
            missing = [name for name in TORCHRUN_VARIABLES if name not in found]
            raise ValueError(
                f"torchrun sets {', '.join(TORCHRUN_VARIABLES)} for every rank; this process "
                f"has {', '.join(found)} but not {', '.join(missing)}: start it with torchrun"
            )
        try:
            rank, world_size, local_rank = (int(found[name]) for name in TORCHRUN_VARIABLES)
        except ValueError:
            raise ValueError(f"torchrun's {found} must be integers") from None
        if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
            raise ValueError(
                f"torchrun's RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} "
                "must satisfy 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, launched=True)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results, draws progress bars and prints tables."""
        return self.rank == 0

    def describe(self) -> dict:
        """For results.json: how many ranks ran, and how they talked."""
        backend = dist.get_backend() if dist.is_initialized() else None
        return {"world_size": self.world_size, "process_group": backend}

    def device(self, device: str) -> str:
        """The device this rank trains on: under torchrun ``cuda`` is ``cuda:LOCAL_RANK``."""
        if not self.launched:
            return device
        try:
            kind = torch.device(device)
        except (RuntimeError, TypeError):
            return device  # RunConfig names what is wrong with it
        if kind.type == "cuda" and kind.index is None:
            return f"cuda:{self.local_rank}"
        if kind.type != "cpu":
            raise ValueError(
                f"under torchrun, --device is cpu (gloo) or cuda (NCCL, one GPU per rank: "
                f"cuda:LOCAL_RANK), got {device!r}"
            )
        return device

    def per_rank_batch(self, batch_size: int) -> int:
        """Each rank's share of the global batch ``batch_size``."""
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size (--batch-size) {batch_size} is the global batch, split over "
                f"the {self.world_size} ranks: it must be a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    @contextmanager
    def process_group(self, device: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        """The process group of the ranks (gloo for the CPU, NCCL for CUDA), its collectives
        timing out after ``timeout`` seconds, destroyed on the way out however it is left.
        Nothing for one process."""
        if not self.launched:
            yield
            return
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialized")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        try:
            yield
        finally:
            dist.destroy_process_group()

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), on every rank, in rank order."""
        if not self.launched:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def check_same_everywhere(self, what: str, values: Mapping) -> None:
        """Raise ValueError, on every rank, when some rank's ``values`` differ from rank
        0's, naming the first such rank and key: ranks that disagree on a run's settings
        would train different models while looking like one run."""
        first, *others = self.gather(dict(values))
        for rank, theirs in enumerate(others, start=1):
            for key in dict.fromkeys([*first, *theirs]):
                if theirs.get(key) != first.get(key):
                    raise ValueError(
                        f"the ranks disagree on the {what}: rank {rank} has {key}="
                        f"{theirs.get(key)!r} but rank 0 has {key}={first.get(key)!r}"
                    )

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the training steps see it: in DistributedDataParallel under
        torchrun (its construction broadcasts rank 0's parameters and buffers)."""
        if not self.launched:
            return model
        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def train_loader(
        self, dataset: Dataset, batch_size: int, *, seed: int, collate_fn: Callable | None = None
    ) -> DataLoader:
        """Shuffled batches of ``batch_size`` (global) samples: in one process the seeded
        loader of :func:`~worm_fast.experiments.data.make_loader`; under torchrun this
        rank's ``batch_size / N`` of each, from a DistributedSampler seeded with ``seed``
        (which repeats samples to give every rank as many when N does not divide the
        dataset)."""
        if not self.launched:
            return make_loader(dataset, batch_size, shuffle=True, seed=seed, collate_fn=collate_fn)
        sampler = _PassSeededSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        return DataLoader(
            dataset, batch_size=self.per_rank_batch(batch_size), sampler=sampler,
            collate_fn=collate_fn,
        )  # fmt: skip

    def eval_loader(
        self, dataset: Dataset, batch_size: int, *, seed: int, collate_fn: Callable | None = None
    ) -> DataLoader:
        """``dataset`` in order, in batches of ``batch_size``: under torchrun only this
        rank's contiguous shard (possibly empty), the shards covering it exactly once."""
        if self.launched:
            total = len(dataset)
            start, end = (total * rank // self.world_size for rank in (self.rank, self.rank + 1))
            dataset = Subset(dataset, range(start, end))
        return make_loader(dataset, batch_size, shuffle=False, seed=seed, collate_fn=collate_fn)

    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tensors`` summed over the ranks, in one collective (in float64 under
        torchrun: counts stay exact); unchanged in one process."""
        if not self.launched:
            return tensors
        flat = torch.cat(
            [t.detach().reshape(-1).to(tensors[0].device, torch.float64) for t in tensors]
        )
        dist.all_reduce(flat)
        parts = flat.split([t.numel() for t in tensors])
        return tuple(part.view(t.shape) for part, t in zip(parts, tensors))

    def share_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers of ``model`` (BatchNorm's running statistics,
        which each rank updates with its own batches), so all evaluate the same model."""
        if self.launched:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


SINGLE_PROCESS = DataParallel()

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "SINGLE_PROCESS", "TORCHRUN_VARIABLES", "DataParallel"]
