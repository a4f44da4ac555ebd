"""``worm-fast`` under torchrun: ranks read from the environment, each global batch split
over the ranks, a DDP search equal to its single-process twin, text runs, refusals, and a
rank that disagrees or dies.

The multi-process tests start 2 gloo ranks on the CPU in subprocesses (torchrun, or two
processes given torchrun's variables by hand), each with a short collective timeout and a
hard wall-clock limit, so that a bug fails the test instead of hanging it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from worm_fast import cli
from worm_fast.experiments.parallel import SINGLE_PROCESS, DataParallel
from worm_fast.experiments.pipeline import make_search, ticket_digest
from worm_fast.experiments.workloads import build_workload, make_optimizer

try:  # the text test's checkpoint needs transformers; the others do not
    from tests.experiments.test_text import tiny_checkpoint, tokenizer  # noqa: F401 (fixtures)
except pytest.skip.Exception:

    @pytest.fixture
    def tiny_checkpoint():
        pytest.skip("the text checkpoint needs transformers")


ROOT = Path(__file__).resolve().parents[2]
LIMIT_SECONDS = 240  # a whole multi-process command, start to exit
TIMEOUT = ["--collective-timeout", "30"]
# A search that triggers before it converges (window 2, first mask at initialization,
# stop below 2 %, trigger below 22 %), so WORM's truncation runs under DDP too.
CNN_ARGS = [
    "--model", "resnet20", "--width", "0.25", "--train-subset", "96", "--test-subset", "64",
    "--batch-size", "32", "--epochs", "3", "--retrain-epochs", "1", "--window", "2",
    "--first-check", "init", "--stop-distance", "0.02", "--trigger-margin", "0.2",
    "--lr", "0.05", "--no-progress", "--no-plots", *TIMEOUT,
]  # fmt: skip
CHECK_COLUMNS = ("epoch", "d_max", "d_avg", "r", "triggered", "converged", "window_full")


def _environment(**variables) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **variables}


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each process's exit status and output; processes still running at the limit are
    killed (with their children) and the test fails."""
    deadline = time.monotonic() + LIMIT_SECONDS
    finished = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for running in processes:
                os.killpg(running.pid, signal.SIGKILL)
            pytest.fail(f"a rank was still running after {LIMIT_SECONDS} s: it hung")
        finished.append((process.returncode, output))
    return finished


