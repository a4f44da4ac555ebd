"""What the search tells its user and what it accepts: when ties at the threshold are
worth a warning, errors that name what is wrong (the first three, then how many more),
and its settings at their bounds."""

import math
import warnings

import pytest
import torch
from torch import nn

import worm_fast.search
from tests.utils import count_calls
from worm_fast import EarlyBirdSearch, NonFiniteError, WormSGD
from worm_fast.backends import reference as reference_kernels
from worm_fast.rl.observation import CONTINUE, ObservationLayout
from worm_fast.search import check_settings


def tied(numel: int, ties: int) -> nn.Parameter:
    """Distinct magnitudes but for ``ties`` extra copies of the threshold (p = 0.5): the
    Early-Bird rule prunes them too, so the mask keeps ``ties`` fewer than the
    ``numel - numel // 2 - 1`` above the threshold of distinct magnitudes."""
    values = torch.arange(1.0, numel + 1)
    values[numel // 2 + 1 : numel // 2 + 1 + ties] = values[numel // 2]
    return nn.Parameter(values)


def warns(search) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search.check()
    return any("magnitudes equal the threshold" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "numel, ties, warned",
    [
        (40, 2, False),  # 2 fewer kept: within the allowance of 2
        (40, 3, True),
        (400, 4, False),  # 1 % of 400 is 4: within it
        (400, 5, True),
    ],
)
def test_ties_warn_past_two_elements_or_one_percent(numel, ties, warned):
    search = EarlyBirdSearch([tied(numel, ties)], mode="eb", prune_ratio=0.5)
    assert warns(search) == warned
    if warned:  # the warning points at the caller of check(), not into the search
        search = EarlyBirdSearch([tied(numel, ties)], mode="eb", prune_ratio=0.5)
        with pytest.warns(RuntimeWarning, match="magnitudes equal") as caught:
            search.check()
        assert caught[0].filename != worm_fast.search.__file__
    assert int(search.candidate().bool_masks()["param0"].sum()) == numel // 2 - 1 - ties


@pytest.mark.parametrize("scope, kept", [("per_tensor", 10), ("global", 14)])
def test_distinct_magnitudes_never_warn_whatever_the_scope(scope, kept):
    # Ten tensors of 3 distinct magnitudes, p = 0.5: per tensor, each keeps the one above
    # its second (10 of 30); over all, the 14 above the 16th smallest.
    tensors = {f"t{i}": nn.Parameter(torch.tensor([1.0, 2.0, 3.0]) + 3 * i) for i in range(10)}
    search = EarlyBirdSearch(tensors, mode="eb", scope=scope, prune_ratio=0.5)
    assert not warns(search)
    assert sum(int(m.sum()) for m in search.candidate().bool_masks().values()) == kept


def test_non_finite_values_of_many_parameters_are_listed_three_then_counted():
    weights = {name: nn.Parameter(torch.randn(4)) for name in "abcde"}
    search = EarlyBirdSearch(weights, mode="eb")
    with torch.no_grad():
        for k, name in enumerate("abcd"):
            weights[name][: k + 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\(a: 1 of 4, b: 2 of 4, c: 3 of 4 and 1 more\)"):
        search.check()
    with torch.no_grad():
        weights["d"].fill_(1.0)
    with pytest.raises(NonFiniteError, match=r"\(a: 1 of 4, b: 2 of 4, c: 3 of 4\); "):
        search.check()


def test_an_optimizer_missing_parameters_is_refused_naming_three_then_counting():
    model = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(4)))
    other = WormSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold '0.weight', '1.weight', '2.weight' "
                                         r"and 1 more; build"):  # fmt: skip
        EarlyBirdSearch(model, other, mode="worm")
    three = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(3)))
    with pytest.raises(ValueError, match=r"does not hold '0.weight', '1.weight', '2.weight'; "):
        EarlyBirdSearch(three, other, mode="truncate")


# -- settings ----------------------------------------------------------------------------

SETTINGS = dict(mode="worm", prune_ratio=0.5, stop_distance=0.1, window=5, trigger_margin=0.05,
                truncation=3e-3)  # fmt: skip


