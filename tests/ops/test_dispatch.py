"""The public ops on every CPU backend: packed-mask layout, round trips, Hamming distances
against plain bool computations, opcheck, and clear errors for bad input."""

import pytest
import torch

from tests.utils import ODD_SIZES
from worm_fast import backends, ops

CPU_BACKENDS = ("reference", "cpp", "triton")


def random_values(n, seed=0, dtype=torch.float32):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", ODD_SIZES)
def test_pack_layout_and_round_trip(backend, n):
    values = random_values(n, seed=n)
    for threshold in (-1.0, 0.5, float("inf")):  # 100 %, random, 0 % kept
        packed = ops.pack_mask(values, threshold, backend=backend)
        kept = values.abs() > threshold
        assert packed.dtype == torch.uint8 and packed.numel() == ops.packed_nbytes(n)
        assert packed.numel() % 8 == 0
        # DESIGN §3.1, bit by bit: element i is bit i % 8 of byte i // 8; padding is 0.
        for i in (0, n // 2, n - 1):
            assert bool((int(packed[i // 8]) >> (i % 8)) & 1) == bool(kept[i])
        padding = torch.arange(n, packed.numel() * 8)
        assert not ((packed[padding // 8].long() >> (padding % 8)) & 1).any()
        assert torch.equal(ops.unpack_mask(packed, n, backend=backend), kept)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_mask_of_a_strided_tensor_is_row_major(backend):
    matrix = random_values(7 * 9).view(7, 9)
    packed = ops.pack_mask(matrix.t(), 0.3, backend=backend)
    expected = matrix.t().contiguous().reshape(-1).abs() > 0.3
    assert torch.equal(ops.unpack_mask(packed, 63, backend=backend), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", (1, 64, 65, 4097))
def test_hamming_window_equals_bool_comparison(backend, n):
    masks = [random_values(n, seed=s).abs() > 0.6 for s in range(5)]
    packed = [ops.pack_mask(m.float(), 0.5) for m in masks]
    window = torch.stack(packed[:4])
    got = ops.hamming_window(packed[4], window, backend=backend)
    expected = torch.tensor([int((masks[4] != m).sum()) for m in masks[:4]])
    assert got.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize(
    "op, args",
    [
        ("pack_mask", lambda: (random_values(65), torch.tensor(0.5))),
        ("unpack_mask", lambda: (torch.randint(0, 256, (16,), dtype=torch.uint8), 65)),
        ("hamming_window", lambda: (torch.randint(0, 256, (16,), dtype=torch.uint8),
                                    torch.randint(0, 256, (3, 16), dtype=torch.uint8))),
    ],
)  # fmt: skip
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.worm_fast, op), args())


def test_opcheck_optimizer_steps():
    params = [random_values(n, seed=n) for n in (7, 65)]
    grads = [random_values(n, seed=n + 1) for n in (7, 65)]
    masks = [ops.pack_mask(p, 0.5) for p in params]
    torch.library.opcheck(
        torch.ops.worm_fast.masked_sgd_step_,
        ([p.clone() for p in params], grads, [torch.zeros_like(p) for p in params], masks),
        dict(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
             maximize=False, is_first_step=True, truncation=0.1),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.worm_fast.masked_adamw_step_,
        ([p.clone() for p in params], grads, [torch.zeros_like(p) for p in params],
         [torch.zeros_like(p) for p in params], [], [torch.zeros(()) for _ in params], masks),
        dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False,
             maximize=False, truncation=0.1),
    )  # fmt: skip


class TestBadInput:
    def test_pack_rejects_integer_values(self):
        with pytest.raises(TypeError, match="floating point or bool"):
            ops.pack_mask(torch.arange(5), 1)

    def test_pack_rejects_a_tensor_threshold_of_many_values(self):
        with pytest.raises(ValueError, match="threshold must be a scalar"):
            ops.pack_mask(random_values(5), torch.ones(2))

    def test_unpack_rejects_the_wrong_length(self):
        with pytest.raises(ValueError, match="packed mask of 16 bytes for 65 elements"):
            ops.unpack_mask(torch.zeros(8, dtype=torch.uint8), 65)

    def test_hamming_rejects_mismatched_widths(self):
        with pytest.raises(ValueError, match=r"window \[l, nbytes\]"):
            ops.hamming_window(
                torch.zeros(8, dtype=torch.uint8), torch.zeros(2, 16, dtype=torch.uint8)
            )

    def test_hamming_rejects_float_masks(self):
        with pytest.raises(TypeError, match="must be uint8"):
            ops.hamming_window(torch.zeros(8), torch.zeros(2, 8))

    def test_forcing_an_unavailable_backend_says_why(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            ops.pack_mask(random_values(5), 0.5)

    def test_environment_variable_forces_a_backend(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        assert backends.resolve(None, torch.device("cpu")).__name__.endswith("reference")
        assert backends.resolve("cpp", torch.device("cpu")).__name__.endswith("cpp")


def test_auto_picks_cpp_on_cpu_and_reference_elsewhere():
    assert backends.resolve(None, torch.device("cpu")).__name__.endswith(".cpp")
    assert backends.resolve(None, torch.device("meta")).__name__.endswith(".reference")
    status = backends.available()
    assert status["reference"].available and status["cpp"].available, status["cpp"].reason
