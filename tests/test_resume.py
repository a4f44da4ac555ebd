"""Resuming: a search's state hands its masks to a fresh optimizer, and a load that fails
late (after the first checks passed) leaves the optimizer exactly as it was."""

import copy

import pytest
import torch

from tests.test_reliability_state import assert_same, capture
from tests.test_search_boundaries import masks_at, packed
from tests.test_search_rule import BASE, NUMEL, make_search, script
from worm_fast import WormAdamW, WormSGD, ops
from worm_fast.masks import MaskWindow
from worm_fast.search import EarlyBirdSearch

R = 3e-3
# Window 3, newest vs the older masks 4 and 2 bits apart: WORM triggers at the third check.
TRIGGERING = masks_at((4, 2))


def saved_search(mode="worm", checks=3):
    """A search's state after ``checks`` scripted checks, and the values of its parameter."""
    search, param = make_search(mode=mode, window=3)
    for kept in TRIGGERING[:checks]:
        script(param, kept)
        search.check()
    return copy.deepcopy(search.state_dict()), param.detach().clone()


def fresh(optimizer_class, values):
    """A new parameter holding ``values``, a new optimizer over it, and a new search."""
    param = torch.nn.Parameter(values.clone())
    optimizer = optimizer_class([param], lr=0.1, weight_decay=0.0)
    search = EarlyBirdSearch(
        {"w": param}, optimizer, mode="worm", window=3, stop_distance=0.1,
        trigger_margin=0.05, truncation=R,
    )  # fmt: skip
    return param, optimizer, search


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_a_resumed_search_truncates_through_a_fresh_optimizer(optimizer_class):
    state, values = saved_search()
    assert state["triggered_at"] == 3 and state["r"] == R
    param, optimizer, search = fresh(optimizer_class, values)
    assert optimizer.truncation == 1.0 and optimizer.truncation_masks == {}

    search.load_state_dict(state)  # the optimizer's own state is not loaded

    assert optimizer.truncation == R and search.r == R and search.triggered_at == 3
    (mask,) = optimizer.truncation_masks.values()
    assert torch.equal(mask, packed(BASE))
    # The next step moves the pruned elements r times as far as the kept ones (SGD), or
    # scales their Adam update by r.
    before = param.detach().clone()
    param.grad = torch.ones(NUMEL)
    optimizer.step()
    moved = (before - param.detach()).abs()
    kept = torch.tensor([i in BASE for i in range(NUMEL)])
    # (Parameters near 1 in float32: their differences are exact to about 1e-7.)
    torch.testing.assert_close(moved[kept], torch.full_like(moved[kept], 0.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(moved[~kept], torch.full_like(moved[~kept], 0.1 * R), rtol=0,
                               atol=1e-6)  # fmt: skip


def test_a_search_saved_before_its_trigger_hands_over_nothing():
    state, values = saved_search(checks=2)
    assert state["triggered_at"] is None
    _, optimizer, search = fresh(WormSGD, values)
    optimizer.set_truncation({search.params["w"]: torch.ones(NUMEL, dtype=torch.bool)}, 0.5)
    search.load_state_dict(state)
    assert optimizer.truncation == 0.5  # the state has no truncation to hand over
    assert search.r == 1.0 and search.triggered_at is None


def test_a_resumed_search_continues_like_the_uninterrupted_one():
    state, values = saved_search(checks=2)
    straight, straight_param = make_search(window=3)
    for kept in TRIGGERING:
        script(straight_param, kept)
        straight.check()
    _, optimizer, resumed = fresh(WormSGD, values)
    resumed.load_state_dict(state)
    script(resumed.params["w"], TRIGGERING[2])
    assert resumed.check() == straight.records[-1]
    assert resumed.records == straight.records
    assert torch.equal(
        next(iter(optimizer.truncation_masks.values())),
        next(iter(straight.optimizer.truncation_masks.values())),
    )


def test_a_search_load_that_fails_late_hands_the_optimizer_nothing():
    # Everything before the features is valid, the masks and trigger included; the bad
    # features are found last, before the optimizer may be handed anything.
    state, values = saved_search()
    state["features"] = [{"check": 1, "unknown": 0.5}]
    _, optimizer, search = fresh(WormSGD, values)
    before = capture([optimizer, search])
    with pytest.raises(ValueError, match="bad features"):
        search.load_state_dict(state)
    assert_same(before, capture([optimizer, search]))
    assert optimizer.truncation == 1.0 and optimizer.truncation_masks == {}


# -- an optimizer's load_state_dict that fails after its first checks ------------------


def trained_pair(optimizer_class, groups=1):
    """(optimizer with steps, masks at r = 0.5, over two parameters in ``groups`` groups)."""
    gen = torch.Generator().manual_seed(groups)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (9, 17)]
    param_groups = [{"params": params}] if groups == 1 else [{"params": [p]} for p in params]
    kwargs = dict(momentum=0.9) if optimizer_class is WormSGD else {}
    optimizer = optimizer_class(param_groups, lr=0.1, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    masks = {p: torch.rand(p.shape, generator=gen) < 0.5 for p in params}
    optimizer.set_truncation(masks, 0.5)
    return optimizer


def with_other_truncation(optimizer):
    """``optimizer``'s state dict with other valid masks and r, which a load would take."""
    state = copy.deepcopy(optimizer.state_dict())
    state["worm_truncation"] = {
        "r": 0.1,
        "masks": {i: ~mask for i, mask in state["worm_truncation"]["masks"].items()},
    }
    return state


def wrong_elementwise_state(optimizer_class):
    optimizer = trained_pair(optimizer_class)
    state = with_other_truncation(optimizer)
    key = "momentum_buffer" if optimizer_class is WormSGD else "exp_avg_sq"
    state["state"][1][key] = torch.zeros(5)
    return optimizer, state, key


def step_of_several_numbers(optimizer_class):
    optimizer = trained_pair(optimizer_class)
    state = with_other_truncation(optimizer)
    state["state"][1]["step"] = torch.zeros(3)
    return optimizer, state, "not one number"


def other_param_groups(optimizer_class):
    # Valid masks for two parameters, but two groups where this optimizer has one:
    # torch.optim refuses it, the last check of all.
    optimizer = trained_pair(optimizer_class)
    state = with_other_truncation(trained_pair(optimizer_class, groups=2))
    return optimizer, state, "parameter groups"


@pytest.mark.parametrize("corrupt", [wrong_elementwise_state, step_of_several_numbers,
                                     other_param_groups])  # fmt: skip
@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_an_optimizer_load_that_fails_late_keeps_its_truncation(optimizer_class, corrupt):
    optimizer, state, message = corrupt(optimizer_class)
    # The saved masks and r pass the checks set_truncation makes, the first of the load:
    # a load that applied them before its later checks would leave them behind.
    saved = state["worm_truncation"]
    twin = copy.deepcopy(optimizer)
    twin.set_truncation(dict(zip(twin._all_params(), saved["masks"].values())), saved["r"],
                        packed=True)  # fmt: skip
    before = capture(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state)
    assert_same(before, capture(optimizer))
    assert optimizer.truncation == 0.5


# -- a saved mask window, wrong in one way at a time ---------------------------------------


def saved_window(numel=17, pushed=2):
    """A window of 3 over ``numel`` elements, its state after ``pushed`` masks."""
    window = MaskWindow(3, numel)
    for k in range(pushed):
        window.push(ops.pack_mask(torch.arange(float(numel)).roll(k), numel / 2))
    return window, copy.deepcopy(window.state_dict())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(length=4), "length 4 over 17"),
        (dict(numel=16), "length 3 over 16"),
        (dict(count=-1), "count must be an int >= 0, got -1"),
        (dict(count=2.0), "count must be an int >= 0, got 2.0"),
        (dict(count=True), "count must be an int >= 0, got True"),
        (dict(rows=[[0]]), "rows must be uint8"),
        (dict(rows=torch.zeros(3, 8, dtype=torch.int16)), "rows must be uint8"),
        (dict(rows=torch.zeros(24, dtype=torch.uint8)), "rows must be uint8"),
        (dict(rows=torch.zeros(2, 8, dtype=torch.uint8)), "rows must be uint8"),
        # 17 elements need 3 bytes: 2 hold 16 bits.
        (dict(rows=torch.zeros(3, 2, dtype=torch.uint8)), "nbytes \\* 8 >= 17"),
    ],
)
def test_a_window_state_wrong_in_one_way_is_refused_and_changes_nothing(change, message):
    window, state = saved_window()
    before = capture(window)
    with pytest.raises(ValueError, match=message):
        window.load_state_dict({**state, **change})
    assert_same(before, capture(window))