def test_optional_settings_default_to_the_early_bird_conventions():
    check_settings(**SETTINGS)  # scope, ties and first_check have working defaults


@pytest.mark.parametrize("name", ["prune_ratio", "stop_distance", "trigger_margin", "truncation"])
def test_a_setting_that_is_not_a_number_is_named(name):
    with pytest.raises(ValueError, match=f"^{name} must be a number, got 'x'$"):
        check_settings(**{**SETTINGS, name: "x"})


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("trigger_margin", 0.0, True), ("trigger_margin", math.inf, False),
        ("trigger_margin", -0.01, False), ("truncation", 0.0, True), ("truncation", 1.0, True),
        ("truncation", 1.5, False), ("truncation", -0.5, False),
    ],
)  # fmt: skip
def test_settings_at_their_bounds(name, value, accepted):
    if accepted:
        check_settings(**{**SETTINGS, name: value})
    else:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            check_settings(**{**SETTINGS, name: value})


@pytest.mark.parametrize("mode", ["truncate", "worm"])
def test_truncating_modes_refuse_an_optimizer_that_cannot_truncate(mode):
    gamma = nn.Parameter(torch.ones(4))
    with pytest.raises(TypeError, match=f"mode '{mode}' truncates gradients"):
        EarlyBirdSearch([gamma], torch.optim.SGD([gamma], lr=0.1), mode=mode)
    with pytest.raises(ValueError, match=f"mode '{mode}' truncates the updates"):
        EarlyBirdSearch([gamma], WormSGD([nn.Parameter(torch.ones(1))], lr=0.1), mode=mode)


def test_one_element_is_enough_and_none_is_refused():
    assert EarlyBirdSearch([nn.Parameter(torch.ones(1))], mode="eb").window.numel == 1
    with pytest.raises(ValueError, match="have no elements"):
        EarlyBirdSearch([nn.Parameter(torch.ones(0))], mode="eb")


def test_the_backend_is_kept_and_parameters_on_two_devices_are_named():
    gamma = nn.Parameter(torch.ones(4))
    assert EarlyBirdSearch([gamma], mode="eb", backend="reference").backend == "reference"
    two = {"a": nn.Parameter(torch.ones(2)), "b": nn.Parameter(torch.ones(2, device="meta"))}
    with pytest.raises(ValueError, match=r"on one device, got 'a' on cpu, 'b' on meta$"):
        EarlyBirdSearch(two, mode="eb")


def test_an_rl_search_takes_one_check_and_its_policys_layout():
    gamma = nn.Parameter(torch.arange(1.0, 9.0))

    def policy(observation):
        return CONTINUE

    policy.layout = ObservationLayout(history=2)
    search = EarlyBirdSearch([gamma], mode="rl", policy=policy, max_checks=1)
    search.check()
    assert search.layout is policy.layout and search.observation.shape == (2 * 2 + 3,)


# -- where the search runs ----------------------------------------------------------------


def test_a_search_keeps_its_window_and_penalty_on_its_parameters_device():
    # The meta device stands in for a second device: nothing may land on the CPU.
    gamma = nn.Parameter(torch.ones(8, device="meta"))
    search = EarlyBirdSearch([gamma], mode="gradient")
    assert search.window.rows.device.type == "meta"
    assert search.penalty().device.type == "meta"  # before the first check: zero, there
    # A state saved on the CPU loads onto it.
    cpu = EarlyBirdSearch([nn.Parameter(torch.arange(1.0, 9.0))], mode="gradient")
    cpu.check()
    search.load_state_dict(cpu.state_dict())
    assert search.window.rows.device.type == "meta"
    assert search._newest[0].device.type == "meta"
    assert all(t.device.type == "meta" for t in search.soft_constants)


@pytest.mark.parametrize("kernel", ["pack_mask", "soft_mask_distance"])
def test_a_forced_backend_runs_the_searchs_ops(kernel, monkeypatch):
    calls = count_calls(monkeypatch, reference_kernels, kernel)
    gamma = nn.Parameter(torch.arange(1.0, 9.0))
    search = EarlyBirdSearch([gamma], mode="gradient", backend="reference")
    search.check()
    search.penalty()
    assert calls
