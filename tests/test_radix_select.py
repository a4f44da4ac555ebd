"""The exact threshold: ``magnitude_histogram`` on every runnable backend against the
reference, and ``radix_select`` against ``torch.kthvalue`` of the same magnitudes, on odd
sizes, several tensors of mixed sizes, every dtype, ties, ±0, subnormals and infinities;
NaN refused; the sampled guess and its fallback; opcheck; clear errors for bad input."""

import pytest
import torch

from tests.utils import ODD_SIZES, RUNNABLE_BACKENDS
from worm_fast import _ops, ops, radix_select
from worm_fast.backends import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _case(sizes, dtype, seed=0, device="cpu"):
    """Tensors of ``sizes``: normal values with ties, +0 and -0, subnormals and ±inf."""
    generator = torch.Generator().manual_seed(seed)
    subnormal = torch.finfo(dtype).tiny / 4
    tensors = []
    for n in sizes:
        t = torch.randn(n, generator=generator).to(dtype)
        t[::7] = 0.0
        t[3::11] = -0.0
        t[1::13] = subnormal
        t[4::19] = -subnormal / 2
        t[5::9] = 0.5  # ties
        t[2::17] = float("inf")
        t[6::23] = -float("inf")
        tensors.append(t.to(device))
    return tensors


def _kthvalue(tensors, position):
    magnitudes = torch.cat([t.detach().reshape(-1).abs().cpu() for t in tensors])
    return magnitudes.kthvalue(position + 1).values


def _key(value, dtype):
    return int(torch.tensor(value, dtype=dtype).abs().view(_ops.MAGNITUDE_KEYS[dtype].storage))


# ---------------------------------------------------------------------------------------
# magnitude_histogram against the reference.


def _windows(dtype):
    """(lo, shift, bits, stride) of the passes: a full first pass (per-program counts on
    GPUs), a narrow window at full resolution (atomics per key), a shifted one, a sample."""
    bits = _ops.MAGNITUDE_KEYS[dtype].bits
    near_half = _key(0.5, dtype)
    return [
        (0, bits - 12, 12, 1),
        (near_half - 700, 0, 14, 1),
        (near_half >> 3 << 3, 3, 8, 1),
        (0, bits - 10, 10, 3),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_tensor", (False, True), ids=("one_row", "row_per_tensor"))
def test_histogram_matches_reference(backend_device, dtype, per_tensor):
    backend, device = backend_device
    tensors = _case(ODD_SIZES, dtype, device=device)
    tensors[1][2] = float("nan")
    tensors[-1][::31] = -float("nan")
    rows = len(tensors) if per_tensor else 1
    for lo, shift, bits, stride in _windows(dtype):
        # Per tensor, each row gets its own window start.
        starts = torch.tensor([lo + 37 * row for row in range(rows)], device=device)
        got = ops.magnitude_histogram(tensors, starts, shift, bits, stride=stride, backend=backend)
        expected = reference.magnitude_histogram(tensors, starts, shift, bits, stride)
        assert got.dtype == torch.int64 and got.shape == (rows, (1 << bits) + 2)
        assert torch.equal(got.cpu(), expected.cpu()), (lo, shift, bits, stride)


def test_reference_histogram_counts_by_hand():
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("nan"), 0.5])
    one, two = _key(1.0, torch.float32), _key(2.0, torch.float32)
    # Window [key(1.0), key(1.0) + 2**24) in 2 digits of 2**23 keys: [1, 2) and [2, 4).
    counts = reference.magnitude_histogram([values], torch.tensor([one]), 23, 1)
    assert two - one == 1 << 23
    assert counts.tolist() == [[2, 1, 3, 1]]  # 1.0 twice; 2.0; below: 0, -0, 0.5; one NaN
    # Sampling: only the first block of 64 of every 2 counts.
    ones = torch.ones(64 * 5)
    assert reference.magnitude_histogram([ones], torch.tensor([0]), 30, 1, 2).tolist() == [
        [64 * 3, 0, 0, 0]
    ]


