"""Algorithm 1's stop and trigger rule at and around its boundaries, in every mode and
both conventions for the first check.

A window of 3 masks: the third check compares the newest mask with the two older ones,
so ``d_max`` and ``d_avg`` differ, and each scenario puts one of them exactly at, or
one bit pair either side of, ``s = 0.1`` (4 of 40 bits) or ``s + δ = 0.15`` (6 of 40).
Masks keep a fixed count, so they differ in bit pairs: one pair is the finest step."""

import pytest
import torch

from tests.test_search_rule import BASE, KEPT, NUMEL, make_search, script, swapped
from worm_fast import ops
from worm_fast.rl.observation import CONTINUE, STOP, TRIGGER
from worm_fast.search import MODES

R = 3e-3  # make_search's truncation

# name: ((bits the newest mask differs from the middle one, from the oldest one),
#        d_max < s, d_avg < s + δ; "s+d" in the names is s + δ)
SCENARIOS = {
    "d_max one pair below s": ((2, 0), True, True),
    "d_max exactly s, d_avg below s": ((4, 2), False, True),
    "d_max one pair above s, d_avg exactly s": ((6, 2), False, True),
    "d_avg below s+d, d_max exactly s+d": ((6, 4), False, True),
    "d_avg below s+d, d_max above it": ((8, 2), False, True),
    "d_avg exactly s+d": ((8, 4), False, False),
    "d_avg one pair above s+d": ((8, 6), False, False),
}


def masks_at(bits: tuple[int, int]) -> list[set[int]]:
    """Oldest, middle and newest kept sets; the newest (BASE) differs from the middle one
    by ``bits[0]`` bits and from the oldest by ``bits[1]`` (disjoint swaps)."""
    to_middle, to_oldest = bits[0] // 2, bits[1] // 2
    middle = swapped(BASE, list(range(to_middle)), list(range(KEPT, KEPT + to_middle)))
    oldest = swapped(BASE, list(range(10, 10 + to_oldest)), list(range(30, 30 + to_oldest)))
    return [oldest, middle, BASE]


def packed(kept: set[int]) -> torch.Tensor:
    return ops.pack_mask(torch.tensor([float(i in kept) for i in range(NUMEL)]), 0.5)


def epochs(first_check: str) -> list[int]:
    """The epoch of checks 1, 2, 3: trained epochs before each."""
    return [0, 1, 2] if first_check == "init" else [1, 2, 3]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("first_check", ["epoch", "init"])
@pytest.mark.parametrize("mode", MODES)
def test_the_third_check_decides_exactly_at_the_boundaries(mode, first_check, scenario):
    bits, below_s, avg_below_trigger = SCENARIOS[scenario]
    extra = dict(max_checks=5) if mode == "rl" else {}  # rl: decided from outside (act)
    search, param = make_search(mode=mode, window=3, first_check=first_check, **extra)
    records = []
    for kept in masks_at(bits):
        script(param, kept)
        records.append(search.check())
    first, second, third = records
    epoch = epochs(first_check)

    # No decision before the window is full, whatever the distance (the middle mask
    # differs from the oldest by the two swaps).
    assert [r.epoch for r in records] == epoch
    assert (first.d_max, first.d_avg) == (None, None)
    assert second.d_max == second.d_avg == (bits[0] + bits[1]) / NUMEL
    for early in (first, second):
        assert not early.window_full and not early.converged
    assert first.triggered == (mode == "truncate") and not second.triggered

    # The third check: exact distances, then the rule on them.
    assert third.window_full
    assert third.d_max == max(bits) / NUMEL
    assert third.d_avg == sum(bits) / 2 / NUMEL
    converged = below_s and mode != "rl"  # mode rl: the policy decides, not the rule
    triggered = mode == "worm" and not converged and avg_below_trigger
    assert third.converged == converged == search.converged
    assert third.triggered == triggered
    truncating = mode == "truncate" or triggered
    assert third.r == search.r == (R if truncating else 1.0)
    assert search.triggered_at == (epoch[0] if mode == "truncate" else epoch[2] if triggered
                                   else None)  # fmt: skip

    # The optimizer holds the newest mask with the r in force, or nothing at all.
    optimizer = search.optimizer
    assert optimizer.truncation == third.r
    if truncating:
        (mask,) = optimizer.truncation_masks.values()
        assert torch.equal(mask, packed(BASE))
    else:
        assert optimizer.truncation_masks == {}
    if converged:
        assert search.ticket.epoch == epoch[2]
        assert torch.equal(search.ticket.packed["w"], packed(BASE))
        with pytest.raises(RuntimeError, match="converged at check 3"):
            search.check()
    else:
        assert search.ticket is None and search.candidate().epoch == epoch[2]


