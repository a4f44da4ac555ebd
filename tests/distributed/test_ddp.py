"""EarlyBirdSearch under DDP, 2 gloo processes (``scenarios.ddp``): the bare model's
names, the decisions of one process, one tiny all-reduce per check, and every rank
failing together, naming the culprit, when the replicas or their settings differ."""

import pytest
import torch

from tests.distributed import scenarios
from tests.distributed.spawn import run_ranks

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(scenarios.ddp, WORLD, tmp_path_factory.mktemp("ddp"))


def test_names_are_the_bare_models(ranks):
    for result in ranks:
        assert result["names"] == result["bare names"] == ["1.weight", "4.weight"]


def test_every_rank_decides_as_one_process(ranks):
    for result in ranks:
        assert len(result["records"]) == 4 and result["records"][-1].window_full
        assert result["records"] == result["reference records"]
        for name, mask in result["reference candidate"].items():
            assert torch.equal(result["candidate"][name], mask), name


def test_a_check_is_one_all_reduce_of_the_counts_and_the_checksum(ranks):
    window = scenarios.SEARCH["window"]
    for result in ranks:
        for check, calls in enumerate(result["calls per check"]):
            # non-finite, kept, a count per older mask in the window, checksum, -checksum
            counts = 2 + min(check, window - 1) + 2
            assert calls == [("all_reduce", 8 * counts)], check


def test_a_diverged_replica_fails_every_rank_naming_it(ranks):
    for result in ranks:
        kind, message = result["diverged"]
        assert kind == "ReplicasDivergedError"
        assert "rank 1 (of 2) computed another mask than rank 0" in message
        assert "Nothing of the search changed" in message


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_value_on_one_replica_stops_every_rank(ranks, value):
    for rank, result in enumerate(ranks):
        kind, message = result[f"{value} on rank 1"]
        assert kind == "NonFiniteError"
        where = "1.weight: 1 of 5" if rank == 1 else "on another rank; none on this one"
        assert where in message


def test_the_search_is_unchanged_and_goes_on_after_those_errors(ranks):
    for result in ranks:
        assert result["unchanged after errors"]
        assert result["check after errors"] is None


@pytest.mark.parametrize("case", ["settings differ", "invalid on one rank"])
def test_ranks_with_different_settings_fail_at_construction(ranks, case):
    other = {"settings differ": 0.6, "invalid on one rank": 1.5}[case]
    for result in ranks:
        kind, message = result[case]
        assert kind == "ValueError"
        assert f"rank 1 has prune_ratio={other}, rank 0 has prune_ratio=0.5" in message