def _start(command: list[str], **variables) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env=_environment(**variables), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def torchrun(*args: str) -> tuple[int, str]:
    """``torchrun --nproc-per-node 2 -m worm_fast.cli ARGS``: exit status and output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "worm_fast.cli", *args]  # fmt: skip
    ((code, output),) = _finish([_start(command)])
    return code, output


def by_hand(args_of_rank: list[list[str]]) -> list[subprocess.Popen]:
    """One ``worm-fast`` process per rank, given torchrun's variables by hand, so each rank
    can get its own arguments (or be killed on its own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = dict(WORLD_SIZE=str(len(args_of_rank)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    command = [sys.executable, "-m", "worm_fast.cli"]
    return [
        _start([*command, *args], RANK=str(rank), LOCAL_RANK=str(rank), **world)
        for rank, args in enumerate(args_of_rank)
    ]


# -- one process: the ranks, their data, the refusals ----------------------------------------


def test_ranks_come_from_torchruns_variables():
    assert DataParallel.from_environment({}) is SINGLE_PROCESS
    ranks = DataParallel.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.launched) == (1, 2, 1, True)
    assert not ranks.is_main and ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="but not WORLD_SIZE, LOCAL_RANK: start it with torchrun"):
        DataParallel.from_environment({"RANK": "0"})
    with pytest.raises(ValueError, match="must be integers"):
        DataParallel.from_environment({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        DataParallel.from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="one GPU per rank"):
        ranks.device("cuda:0")


@pytest.mark.parametrize("samples", [12, 11])  # 11: the sampler repeats one to even the ranks
def test_each_global_batch_is_split_over_the_ranks(samples):
    dataset = TensorDataset(torch.arange(samples))
    ranks = [DataParallel(rank=r, world_size=2, launched=True) for r in range(2)]
    loaders = [rank.train_loader(dataset, 4, seed=3) for rank in ranks]
    single = SINGLE_PROCESS.train_loader(dataset, 4, seed=3)
    passes = []
    for _ in range(2):
        steps = [[batch.tolist() for (batch,) in parts] for parts in zip(*loaders, strict=True)]
        assert len(steps) == len(single) == -(-samples // 4)
        assert all(len(part) <= 2 for parts in steps for part in parts)  # 4 / 2 ranks
        seen = sorted(i for parts in steps for part in parts for i in part)
        assert set(seen) == set(range(samples)) and len(seen) == samples + samples % 2
        passes.append(steps)
    assert passes[0] != passes[1]  # a new order at every pass, as in one process
    shards = [rank.eval_loader(dataset, 5, seed=3) for rank in ranks]
    assert [i for shard in shards for (batch,) in shard for i in batch.tolist()] == list(
        range(samples)
    )
    with pytest.raises(ValueError, match=r"global batch.*multiple of 2"):
        ranks[0].train_loader(dataset, 5, seed=3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--batch-size", "33"], "multiple of 2"),
        (["search", "--device", "cuda:1"], "one GPU per rank"),
        (["search", "--collective-timeout", "0"], "--collective-timeout must be"),
        (["rl", "train", "--trajectories", "t", "--holdout-seeds", "0"], "runs in one process"),
    ],
)
def test_cli_under_torchrun_refuses_before_joining_the_ranks(
    args, message, monkeypatch, tmp_path, capsys
):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("worm-fast") and message in error
    assert not (tmp_path / "out").exists()


# -- two ranks ---------------------------------------------------------------------------------


def micro_batch_twin(config, ranks: int):
    """What ``ranks`` DDP ranks compute, in one process: every global batch split into the
    ranks' parts, each through forward and backward on its own (so each BatchNorm sees
    what it sees on its rank) with the loss divided by ``ranks``, the gradients
    accumulated, one step. Returns the search and each step's mean loss."""
    workload = build_workload(config)
    model, dataset = workload.model, workload.train_loader.dataset
    loaders = [
        DataParallel(rank=rank, world_size=ranks, launched=True).train_loader(
            dataset, config.batch_size, seed=config.seed
        )
        for rank in range(ranks)
    ]
    optimizer = make_optimizer(config, model.parameters())
    search = make_search(config, model, optimizer)
    losses = []
    if config.first_check == "init":
        search.check()
    for _ in range(config.max_epochs):
        model.train()
        for parts in zip(*loaders, strict=True):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for images, labels in parts:
                loss = torch.nn.functional.cross_entropy(model(images), labels) / ranks
                loss.backward()
                step_loss += loss.item()
            optimizer.step()
            losses.append(step_loss)
        if search.check().converged:
            break
    return search, losses


def test_ddp_search_matches_one_process_with_the_ranks_micro_batches(tmp_path):
    code, output = torchrun("search", *CNN_ARGS, "--out", str(tmp_path))
    assert code == 0, output
    assert output.count("Pre-Pruned Acc.") == 1  # rank 0 alone prints the table
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["environment"]["data_parallel"] == {"world_size": 2, "process_group": "gloo"}
    (run,) = document["runs"]
    assert run["status"] == "complete"
    search_rows = [row for row in run["rows"] if row["phase"] == "search"]

    config = cli._config(cli.build_parser().parse_args(["search", *CNN_ARGS]))
    twin, twin_losses = micro_batch_twin(config, ranks=2)
    assert [{key: row[key] for key in CHECK_COLUMNS} for row in search_rows] == [
        {key: getattr(record, key) for key in CHECK_COLUMNS} for record in twin.records
    ]
    assert twin.triggered_at is not None  # the comparison covered truncated training
    assert run["metrics"]["trigger_epoch"] == twin.triggered_at
    assert run["metrics"]["search_epochs"] == twin.records[-1].epoch
    assert run["metrics"]["ticket_sha256"] == ticket_digest(twin.candidate())
    assert run["metrics"]["ticket_density"] == twin.candidate().density
    # Each reported batch loss is the global batch's: the mean of the ranks' losses.
    reported = [loss for row in search_rows[1:] for loss in row["batch_losses"]]
    assert reported == pytest.approx(twin_losses, rel=1e-5)


def test_cnn_sweep_under_torchrun_starts_every_variant_identically(tmp_path):
    args = ["sweep", "--truncations", "1", "0.1", *CNN_ARGS, "--first-check", "epoch",
            "--epochs", "2", "--out", str(tmp_path)]  # fmt: skip
    code, output = torchrun(*args)
    assert code == 0, output
    document = json.loads((tmp_path / "results.json").read_text())
    plain, truncated = document["runs"]
    assert (plain["variant"], truncated["variant"]) == ("r = 1", "r = 0.1")
    assert {plain["status"], truncated["status"]} == {"complete"}
    # Same weights, same batches: the first epoch, before any check, is the same.
    assert plain["rows"][0]["batch_losses"] == truncated["rows"][0]["batch_losses"]
    assert plain["rows"][1]["batch_losses"] != truncated["rows"][1]["batch_losses"]


def test_text_compare_under_torchrun(tmp_path, tiny_checkpoint):
    args = ["compare", "--task", "rt-polarity", "--model-path", tiny_checkpoint,
            "--train-subset", "48", "--test-subset", "32", "--max-length", "32",
            "--batch-size", "16", "--epochs", "2", "--window", "2", "--retrain-epochs", "1",
            "--lr", "1e-3", "--no-progress", *TIMEOUT]  # fmt: skip
    code, output = torchrun(*args, "--out", str(tmp_path))
    assert code == 0, output
    assert output.count("| Pre-Pruned Accuracy |") == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["environment"]["data_parallel"]["world_size"] == 2
    eb, worm = document["runs"]
    assert (eb["status"], worm["status"]) == ("complete", "complete")
    for entry in (eb, worm):
        assert [row["steps"] for row in entry["rows"] if row["phase"] == "search"] == [3, 3]
        assert entry["metrics"]["ticket_density"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "mask_distance.png").read_bytes()[:4] == b"\x89PNG"


def test_ranks_given_different_options_refuse_together(tmp_path):
    args = ["search", *CNN_ARGS, "--out", str(tmp_path)]
    (code_0, out_0), (code_1, out_1) = _finish(by_hand([args, [*args, "--seed", "1"]]))
    assert (code_0, code_1) == (2, 2), out_0 + out_1
    assert "ranks disagree on the command line: rank 1 has seed=1 but rank 0 has seed=0" in out_0
    assert "rank 1 of 2" in out_1
    assert not (tmp_path / "results.json").exists()


def test_a_rank_that_dies_does_not_leave_the_other_waiting(tmp_path):
    args = ["search", *CNN_ARGS, "--epochs", "50", "--stop-distance", "1e-9",
            "--out", str(tmp_path)]  # fmt: skip
    rank_0, rank_1 = by_hand([args, args])
    deadline = time.monotonic() + LIMIT_SECONDS
    while not (tmp_path / "results.json").exists():  # rank 0 wrote its first row
        if rank_0.poll() is not None or rank_1.poll() is not None:
            pytest.fail(f"a rank ended before the run began: {_finish([rank_0, rank_1])}")
        assert time.monotonic() < deadline, "the run did not begin"
        time.sleep(0.2)
    rank_1.kill()
    killed_at = time.monotonic()
    ((code, output),) = _finish([rank_0])
    rank_1.communicate()
    assert code not in (0, None), output
    assert time.monotonic() - killed_at < 30 + 15  # at most the collective timeout, and exit
    # gloo's own words: the peer's connection closed or reset, or the collective timed out.
    assert re.search("remote worker|Timed out", output), output[-2000:]
