"""What the search tells its user: when ties at the threshold are worth a warning, and
errors that list what is wrong (the first three, then how many more)."""

import warnings

import pytest
import torch
from torch import nn

from worm_fast import EarlyBirdSearch, NonFiniteError, WormSGD


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
    model = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(5)))
    other = WormSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold '0.weight', '1.weight', '2.weight' "
                                         r"and 2 more; build"):  # fmt: skip
        EarlyBirdSearch(model, other, mode="worm")
    three = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(3)))
    with pytest.raises(ValueError, match=r"does not hold '0.weight', '1.weight', '2.weight'; "):
        EarlyBirdSearch(three, other, mode="truncate")
