"""hamming_window on every runnable (backend, device): distances equal to comparisons of
the unpacked bool masks, at odd sizes, on strided, unaligned and empty inputs."""

import pytest
import torch

from tests.utils import ODD_SIZES, kernels_of, randn, random_bytes
from worm_fast import ops
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference


@pytest.mark.parametrize("n", (1, 64, 65, 4097))
def test_equals_bool_comparison(backend_device, n):
    backend, device = backend_device
    masks = [randn(n, seed=s, device=device).abs() > 0.6 for s in range(5)]
    packed = [ops.pack_mask(m.float(), 0.5) for m in masks]
    window = torch.stack(packed[:4])
    got = ops.hamming_window(packed[4], window, backend=backend)
    expected = torch.tensor([int((masks[4] != m).sum()) for m in masks[:4]], device=device)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


def _bool_hamming(current, window, nbits):
    cur = reference.unpack_mask(current, nbits)
    return torch.stack([(reference.unpack_mask(row, nbits) != cur).sum() for row in window])


@pytest.mark.parametrize("nbytes", sorted({packed_nbytes(n) for n in ODD_SIZES} | {200_008}))
@pytest.mark.parametrize("rows", (1, 5, 16))
def test_matches_bool_computation(backend_device, nbytes, rows):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    current = random_bytes(nbytes, seed=nbytes, device=device)
    window = random_bytes(rows, nbytes, seed=nbytes + rows, device=device)
    window[0] = current  # distance 0
    if rows > 1:
        window[1] = ~current  # every bit differs
    got = kernels.hamming_window(current, window)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, reference.hamming_window(current, window))
    assert torch.equal(got, _bool_hamming(current, window, nbytes * 8))
    assert got[0] == 0
    if rows > 1:
        assert got[1] == nbytes * 8


def test_non_contiguous_unaligned_and_empty(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    current = random_bytes(40, seed=1, device=device)
    window = random_bytes(10, 80, seed=2, device=device)[::2, ::2]  # strided rows, columns
    assert not window.is_contiguous()
    assert torch.equal(
        kernels.hamming_window(current, window), reference.hamming_window(current, window)
    )
    storage = random_bytes(3 + 4 * 24, device=device)
    unaligned, rows = storage[3:27], storage[3:].view(4, 24)  # not 8-byte aligned
    assert torch.equal(
        kernels.hamming_window(unaligned, rows), reference.hamming_window(unaligned, rows)
    )
    empty = kernels.hamming_window(current, window[:0])
    assert empty.shape == (0,) and empty.dtype == torch.int64
    zero_bytes = kernels.hamming_window(current[:0], window[:, :0])
    assert torch.equal(zero_bytes, torch.zeros(5, dtype=torch.int64, device=device))
    no_bytes = torch.empty(0, dtype=torch.uint8, device=device)
    assert kernels.hamming_window(no_bytes, no_bytes.view(3, 0)).tolist() == [0, 0, 0]
