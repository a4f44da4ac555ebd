"""What the WORM-RL policy sees: layout, padding, epoch fraction, loss trend, density."""

import numpy as np
import pytest

from worm_fast.rl.observation import PAD, CheckFeatures, ObservationLayout


def features(n, losses=None):
    losses = losses or [2.0 - 0.1 * i for i in range(n)]
    return [
        CheckFeatures(i + 1, None if i == 0 else 0.1 * i, None if i == 0 else 0.05 * i,
                      losses[i], 0.5)
        for i in range(n)
    ]  # fmt: skip


def test_layout_names_match_the_vector():
    layout = ObservationLayout(history=3)
    assert layout.size == len(layout.names) == 9
    assert layout.names[:3] == ["d_max[t-2]", "d_max[t-1]", "d_max[t-0]"]
    assert layout.names[-3:] == ["epoch_fraction", "loss_trend", "density"]


def test_padding_before_the_window_fills():
    observation = ObservationLayout(history=3).observe(features(2), max_checks=10)
    assert observation.dtype == np.float32
    # Two checks: one pad slot before them, and the first check has no distance yet.
    assert observation[:3].tolist() == pytest.approx([PAD, PAD, 0.1])
    assert observation[3:6].tolist() == pytest.approx([PAD, PAD, 0.05])
    assert observation[6] == pytest.approx(0.2)  # 2 of 10 checks
    assert observation[7] == pytest.approx((1.9 - 2.0) / 2.0)
    assert observation[8] == pytest.approx(0.5)


def test_recent_history_and_clipped_trend():
    layout = ObservationLayout(history=2)
    observation = layout.observe(features(5, [1.0, 1.0, 1.0, 1.0, 9.0]), max_checks=4)
    assert observation[:2].tolist() == pytest.approx([0.3, 0.4])
    assert observation[4] == 1.0  # fraction capped at 1
    assert observation[5] == 1.0  # trend (9 - 1) / 1 clipped
    assert layout.observe(features(1), max_checks=4)[5] == 0.0  # one loss: no trend


def test_layout_round_trip_and_errors():
    layout = ObservationLayout(history=4)
    assert ObservationLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="not this version's"):
        ObservationLayout.from_dict({**layout.to_dict(), "names": ["a", "b"]})
    with pytest.raises(ValueError, match="history must be an int >= 1"):
        ObservationLayout(history=0)
    with pytest.raises(ValueError, match="no check has run"):
        layout.observe([], max_checks=3)
