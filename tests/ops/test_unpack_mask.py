"""unpack_mask on every runnable (backend, device) against the reference, and the round
trip through the same backend's pack_mask."""

import pytest
import torch

from tests.utils import ODD_SIZES, kernels_of, randn, random_bytes
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference


@pytest.mark.parametrize("size", (0, *ODD_SIZES, 100_001))
def test_matches_reference_and_round_trips(backend_device, size):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    packed = random_bytes(packed_nbytes(size), seed=size, device=device)
    got = kernels.unpack_mask(packed, size)
    assert got.dtype == torch.bool and got.shape == (size,)
    assert torch.equal(got, reference.unpack_mask(packed, size))
    values = randn(size, seed=size, device=device)
    threshold = torch.tensor(0.5, device=device)
    round_trip = kernels.unpack_mask(kernels.pack_mask(values, threshold), size)
    assert torch.equal(round_trip, values.abs() > threshold)


def test_prefix_and_non_contiguous_packed(backend_device):
    kernels = kernels_of(backend_device)
    packed = random_bytes(64, seed=9, device=backend_device[1])
    for numel in (0, 1, 13, 100, 512):
        assert torch.equal(kernels.unpack_mask(packed, numel), reference.unpack_mask(packed, numel))
    strided = packed[::2]
    assert torch.equal(kernels.unpack_mask(strided, 200), reference.unpack_mask(strided, 200))
