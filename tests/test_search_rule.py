"""Algorithm 1's decisions on hand-scripted masks: stop and trigger decided on integer
counts (a distance exactly at s, or at s + δ, decides nothing), and the two conventions
for when the first mask is taken (after the first trained epoch, or at initialization
as the Early-Bird code does), with epochs counted as trained epochs either way."""

import warnings

import pytest
import torch

from worm_fast import WormSGD
from worm_fast.search import EarlyBirdSearch

NUMEL = 40
KEPT = 19  # p = 0.5 over 40 distinct magnitudes: the threshold is the 21st smallest


def script(param: torch.nn.Parameter, kept: set[int]) -> None:
    """Give ``param`` magnitudes whose mask keeps exactly ``kept`` (19 indices)."""
    assert len(kept) == KEPT
    ranks = torch.arange(NUMEL, dtype=torch.float64)
    values = torch.where(
        torch.tensor([i in kept for i in range(NUMEL)]), 10.0 + ranks, 1.0 + 0.01 * ranks
    )
    with torch.no_grad():
        param.copy_(values.to(param.dtype))


def swapped(kept: set[int], out: list[int], into: list[int]) -> set[int]:
    """``kept`` with ``out`` pruned and ``into`` kept: 2 · len(out) differing bits."""
    return (kept - set(out)) | set(into)


def make_search(mode="worm", window=2, first_check="epoch", **kwargs):
    param = torch.nn.Parameter(torch.zeros(NUMEL))
    optimizer = WormSGD([param], lr=0.1)
    search = EarlyBirdSearch(
        {"w": param}, optimizer, mode=mode, window=window, stop_distance=0.1,
        trigger_margin=0.05, truncation=3e-3, first_check=first_check, **kwargs,
    )  # fmt: skip
    return search, param


def run_script(search, param, masks):
    records = []
    for kept in masks:
        script(param, kept)
        records.append(search.check())
    return records


BASE = set(range(KEPT))
# Each mask against the one before: 6, 4 and 2 differing bits of 40 (0.15, 0.1, 0.05).
AT_TRIGGER = swapped(BASE, [0, 1, 2], [19, 20, 21])
AT_STOP = swapped(AT_TRIGGER, [3, 4], [22, 23])
BELOW_STOP = swapped(AT_STOP, [5], [24])


def test_distance_exactly_at_s_plus_delta_does_not_trigger_and_at_s_does_not_stop():
    search, param = make_search()
    first, at_trigger, at_stop, below = run_script(
        search, param, [BASE, AT_TRIGGER, AT_STOP, BELOW_STOP]
    )
    assert first.d_max is None and not first.window_full
    # d = 6/40 = 0.15 = s + δ: not below it, so no trigger (0.1 + 0.05 is
    # 0.15000000000000002 as floats, which a float comparison would let through).
    assert at_trigger.d_max == pytest.approx(0.15)
    assert (at_trigger.triggered, at_trigger.converged, at_trigger.r) == (False, False, 1.0)
    # d = 4/40 = 0.1 = s: no stop, but below s + δ, so WORM triggers.
    assert at_stop.d_max == pytest.approx(0.1)
    assert (at_stop.triggered, at_stop.converged, at_stop.r) == (True, False, 3e-3)
    assert search.triggered_at == 3
    # d = 2/40 = 0.05 < s: the ticket.
    assert below.converged and search.ticket.epoch == 4
    assert search.ticket.bool_masks()["w"].nonzero().flatten().tolist() == sorted(BELOW_STOP)


def test_the_average_over_the_window_is_compared_on_counts_too():
    # Window 3: distances 8/40 and 4/40 against the two older masks, average 6/40 = s + δ.
    search, param = make_search(window=3)
    masks = [swapped(BASE, [0, 1], [19, 20]), BASE, swapped(BASE, [2, 3], [21, 22])]
    *_, last = run_script(search, param, masks)
    assert last.window_full and last.d_avg == pytest.approx(0.15)
    assert not last.triggered and search.triggered_at is None
    # One more bit pair closer: the average is below s + δ.
    search, param = make_search(window=3)
    *_, last = run_script(search, param, [*masks[:2], swapped(BASE, [2], [21])])
    assert last.triggered and last.d_avg == pytest.approx(0.1) and not last.converged


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_settled_masks_stop_at_the_first_full_window(first_check):
    # Masks that never move: the search stops at the first check with a full window (3
    # masks), which the Early-Bird convention reaches one trained epoch sooner.
    search, param = make_search(mode="eb", window=3, first_check=first_check)
    records = []
    if first_check == "init":
        script(param, BASE)
        records.append(search.check())  # on the untrained initialization
    while not search.converged:
        script(param, BASE)  # "train an epoch", then check
        records.append(search.check())
    offset = first_check == "epoch"
    assert [r.epoch for r in records] == [0 + offset, 1 + offset, 2 + offset]
    assert [r.window_full for r in records] == [False, False, True]
    assert search.ticket.epoch == records[-1].epoch == 3 - (first_check == "init")
    with pytest.raises(RuntimeError, match=f"converged at check 3 \\(epoch {records[-1].epoch}"):
        search.check()


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_trigger_and_ticket_epochs_count_trained_epochs(first_check):
    # The same masks, checked in both conventions: every epoch number differs by the one
    # check at initialization.
    search, param = make_search(first_check=first_check)
    run_script(search, param, [BASE, AT_TRIGGER, AT_STOP, BELOW_STOP])
    shift = 0 if first_check == "epoch" else -1
    assert [r.epoch for r in search.records] == [1 + shift, 2 + shift, 3 + shift, 4 + shift]
    assert search.triggered_at == 3 + shift and search.records[2].triggered
    assert search.ticket.epoch == 4 + shift


def test_truncate_mode_with_a_check_at_initialization_truncates_from_the_first_step():
    search, param = make_search(mode="truncate", first_check="init")
    script(param, BASE)
    record = search.check()
    assert (record.epoch, record.triggered, record.r) == (0, True, 3e-3)
    assert search.triggered_at == 0 and search.optimizer.truncation == 3e-3


def test_state_carries_the_convention_and_resumes_exactly():
    search, param = make_search(first_check="init")
    run_script(search, param, [BASE, AT_TRIGGER, AT_STOP])
    state = search.state_dict()
    assert state["config"]["first_check"] == "init"
    resumed, resumed_param = make_search(first_check="init")
    resumed.load_state_dict(state)
    script(resumed_param, BELOW_STOP)
    assert resumed.check() == run_script(search, param, [BELOW_STOP])[0]
    assert resumed.triggered_at == search.triggered_at == 2
    other, _ = make_search(first_check="epoch")
    with pytest.raises(ValueError, match="different configuration"):
        other.load_state_dict(state)
    # A state saved before first_check existed counts checks from epoch 1.
    old = make_search()[0].state_dict()
    del old["config"]["first_check"]
    make_search(first_check="epoch")[0].load_state_dict(old)


def test_bad_first_check_is_refused():
    with pytest.raises(ValueError, match="first_check must be one of"):
        make_search(first_check="before")


def test_the_check_at_initialization_prunes_tied_gammas_without_a_warning():
    # BatchNorm γ start at 1: the Early-Bird rule prunes all of them at initialization,
    # as the Early-Bird code's first mask does; only a tie after training is worth a warning.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8))
    search = EarlyBirdSearch(model, WormSGD(model.parameters(), lr=0.1), first_check="init")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.check()
    assert not search.candidate().bool_masks()["1.weight"].any()
    with pytest.warns(RuntimeWarning, match="keeps 0 of 8"):
        search.check()  # still all tied after "an epoch" that changed nothing
