"""Resuming: a search's state hands its masks to a fresh optimizer, and a load that fails
late (after the first checks passed) leaves the optimizer exactly as it was."""

import copy

import pytest
import torch

from tests.test_reliability_state import assert_same, capture
from tests.test_search_boundaries import masks_at, packed
from tests.test_search_rule import BASE, NUMEL, make_search, script
from worm_fast import WormAdamW, WormSGD
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
