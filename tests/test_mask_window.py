"""MaskWindow's contract: rows of another form are refused with what was expected, and
the masks and every result stay on the window's device (the meta device stands in for
a second device on a machine with one); and the masks it holds, computed for any size
on the backend asked for."""

import pytest
import torch

from worm_fast import ops
from worm_fast.backends import reference
from worm_fast.masks import MaskWindow, compute_masks


@pytest.mark.parametrize(
    "row, message",
    [
        (torch.zeros(2, 8, dtype=torch.uint8), "expected at least 8 packed uint8 bytes"),
        (torch.zeros(8, dtype=torch.int16), "expected at least 8 packed uint8 bytes"),
        (torch.zeros(7, dtype=torch.uint8), "expected at least 8 packed uint8 bytes"),
    ],
)
def test_a_first_row_of_another_form_is_refused(row, message):
    window = MaskWindow(3, 64)
    with pytest.raises(ValueError, match=message):
        window.push(row)
    assert window.count == 0
    window.push(torch.zeros(8, dtype=torch.uint8))  # 64 bits: exactly enough
    with pytest.raises(ValueError, match="expected 8 packed uint8 bytes"):
        window.push(torch.zeros(16, dtype=torch.uint8))


def test_an_empty_window_compares_with_nothing():
    window = MaskWindow(3, 64)
    row = torch.zeros(8, dtype=torch.uint8)
    differing = window.differing_bits(row)
    assert differing.shape == (0,) and differing.dtype == torch.int64
    assert window.distances().shape == (0,)


def test_masks_and_results_stay_on_the_windows_device():
    window = MaskWindow(3, 64, device="meta")
    row = torch.zeros(8, dtype=torch.uint8, device="meta")
    assert window.distances().device.type == "meta"
    assert window.differing_bits(row).device.type == "meta"
    window.push(row)
    assert window.rows.device.type == "meta"
    saved = MaskWindow(3, 64)
    saved.push(torch.zeros(8, dtype=torch.uint8))
    window.load_state_dict(saved.state_dict())
    assert window.rows.device.type == "meta" and window.count == 1


def test_the_first_row_needs_a_bit_per_element():
    window = MaskWindow(3, 63)  # 7 bytes hold 56 bits: too few, 8 are needed
    with pytest.raises(ValueError, match="expected at least 8 packed uint8 bytes"):
        window.push(torch.zeros(7, dtype=torch.uint8))


def test_a_window_over_nothing_is_refused():
    with pytest.raises(ValueError, match="at least one element, got 0"):
        MaskWindow(3, 0)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_a_single_element_has_a_threshold(scope):
    (mask,) = compute_masks([torch.tensor([2.0])], 0.5, scope=scope)
    assert ops.unpack_mask(mask, 1).tolist() == [False]  # int(1 · 0.5) = 0: its own value


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("ties", ["early_bird", "exact"])
def test_compute_masks_runs_the_forced_backend(scope, ties, monkeypatch):
    calls = []
    for kernel in ("pack_mask", "magnitude_histogram"):
        original = getattr(reference, kernel)

        def spy(*args, _original=original, _kernel=kernel, **kwargs):
            calls.append(_kernel)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, kernel, spy)
    tensors = [torch.arange(1.0, 9.0), torch.arange(2.0, 7.0)]
    compute_masks(tensors, 0.5, scope=scope, ties=ties, backend="reference")
    assert calls.count("pack_mask") == 2 and "magnitude_histogram" in calls