def test_a_window_state_of_exactly_enough_bytes_loads():
    _, state = saved_window(numel=16)
    fresh = MaskWindow(3, 16)
    fresh.load_state_dict({**state, "rows": state["rows"][:, :2]})  # 2 bytes: 16 bits
    assert fresh.count == 2 and fresh.rows.shape == (3, 2)


def test_an_empty_window_state_takes_any_first_mask():
    _, state = saved_window(pushed=0)
    window = MaskWindow(3, 17)
    window.load_state_dict(state)
    window.push(torch.zeros(8, dtype=torch.uint8))  # the first mask fixes the width
    assert window.count == 1 and window.rows.shape == (3, 8)
    assert window.distances().shape == (0,)


# -- a search's whole state -----------------------------------------------------------------


def test_a_converged_search_resumes_with_its_ticket():
    search, param = make_search(window=3)
    for kept in masks_at((2, 0)):  # d_max below s at the third check
        script(param, kept)
        search.check()
    assert search.converged
    resumed, _ = make_search(window=3)
    resumed.load_state_dict(copy.deepcopy(search.state_dict()))
    assert resumed.converged and resumed.ticket.epoch == search.ticket.epoch == 3
    assert torch.equal(resumed.ticket.packed["w"], search.ticket.packed["w"])
    with pytest.raises(RuntimeError, match="converged at check 3"):
        resumed.check()