def scripted_policy(actions: list[int], seen: list):
    """A policy that returns ``actions`` in turn and keeps what it was shown."""
    remaining = iter(actions)

    def policy(observation):
        seen.append(observation.copy())
        return next(remaining)

    return policy


@pytest.mark.parametrize("first_check", ["epoch", "init"])
@pytest.mark.parametrize("action", [CONTINUE, STOP, TRIGGER])
@pytest.mark.parametrize("scenario", ["d_max one pair below s", "d_avg exactly s+d"])
def test_a_policy_decides_whatever_the_distances(scenario, action, first_check):
    bits = SCENARIOS[scenario][0]
    seen = []
    policy = scripted_policy([CONTINUE, CONTINUE, action], seen)
    search, param = make_search(
        mode="rl", window=3, first_check=first_check, policy=policy, max_checks=5
    )
    records = []
    for loss, kept in zip((3.0, 2.0, 1.0), masks_at(bits)):
        script(param, kept)
        records.append(search.check(train_loss=loss))
    third, epoch = records[-1], epochs(first_check)[2]

    assert (third.converged, search.converged) == (action == STOP,) * 2
    assert third.triggered == (action == TRIGGER) and search.records[-1] == third
    assert search.r == third.r == (R if action == TRIGGER else 1.0)
    assert search.triggered_at == (epoch if action == TRIGGER else None)
    if action == STOP:
        assert search.ticket.epoch == epoch
        assert torch.equal(search.ticket.packed["w"], packed(BASE))
    if action == TRIGGER:
        (mask,) = search.optimizer.truncation_masks.values()
        assert torch.equal(mask, packed(BASE)) and search.optimizer.truncation == R
    # What the policy saw at the third check (history 4, oldest first): no distance
    # before the second check, then the distances; the checks run of 5, the loss trend
    # (1 - 3) / 3 and the kept fraction 19/40.
    observation = seen[-1]
    second = sum(bits) / NUMEL
    d_max, d_avg = max(bits) / NUMEL, sum(bits) / 2 / NUMEL
    assert observation[:4].tolist() == pytest.approx([-1.0, -1.0, second, d_max])
    assert observation[4:8].tolist() == pytest.approx([-1.0, -1.0, second, d_avg])
    assert observation[8:].tolist() == pytest.approx([3 / 5, -2 / 3, KEPT / NUMEL])
    assert len(search.features) == 3 and search.features[-1].check == 3


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_act_from_outside_decides_about_the_last_check(first_check):
    bits = SCENARIOS["d_max one pair below s"][0]
    search, param = make_search(mode="rl", window=3, first_check=first_check, max_checks=5)
    for kept in masks_at(bits):
        script(param, kept)
        record = search.check()
    assert not record.converged and search.observation is not None
    epoch = epochs(first_check)[2]
    triggered = search.act(TRIGGER)
    assert (triggered.triggered, triggered.r, search.triggered_at) == (True, R, epoch)
    assert search.act(TRIGGER) == triggered  # a second trigger changes nothing
    stopped = search.act(STOP)
    assert stopped.converged and stopped.triggered and search.ticket.epoch == epoch
    with pytest.raises(RuntimeError, match="not after the search has stopped"):
        search.act(CONTINUE)


@pytest.mark.parametrize("action", [-1, 3])
def test_act_refuses_an_action_out_of_range(action):
    search, param = make_search(mode="rl", window=3, max_checks=5)
    script(param, BASE)
    search.check()
    with pytest.raises(ValueError, match=f"action must be an index of .*, got {action}"):
        search.act(action)
    assert not search.converged and search.triggered_at is None
