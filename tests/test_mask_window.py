"""MaskWindow's contract: rows of another form are refused with what was expected, and
the masks and every result stay on the window's device (the meta device stands in for
a second device on a machine with one)."""

import pytest
import torch

from worm_fast.masks import MaskWindow


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