def test_cpp_histogram_over_threads_matches_reference():
    """Large enough for the work to be split across threads, whose counts meet in the
    result under a lock, row by row."""
    tensors = _case((70_000, 3, 140_001, 65), torch.float32, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for starts in (torch.tensor([0]), torch.tensor([0, 5, 10, 15])):
            got = ops.magnitude_histogram(tensors, starts, 19, 12, backend="cpp")
            expected = reference.magnitude_histogram(tensors, starts, 19, 12)
            assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# The selection against torch.kthvalue.


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_magnitude_equals_kthvalue(backend_device, dtype):
    backend, device = backend_device
    tensors = _case(ODD_SIZES, dtype, seed=1, device=device)
    total = sum(ODD_SIZES)
    for position in (0, int(total * 0.3), total // 2, int(total * 0.9), total - 1):
        for guess in (False, True):
            got = radix_select.kth_magnitudes(tensors, [position], backend=backend, guess=guess)
            assert got.dtype == dtype and got.device.type == device and got.shape == (1,)
            assert torch.equal(got[0].cpu(), _kthvalue(tensors, position)), (position, guess)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_magnitude_per_tensor(backend_device, dtype):
    backend, device = backend_device
    tensors = _case(ODD_SIZES, dtype, seed=3, device=device)
    positions = [int(t.numel() * 0.5) for t in tensors]
    got = radix_select.kth_magnitudes(tensors, positions, per_tensor=True, backend=backend)
    expected = [_kthvalue([t], p) for t, p in zip(tensors, positions)]
    assert torch.equal(got.cpu(), torch.stack(expected))


@pytest.mark.parametrize(
    "values",
    [
        torch.zeros(65),  # all ties, at zero
        torch.tensor([-0.0, 0.0] * 40),  # signed zeros are one magnitude
        torch.full((7,), -3.25),
        torch.tensor([1e-45, -1e-45, 3e-45, 0.0, -1e-40]),  # subnormals and zeros
        torch.tensor([float("inf"), -float("inf"), 1.0]),
        torch.tensor([torch.finfo(torch.float32).max, -float("inf"), 1e-45]),
    ],
    ids=["zeros", "signed_zeros", "equal", "subnormals", "infinities", "extremes"],
)
def test_kth_magnitude_of_special_values(backend_device, values):
    backend, device = backend_device
    values = values.to(device)
    for position in range(values.numel()):
        got = radix_select.kth_magnitudes([values], [position], backend=backend)[0]
        assert torch.equal(got.cpu(), _kthvalue([values], position)), position


def test_kth_magnitude_is_exact_in_float64():
    # Neighbours one float64 ulp apart: a float32 computation could not tell them apart.
    base = torch.tensor(0.1, dtype=torch.float64)
    values = torch.stack([base, base.nextafter(torch.tensor(1.0, dtype=torch.float64))] * 8)
    for position in range(values.numel()):
        got = radix_select.kth_magnitudes([values], [position])[0]
        assert got.item() == _kthvalue([values], position).item()
    assert radix_select.kth_magnitudes([values], [15])[0] > base


def test_mixed_dtypes_are_read_in_the_promoted_dtype():
    half = torch.tensor([0.1, -2.0, 3.0], dtype=torch.float16)
    single = torch.tensor([0.25, 1.5], dtype=torch.float32)
    got = radix_select.kth_magnitudes([half, single], [1])
    assert got.dtype == torch.float32
    assert got.item() == float(torch.tensor(0.25))
    got = radix_select.kth_magnitudes([half, single.double()], [4])
    assert got.dtype == torch.float64 and got.item() == 3.0


def test_nan_is_refused(backend_device):
    backend, device = backend_device
    tensors = _case((64, 65), torch.float32, device=device)
    tensors[1][10] = float("nan")
    with pytest.raises(ValueError, match=r"NaN values found \(1\)"):
        radix_select.kth_magnitudes(tensors, [3], backend=backend)
    with pytest.raises(ValueError, match=r"NaN values found \(tensors\[1\]: 1\)"):
        radix_select.kth_magnitudes(tensors, [3, 3], per_tensor=True, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_selection_on_gpu(dtype):
    tensors = _case((1 << 22, 3, 100_001), dtype, seed=4, device="cuda")
    total = sum(t.numel() for t in tensors)
    for backend in {name for name, device in RUNNABLE_BACKENDS if device == "cuda"}:
        for position in (0, int(total * 0.5), total - 1):
            got = radix_select.kth_magnitudes(tensors, [position], backend=backend)
            assert torch.equal(got[0].cpu(), _kthvalue(tensors, position)), (backend, position)


# ---------------------------------------------------------------------------------------
# The guessed window.


class _Recorder:
    """A ``radix_select.Histogram`` over ``tensors`` that records each pass."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.passes = []

    def __call__(self, lo, shift, bits, stride):
        self.passes.append((shift, bits, stride))
        return ops.magnitude_histogram(self.tensors, lo, shift, bits, stride=stride)


def _select(tensors, position, *, guess):
    recorder = _Recorder(tensors)
    total = sum(t.numel() for t in tensors)
    keys, nans = radix_select.select_keys(
        recorder,
        _ops.MAGNITUDE_KEYS[tensors[0].dtype].bits,
        torch.tensor([position]),
        torch.tensor([total]),
        bits_per_pass=12,
        guess=guess,
    )
    assert nans.tolist() == [0]
    return radix_select.key_values(keys, tensors[0].dtype)[0], recorder.passes


def test_guess_resolves_the_key_in_one_pass_after_the_sample():
    # 4M elements: a sample of 256K places the median within 2**18 keys.
    tensors = [
        torch.randn(1024, 1024, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    position = int(4 * 1024 * 1024 * 0.5)
    value, passes = _select(tensors, position, guess=True)
    assert value == _kthvalue(tensors, position)
    sample, window = passes
    assert sample == (31 - radix_select.SAMPLE_BITS, radix_select.SAMPLE_BITS, 16)
    assert window[0] == 0 and window[2] == 1  # full resolution, every element
    # Without the guess: 31 bits in passes of 12.
    plain, passes = _select(tensors, position, guess=False)
    assert plain == value and passes == [(19, 12, 1), (7, 12, 1), (0, 7, 1)]


def test_guess_falls_back_when_the_sample_misleads():
    # Every sampled block (the 1st of each 16) holds large values, the others small ones:
    # the window guessed from the sample misses position k, and the plain passes run.
    values = torch.rand(64 * 16 * 40, generator=torch.Generator().manual_seed(5))
    values.view(-1, 64)[::16] += 100.0
    # The large values are the top 1/16: below the 0.9 quantile the sample is all wrong.
    for position in (0, values.numel() // 2, int(values.numel() * 0.9)):
        value, passes = _select([values], position, guess=True)
        assert value == _kthvalue([values], position)
        assert passes[2:] == [(19, 12, 1), (7, 12, 1), (0, 7, 1)], passes


def test_auto_guess_on_large_cpu_inputs_only(monkeypatch):
    seen = []
    real = radix_select.select_keys

    def spy(*args, guess, **kwargs):
        seen.append(guess)
        return real(*args, guess=guess, **kwargs)

    monkeypatch.setattr(radix_select, "select_keys", spy)
    monkeypatch.setattr(radix_select, "GUESS_MIN_ELEMENTS", 100)
    radix_select.kth_magnitudes([torch.randn(99)], [5])
    radix_select.kth_magnitudes([torch.randn(60), torch.randn(40)], [5])
    assert seen == [False, True]


# ---------------------------------------------------------------------------------------
# opcheck and bad input.


def test_opcheck():
    tensors = _case((65, 7), torch.float32)
    for lo in (torch.tensor([0]), torch.tensor([0, 3])):
        torch.library.opcheck(torch.ops.worm_fast.magnitude_histogram, (tensors, lo, 19, 12, 2))


class TestBadInput:
    def test_histogram_rejects_integer_tensors(self):
        with pytest.raises(TypeError, match="must be float32, float64, float16 or bfloat16"):
            ops.magnitude_histogram([torch.arange(5)], torch.tensor([0]), 0, 4)

    def test_histogram_rejects_mixed_dtypes(self):
        with pytest.raises(ValueError, match=r"tensors\[1\] is torch.float64"):
            ops.magnitude_histogram(
                [torch.ones(3), torch.ones(3, dtype=torch.float64)], torch.tensor([0]), 0, 4
            )

    def test_histogram_rejects_a_window_start_per_row_of_the_wrong_count(self):
        with pytest.raises(ValueError, match=r"lo must be int64 of shape \[1\] or \[2\]"):
            ops.magnitude_histogram([torch.ones(3)] * 2, torch.tensor([0, 0, 0]), 0, 4)
        with pytest.raises(ValueError, match="lo must be int64"):
            ops.magnitude_histogram([torch.ones(3)], torch.tensor([0.0]), 0, 4)

    @pytest.mark.parametrize(("shift", "bits"), [(0, 0), (0, 19), (-1, 4), (20, 12)])
    def test_histogram_rejects_windows_outside_the_key(self, shift, bits):
        with pytest.raises(ValueError, match="need 1 <= bits <= 18"):
            ops.magnitude_histogram([torch.ones(3)], torch.tensor([0]), shift, bits)

    def test_histogram_rejects_a_zero_stride(self):
        with pytest.raises(ValueError, match="stride must be >= 1"):
            ops.magnitude_histogram([torch.ones(3)], torch.tensor([0]), 0, 4, stride=0)

    def test_cpp_kernel_checks_its_arguments_too(self):
        op = torch.ops.worm_fast.magnitude_histogram
        with pytest.raises(RuntimeError, match="expected at least one tensor"):
            op([], torch.tensor([0]), 0, 4)
        with pytest.raises(RuntimeError, match="shift \\+ bits <= 15"):
            op([torch.ones(3, dtype=torch.float16)], torch.tensor([0]), 4, 12)

    def test_select_rejects_positions_outside_the_elements(self):
        with pytest.raises(ValueError, match="position 3 is outside the 3 elements"):
            radix_select.kth_magnitudes([torch.ones(3)], [3])
        with pytest.raises(ValueError, match=r"outside the 0 elements of tensors\[1\]"):
            radix_select.kth_magnitudes([torch.ones(3), torch.ones(0)], [0, 0], per_tensor=True)
        with pytest.raises(ValueError, match="expected 2 position"):
            radix_select.kth_magnitudes([torch.ones(3), torch.ones(2)], [0], per_tensor=True)

    def test_select_rejects_integer_tensors_and_empty_lists(self):
        with pytest.raises(TypeError, match=r"tensors\[0\] must be floating point"):
            radix_select.kth_magnitudes([torch.arange(3)], [0])
        with pytest.raises(ValueError, match="at least one tensor"):
            radix_select.kth_magnitudes([], [0])