def test_an_rl_search_resumes_with_what_its_policy_saw():
    search, param = make_search(mode="rl", window=3, max_checks=5)
    for loss, kept in zip((3.0, 2.0), TRIGGERING):
        script(param, kept)
        search.check(train_loss=loss)
    state = copy.deepcopy(search.state_dict())
    resumed, resumed_param = make_search(mode="rl", window=3, max_checks=5)
    resumed.load_state_dict(state)
    assert resumed.features == search.features
    assert resumed.observation.tolist() == search.observation.tolist()
    # The next check's observation continues the loss trend across the resume.
    for each, each_param in ((search, param), (resumed, resumed_param)):
        script(each_param, TRIGGERING[2])
        each.check(train_loss=1.0)
    assert resumed.observation.tolist() == search.observation.tolist()
    del state["features"]  # saved before WORM-RL existed
    old, _ = make_search(mode="rl", window=3, max_checks=5)
    old.load_state_dict(state)
    assert old.features == [] and old.observation is None


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_a_saved_trigger_must_be_the_epoch_of_a_saved_check(first_check):
    # Three checks: epochs 1, 2, 3 (or 0, 1, 2 with a check at initialization).
    search, param = make_search(window=3, first_check=first_check)
    for kept in TRIGGERING:
        script(param, kept)
        search.check()
    state = copy.deepcopy(search.state_dict())
    first, last = (1, 3) if first_check == "epoch" else (0, 2)
    for triggered_at in (first, last):
        resumed, _ = make_search(window=3, first_check=first_check)
        resumed.load_state_dict({**state, "triggered_at": triggered_at})
        assert resumed.triggered_at == triggered_at
    for bad in (first - 1, last + 1, str(last), float(last)):
        resumed, _ = make_search(window=3, first_check=first_check)
        with pytest.raises(ValueError, match="triggered_at must be None or the epoch"):
            resumed.load_state_dict({**state, "triggered_at": bad})


@pytest.mark.parametrize("r, accepted", [(0.0, True), (1.0, True), (-0.1, False), (1.5, False)])
def test_a_saved_truncation_factor_must_be_in_0_1(r, accepted):
    state, values = saved_search()
    _, optimizer, search = fresh(WormSGD, values)
    if accepted:
        search.load_state_dict({**state, "r": r})
        assert search.r == optimizer.truncation == r
    else:
        with pytest.raises(ValueError, match=r"load_state_dict: r must be in \[0, 1\]"):
            search.load_state_dict({**state, "r": r})


def test_a_bad_saved_record_is_refused_naming_it():
    state, values = saved_search()
    state["records"][0]["unknown"] = 1
    with pytest.raises(ValueError, match=r"bad record or ticket: .*unknown"):
        fresh(WormSGD, values)[2].load_state_dict(state)
