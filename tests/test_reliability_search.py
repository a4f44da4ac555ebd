"""The search never reports a wrong answer silently: non-finite values stop it, ties at
the threshold are warned about (or broken exactly), and every setting is checked."""

import warnings

import pytest
import torch
from torch import nn

from worm_fast import EarlyBirdSearch, NonFiniteError, WormSGD, ops
from worm_fast.masks import compute_masks


def unpacked(packed, tensors):
    return torch.cat([ops.unpack_mask(m, t.numel()) for m, t in zip(packed, tensors)])


# -- non-finite values ------------------------------------------------------------------


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_non_finite_values_stop_the_check_and_name_the_parameter(bad):
    weights = {"a": nn.Parameter(torch.randn(10)), "b": nn.Parameter(torch.randn(6))}
    search = EarlyBirdSearch(weights, WormSGD(weights.values(), lr=0.1), mode="truncate")
    search.check()
    with torch.no_grad():
        weights["b"][[1, 4]] = bad
    with pytest.raises(NonFiniteError, match=r"\(b: 2 of 6\).*diverged") as raised:
        search.check()
    assert isinstance(raised.value, FloatingPointError)
    assert len(search.records) == 1 and search.window.count == 1 and not search.converged


def test_a_diverged_search_never_converges_to_an_empty_ticket():
    # The example: with NaN weights every mask was all zeros, the distances 0,
    # and the search "converged" with density 0 once the window was full.
    weights = [nn.Parameter(torch.full((16,), float("nan")))]
    search = EarlyBirdSearch(weights, mode="eb", window=2)
    for _ in range(3):
        with pytest.raises(NonFiniteError):
            search.check()
    assert search.ticket is None and search.records == []


# -- ties at the threshold ----------------------------------------------------------------


def test_equal_magnitudes_warn_once_under_the_early_bird_rule():
    gamma = nn.Parameter(torch.ones(16))  # e.g. BatchNorm γ at initialization
    search = EarlyBirdSearch([gamma], mode="eb", prune_ratio=0.5)
    with pytest.warns(RuntimeWarning, match=r"keeps 0 of 16 .* ties='exact'"):
        search.check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.check()  # once per search


def test_no_warning_without_ties():
    search = EarlyBirdSearch([nn.Parameter(torch.randn(1000))], mode="eb", prune_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.check()


@pytest.mark.parametrize("scope", ("global", "per_tensor"))
@pytest.mark.parametrize("prune_ratio", (0.0, 0.3, 0.5, 0.9))
def test_exact_ties_prune_exactly_the_ratio_lowest_index_first(scope, prune_ratio):
    tensors = [torch.ones(10), torch.tensor([1.0, 1.0, 2.0, 0.5, 1.0, 3.0, 1.0])]
    packed = compute_masks(tensors, prune_ratio, scope=scope, ties="exact")
    kept = unpacked(packed, tensors)
    groups = [torch.cat(tensors)] if scope == "global" else tensors
    expected = []
    for group in groups:
        # Rank by (magnitude, index): the first int(n p) are pruned.
        order = sorted(range(group.numel()), key=lambda i: (float(group[i]), i))
        pruned = set(order[: int(group.numel() * prune_ratio)])
        expected += [i not in pruned for i in range(group.numel())]
    assert kept.tolist() == expected


def test_exact_ties_match_the_early_bird_rule_when_magnitudes_are_distinct():
    tensors = [torch.randn(50, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    exact = unpacked(compute_masks(tensors, 0.5, ties="exact"), tensors)
    early_bird = unpacked(compute_masks(tensors, 0.5), tensors)
    # Early-Bird also prunes the element at the threshold: one more than int(n p).
    assert int(exact.sum()) == 150 - 75 and int(early_bird.sum()) == 150 - 76
    assert (early_bird <= exact).all()


def test_search_with_exact_ties_keeps_half_of_equal_gammas():
    gamma = nn.Parameter(torch.ones(16))
    search = EarlyBirdSearch([gamma], mode="eb", prune_ratio=0.5, ties="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.check()
    assert search.candidate().density == 0.5


def test_a_search_saved_before_ties_existed_still_loads():
    params = [nn.Parameter(torch.randn(20))]
    search = EarlyBirdSearch(params, mode="eb")
    search.check()
    state = search.state_dict()
    del state["config"]["ties"]
    resumed = EarlyBirdSearch(params, mode="eb")
    resumed.load_state_dict(state)
    assert resumed.window.count == 1


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(stop_distance=float("nan")), "stop_distance must be a finite number > 0"),
        (dict(stop_distance=0.0), "stop_distance must be a finite number > 0"),
        (dict(trigger_margin=float("nan")), "trigger_margin must be a finite number >= 0"),
        (dict(window=2.5), "window must be an integer >= 2"),
        (dict(window=1), "window must be an integer >= 2"),
        (dict(window=True), "window must be an integer >= 2"),
        (dict(prune_ratio=float("nan")), r"prune_ratio must be in \[0, 1\)"),
        (dict(prune_ratio="0.5"), "prune_ratio must be a number"),
        (dict(truncation=float("nan")), r"truncation must be in \[0, 1\]"),
        (dict(ties="random"), "ties must be one of"),
        (dict(mode="fast"), "mode must be one of"),
    ],
)
def test_settings_out_of_range_are_refused_when_the_search_is_made(setting, message):
    with pytest.raises(ValueError, match=message):
        EarlyBirdSearch([nn.Parameter(torch.randn(4))], **({"mode": "eb"} | setting))


def test_an_unknown_backend_is_refused_when_the_search_is_made():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        EarlyBirdSearch([nn.Parameter(torch.randn(4))], mode="eb", backend="fastest")
