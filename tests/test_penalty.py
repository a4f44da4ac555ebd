"""WORM-gradient: the penalty's terms (worm_fast.penalty) and EarlyBirdSearch(mode="gradient")."""

import pytest
import torch
from torch import nn

from worm_fast import EarlyBirdSearch, masks, ops
from worm_fast.penalty import PenaltySettings, soft_mask_constants


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.BatchNorm1d(16),
        nn.ReLU(), nn.Linear(16, 2),
    )  # fmt: skip
    inputs = torch.randn(128, 8)
    return model, inputs, (inputs[:, 0] * inputs[:, 1] > 0).long()


def train_epoch(model, optimizer, inputs, labels, penalty=None):
    for start in range(0, len(inputs), 32):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[start : start + 32]),
                                           labels[start : start + 32])  # fmt: skip
        (loss if penalty is None else loss + penalty()).backward()
        optimizer.step()


def searched(mode="gradient", checks=3, seed=0, **kwargs):
    model, inputs, labels = model_and_data(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    search = EarlyBirdSearch(model, optimizer, mode=mode, window=5, stop_distance=1e-9, **kwargs)
    for _ in range(checks):
        train_epoch(model, optimizer, inputs, labels,
                    search.penalty if mode == "gradient" else None)  # fmt: skip
        search.check()
    return search, model, optimizer, inputs, labels


def test_settings_reject_bad_values():
    for temperature in (0, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            PenaltySettings(temperature=temperature)
    with pytest.raises(ValueError, match="distance_weight must be a finite number >= 0"):
        PenaltySettings(distance_weight=-1.0)
    with pytest.raises(ValueError, match="duration_weight must be a finite number >= 0"):
        PenaltySettings(duration_weight=float("inf"))
    assert PenaltySettings(2.0, 0.5).weight(checks=4) == 4.0


def test_search_rejects_a_bad_temperature_before_building_anything():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        EarlyBirdSearch(model, mode="gradient", temperature=0.0)


def test_threshold_lies_midway_in_the_checks_gap_and_width_scales_with_the_spread():
    params = [torch.randn(50), torch.randn(30) * 3]
    thresholds, temperatures = soft_mask_constants(params, 0.5, scope="global", temperature=0.2)
    magnitudes = torch.cat(params).abs()
    largest_pruned = masks.global_threshold(params, 0.5)
    smallest_kept = magnitudes[magnitudes > largest_pruned].min()
    assert thresholds.tolist() == pytest.approx([((largest_pruned + smallest_kept) / 2).item()] * 2)
    # The same hard mask as a check's.
    assert torch.equal(magnitudes > thresholds[0], magnitudes > largest_pruned)
    spread = magnitudes.double().std(unbiased=False)
    assert temperatures.tolist() == pytest.approx([0.2 * spread.item()] * 2, rel=1e-5)
    per_tensor, _ = soft_mask_constants(params, 0.5, scope="per_tensor", temperature=0.2)
    for p, t in zip(params, per_tensor):
        assert torch.equal(p.abs() > t, p.abs() > masks.global_threshold([p], 0.5))


def test_equal_magnitudes_still_give_a_positive_width():
    # BatchNorm weights start at 1: no spread, so the width falls back to 1 % of |w|.
    _, temperatures = soft_mask_constants([torch.ones(16)], 0.5, scope="global", temperature=0.5)
    assert temperatures.item() == pytest.approx(0.5 * 0.01)


def test_penalty_is_zero_before_the_first_check_and_after_convergence():
    model, _, _ = model_and_data()
    search = EarlyBirdSearch(model, mode="gradient", window=2, stop_distance=1.0)
    assert search.penalty().item() == 0.0 and not search.penalty().requires_grad
    search.check()
    assert search.penalty().requires_grad
    search.check()  # window 2, stop distance 1: converges
    assert search.converged and search.penalty().item() == 0.0


def test_penalty_weights_the_distance_more_with_every_check():
    search, *_ = searched(checks=3, distance_weight=0.5, duration_weight=0.25)
    params = list(search.params.values())
    distance = ops.soft_mask_distance(params, search.window.rows[:3], *search.soft_constants)
    assert search.penalty().item() == pytest.approx((0.5 + 0.25 * 3) * distance.item())


def test_each_check_sets_the_soft_mask_of_its_newest_mask():
    search, *_ = searched(checks=2, temperature=0.3)
    params = list(search.params.values())
    now = soft_mask_constants(params, 0.5, scope="global", temperature=0.3)
    assert all(torch.equal(a, b) for a, b in zip(search.soft_constants, now))
    newest = torch.cat(masks.compute_masks(params, 0.5))
    assert torch.equal(newest, search.window.rows[1])


def test_gradient_reaches_exactly_the_representative_parameters():
    search, model, *_ = searched(checks=2)
    model.zero_grad()
    search.penalty().backward()
    representative = {id(p) for p in search.params.values()}
    for name, param in model.named_parameters():
        if id(param) in representative:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_descending_the_penalty_pulls_the_weights_towards_the_window():
    search, *_ = searched(checks=3)
    params = list(search.params.values())
    held = search.window.rows[:3]

    def distance():
        return ops.soft_mask_distance(params, held, *search.soft_constants).item()

    before = distance()
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        search.penalty().backward()
        optimizer.step()
    assert distance() < 0.5 * before


def test_without_the_penalty_the_stop_rule_is_early_birds():
    eb, *_ = searched(mode="eb", checks=4)
    gradient, *_ = searched(mode="gradient", checks=4, distance_weight=0.0, duration_weight=0.0)
    assert [r.d_max for r in gradient.records] == [r.d_max for r in eb.records]
    assert gradient.config["mode"] == "gradient" and gradient.r == 1.0


def test_penalty_belongs_to_gradient_mode_and_state_round_trips():
    eb, *_ = searched(mode="eb", checks=1)
    with pytest.raises(RuntimeError, match="penalty\\(\\) belongs to mode='gradient'"):
        eb.penalty()
    search, model, optimizer, *_ = searched(checks=2, temperature=0.3)
    resumed = EarlyBirdSearch(model, optimizer, mode="gradient", window=5, stop_distance=1e-9,
                              temperature=0.3)  # fmt: skip
    resumed.load_state_dict(search.state_dict())
    assert resumed.penalty().item() == search.penalty().item()
    other = EarlyBirdSearch(model, optimizer, mode="gradient", window=5, stop_distance=1e-9)
    with pytest.raises(ValueError, match="different configuration"):
        other.load_state_dict(search.state_dict())
