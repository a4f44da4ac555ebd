"""Run a function on several gloo processes (CPU) from pytest, so that no bug can hang
the suite: every collective times out (``COLLECTIVE_TIMEOUT``) and so does the whole run.

``run_ranks(function, world, tmp_path)`` spawns ``world`` processes; each joins a gloo
group over a file store, calls ``function(rank, world, tmp_path)`` (an importable
module-level function) and saves what it returns; the parent returns the results in
rank order, or re-raises the first worker's exception with its traceback.
"""

import datetime
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
RUN_TIMEOUT_S = 300


def _worker(rank: int, world: int, function, tmp_path: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(str(tmp_path / "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        result = function(rank, world, tmp_path)
        torch.save(result, tmp_path / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(function, world: int, tmp_path: Path) -> list:
    """``function(rank, world, tmp_path)`` on ``world`` gloo processes: their results."""
    context = mp.start_processes(
        _worker, args=(world, function, tmp_path), nprocs=world, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{function.__name__} did not finish in {RUN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"result{rank}.pt", weights_only=False) for rank in range(world)]
