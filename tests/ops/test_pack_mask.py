"""pack_mask on every runnable (backend, device): the packed layout of DESIGN §3.1 bit by
bit, and the reference backend's masks at odd sizes, in every dtype, with ties."""

import pytest
import torch

from tests.utils import (
    DENSITY_THRESHOLDS,
    DTYPES,
    ODD_SIZES,
    kernels_of,
    randn,
    skip_large_sizes_when_interpreted,
)
from worm_fast import ops
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference


@pytest.mark.parametrize("n", ODD_SIZES)
def test_layout_and_round_trip(backend_device, n):
    backend, device = backend_device
    values = randn(n, seed=n, device=device)
    for threshold in (-1.0, 0.5, float("inf")):  # 100 %, random, 0 % kept
        packed = ops.pack_mask(values, threshold, backend=backend)
        kept = values.abs() > threshold
        assert packed.dtype == torch.uint8 and packed.numel() == ops.packed_nbytes(n)
        assert packed.numel() % 8 == 0
        # DESIGN §3.1, bit by bit: element i is bit i % 8 of byte i // 8; padding is 0.
        for i in (0, n // 2, n - 1):
            assert bool((int(packed[i // 8]) >> (i % 8)) & 1) == bool(kept[i])
        padding = torch.arange(n, packed.numel() * 8, device=device)
        assert not ((packed[padding // 8].long() >> (padding % 8)) & 1).any()
        assert torch.equal(ops.unpack_mask(packed, n, backend=backend), kept)


def test_strided_tensor_is_packed_row_major(backend_device):
    backend, device = backend_device
    matrix = randn(7 * 9, device=device).view(7, 9)
    packed = ops.pack_mask(matrix.t(), 0.3, backend=backend)
    expected = matrix.t().contiguous().reshape(-1).abs() > 0.3
    assert torch.equal(ops.unpack_mask(packed, 63, backend=backend), expected)


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITY_THRESHOLDS)
def test_matches_reference(backend_device, size, dtype, density):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    values = randn(size, dtype=dtype, seed=size, device=device)
    values[::3] = 0.5  # ties with the random threshold: kept = |v| > t, strictly
    threshold = torch.tensor(DENSITY_THRESHOLDS[density], device=device)
    got = kernels.pack_mask(values, threshold)
    assert got.dtype == torch.uint8 and got.shape == (packed_nbytes(size),)
    assert torch.equal(got, reference.pack_mask(values, threshold))
    # Padding bits past `size` are zero.
    bits = reference.unpack_mask(got, packed_nbytes(size) * 8)
    assert not bits[size:].any()


@pytest.mark.compares_with_reference
def test_large_tensor_matches_reference(backend_device):
    skip_large_sizes_when_interpreted(backend_device)
    kernels = kernels_of(backend_device)
    values = randn(1_000_003, seed=1, device=backend_device[1])  # every thread, many blocks
    threshold = torch.tensor(0.7, device=values.device)
    assert torch.equal(kernels.pack_mask(values, threshold), reference.pack_mask(values, threshold))


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_values(backend_device, dtype):
    kernels = kernels_of(backend_device)
    base = randn(37, 29, dtype=dtype, seed=3, device=backend_device[1])
    for threshold_dtype in (torch.float32, torch.float64):
        threshold = torch.tensor(0.4, dtype=threshold_dtype, device=base.device)
        for values in (base.t(), base[:, ::3], base[::2].t()[5:]):
            assert not values.is_contiguous()
            assert torch.equal(
                kernels.pack_mask(values, threshold), reference.pack_mask(values, threshold)
            ), (values.shape, values.stride(), threshold_dtype)


@pytest.mark.compares_with_reference
def test_special_values_and_threshold_dtypes(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    values = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 0.3, -0.3, 1e-30, 0.30000001],
        device=device,
    )
    for threshold in (
        torch.tensor(0.3),
        torch.tensor(0.3, dtype=torch.float64),  # rounded to float32, like the reference
        torch.tensor([0.0]),
        torch.tensor(-1.0, dtype=torch.bfloat16),
    ):
        threshold = threshold.to(device)
        assert torch.equal(
            kernels.pack_mask(values, threshold), reference.pack_mask(values, threshold)
        ), threshold


def test_float64_compares_in_float64(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    values = torch.tensor([0.1 + 1e-12, 0.1, 0.1 - 1e-12], dtype=torch.float64, device=device)
    threshold = torch.tensor(0.1, dtype=torch.float64, device=device)
    got = kernels.pack_mask(values, threshold)
    assert got[0].item() == 0b001
    assert torch.equal(got, reference.pack_mask(values, threshold))


def test_empty(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    got = kernels.pack_mask(torch.empty(0, device=device), torch.tensor(0.0, device=device))
    assert got.shape == (0,) and got.dtype == torch.uint8
