"""EarlyBirdSearch over FSDP2 (fully_shard) parameters, 2 gloo processes
(``scenarios.fsdp``): the same threshold (bit for bit), distances, masks, ticket and
records as one process on the whole tensors, from a few small collectives per check;
training with WormSGD on local shards; torch.distributed.checkpoint; bad input."""

import struct

import pytest
import torch

from tests.distributed import scenarios
from tests.distributed.spawn import run_ranks

WORLD = 2
CASES = [(scope, ties) for scope in ("global", "per_tensor") for ties in ("early_bird", "exact")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(scenarios.fsdp, WORLD, tmp_path_factory.mktemp("fsdp"))


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def assert_masks_equal(found: dict, expected: dict, what: str) -> None:
    assert list(found) == list(expected), what
    for name, mask in expected.items():
        assert torch.equal(found[name], mask), f"{what}: {name}"


def test_the_threshold_of_the_shards_is_the_whole_tensors_bit_for_bit(ranks):
    for result in ranks:
        thresholds = {key: value for key, value in result.items() if key[0] == "threshold"}
        assert len(thresholds) == 16  # 4 dtypes x 4 prune ratios
        for key, (found, expected, kth) in thresholds.items():
            assert bits(found) == bits(expected) == bits(kth), key


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_sharded_search_equals_one_process(ranks, case):
    for result in ranks:
        run = result[case]
        assert run["records"] == run["reference_records"]
        assert any(r.d_max for r in run["records"])  # the masks did move
        assert len(run["masks"]) == len(run["records"])
        for check, (found, expected) in enumerate(zip(run["masks"], run["reference_masks"])):
            assert_masks_equal(found, expected, f"check {check + 1}")
        assert run["records"][-1].converged
        assert_masks_equal(run["ticket"], run["reference_ticket"], "ticket")
        # The ties warning says the same (from the counts of every shard).
        assert run["warnings"][::2] == run["warnings"][1::2]


def test_a_sharded_ticket_holds_the_local_shards_masks(ranks):
    # Tower's a, norm, b, c under Shard(0) over 2 ranks: 5 + 4, 5 + 4, 2 + 1, 1 + 0 rows.
    expected = [
        {"a.weight": (5, 5), "norm.weight": (5,), "b.weight": (2, 9), "c.weight": (1, 3)},
        {"a.weight": (4, 5), "norm.weight": (4,), "b.weight": (1, 9), "c.weight": (0, 3)},
    ]
    for result, shapes in zip(ranks, expected):
        found = result[("global", "exact")]["local_ticket_shapes"]
        assert {name: tuple(shape) for name, shape in found.items()} == shapes


def test_collectives_of_a_check(ranks):
    # float32 keys (31 bits) in three passes of 11, 11 and 9 bits: [rows, 2**bits + 2]
    # int64 counts each; then the check's counts (non-finite, kept, 2 older masks).
    tensors = len(scenarios.TOWER_REPRESENTATIVE)
    for result in ranks:
        for scope, ties in CASES:
            rows = 1 if scope == "global" else tensors
            histograms = [("all_reduce", rows * (2**b + 2) * 8) for b in (11, 11, 9)]
            exact = [("all_gather", 2 * tensors * 8)] if ties == "exact" else []
            counts = [("all_reduce", 4 * 8)]
            settled = [("all_reduce", tensors * 8)]  # once: has a tensor lost every element?
            assert result[(scope, ties)]["calls_of_last_check"] == (
                histograms + exact + counts + settled
            )


def test_checkpoint_round_trip_resumes_exactly(ranks):
    for result in ranks:
        assert len(result["resumed records"]) == 6
        assert result["resumed records"] == result["uninterrupted records"]
        assert_masks_equal(result["resumed candidate"], result["uninterrupted candidate"], "")


def test_states_of_another_sharding_are_refused(ranks):
    for result in ranks:
        kind, message = result["unsharded state into sharded"]
        assert kind == "ValueError" and "saved by a search over unsharded parameters" in message
        kind, message = result["sharded state into unsharded"]
        assert kind == "ValueError" and "sharded over 2 ranks" in message


def test_training_on_local_shards_equals_one_process(ranks):
    for result in ranks:
        records = result["training records"]
        assert records == result["training reference records"]
        assert records[0].r < 1  # truncating from the first check
        assert_masks_equal(result["training candidate"], result["training reference candidate"],
                           "candidate")  # fmt: skip
        values, expected = result["training values"], result["training reference values"]
        for name, value in expected.items():
            # The same float operations on the same values: bitwise equal.
            assert torch.equal(values[name], value), name
        # The optimizer holds the local shards' masks (5 and 7 channels: 1 word each).
        assert result["optimizer masks"] == [8, 8]


def test_training_with_wormadamw_on_local_shards_equals_one_process(ranks):
    for result in ranks:
        (records, values), (expected_records, expected) = result["adamw"]
        assert records == expected_records and records[0].r < 1
        for name, value in expected.items():
            assert torch.equal(values[name], value), name


def test_training_resumed_from_a_checkpoint_goes_on_exactly(ranks):
    for result in ranks:
        assert result["truncation after the optimizer loaded"] == 1.0
        assert result["truncation after the search loaded"] == scenarios.SEARCH["truncation"]
        assert result["resumed training records"] == result["training records"]
        values, expected = result["resumed training values"], result["training values"]
        for name, value in expected.items():
            assert torch.equal(values[name], value), name


def test_a_search_built_before_fully_shard_refuses_to_check(ranks):
    for result in ranks:
        kind, message = result["built before fully_shard"]
        assert kind == "ValueError"
        assert "'a.weight' was replaced in the model after the search was built" in message


def test_a_process_group_other_than_the_mesh_is_refused(ranks):
    for rank, result in enumerate(ranks):
        kind, message = result["group not the mesh's"]
        assert kind == "ValueError"
        assert f"spans ranks [{rank}], but" in message and "mesh of ranks [0, 1]" in message
        kind, message = result["no group"]
        assert kind == "ValueError" and "cannot search sharded parameters" in message


def test_ranks_with_different_settings_fail_at_construction(ranks):
    for result in ranks:
        kind, message = result["window differs"]
        assert kind == "ValueError" and "rank 1 has window=4, rank 0 has window=3" in message


def test_mode_gradient_is_refused_on_shards(ranks):
    for result in ranks:
        kind, message = result["gradient mode"]
        assert kind == "ValueError" and "sharded (FSDP2)" in message


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_value_in_one_shard_stops_every_rank(ranks, value):
    for rank, result in enumerate(ranks):
        kind, message = result[f"{value} in rank 1's shard"]
        assert kind == "NonFiniteError"
        assert ("a.weight: 1 of 20" if rank == 1 else "on another rank") in message


def test_the_search_is_unchanged_and_goes_on_after_those_errors(ranks):
    for result in ranks:
        assert result["unchanged after errors"]
        assert result["check after errors"] is None
