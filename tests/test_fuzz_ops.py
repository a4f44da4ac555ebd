"""Property-based tests: every op on every runnable backend against the reference, on
random sizes, strides, storage offsets, dtypes, mask densities and hyperparameters.

The examples are derandomized so the suite is reproducible and quick; set
``HYPOTHESIS_PROFILE=deep`` for many more, freshly random ones.
"""

import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.utils import assert_close
from worm_fast import ops
from worm_fast.backends import reference

# backend_device is a parametrized fixture, constant within one test: safe to share
# across the examples of that test.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "offset", "strided", "transposed")

# Mostly small (the Triton interpreter is slow), sometimes across words and blocks.
sizes = st.one_of(st.integers(0, 130), st.sampled_from([255, 256, 257, 1000, 4097]))
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**31 - 1)


def matrix_shape(n: int) -> tuple[int, int]:
    """A 2-D shape of ``n`` elements (with more than one row when ``n`` allows)."""
    rows = next(d for d in (3, 2, 1) if n % d == 0)
    return rows, n // rows


def laid_out(values: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """``values`` as a matrix (``matrix_shape``) of the same elements in row-major order,
    stored with ``layout``: contiguous, at a storage offset, every other element of its
    storage, or column-major (a transposed contiguous matrix)."""
    shape = matrix_shape(values.numel())
    values = values.to(device).view(shape)
    if layout == "contiguous":
        return values
    if layout == "offset":
        storage = torch.zeros(values.numel() + 3, dtype=values.dtype, device=device)
        storage[3:] = values.reshape(-1)
        return storage[3:].view(shape)
    if layout == "strided":
        storage = torch.zeros(shape[0], 2 * shape[1], dtype=values.dtype, device=device)
        storage[:, ::2] = values
        return storage[:, ::2]
    return values.t().contiguous().t()


def random_tensor(n, dtype, generator, scale=1.0):
    return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype)


def random_mask(n, density, generator, device):
    kept = torch.rand(n, generator=generator) < density
    return reference.pack_mask(kept, torch.tensor(0.5)).to(device)


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_all_close(got, expected, what):
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert_close(a, e, what=f"{what}: tensor {i}")


@given(
    n=sizes,
    dtype=st.sampled_from((*DTYPES, torch.bool)),
    layout=st.sampled_from(LAYOUTS),
    threshold=st.one_of(st.sampled_from([-1.0, 0.0, 0.5, float("inf")]), st.floats(0.0, 3.0)),
    seed=seeds,
)
def test_pack_mask(backend_device, n, dtype, layout, threshold, seed):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(seed)
    values = random_tensor(n, torch.float64, generator)
    values[::3] = threshold if abs(threshold) < 1e30 else 0.5  # ties: kept is strict
    values = laid_out(values.to(dtype), layout, device)
    got = ops.pack_mask(values, threshold, backend=backend)
    expected = reference.pack_mask(values, torch.tensor(threshold, dtype=torch.float64))
    assert torch.equal(got, expected), (n, dtype, layout, threshold)


@given(n=sizes, offset=st.integers(0, 9), seed=seeds)
def test_unpack_mask(backend_device, n, offset, seed):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(seed)
    nbytes = ops.packed_nbytes(n)
    storage = torch.randint(0, 256, (offset + nbytes,), generator=generator, dtype=torch.uint8)
    packed = storage[offset:].to(device)
    got = ops.unpack_mask(packed, n, backend=backend)
    assert torch.equal(got, reference.unpack_mask(packed, n)), (n, offset)


@given(
    words=st.integers(0, 40),
    rows=st.integers(0, 9),
    offset=st.integers(0, 9),
    row_gap=st.integers(0, 16),
    seed=seeds,
)
# Found by the deep profile: one row whose stride is not a multiple of 8 (Triton viewed
# it as words without copying).
@example(words=1, rows=1, offset=0, row_gap=1, seed=0)
def test_hamming_window(backend_device, words, rows, offset, row_gap, seed):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(seed)
    nbytes, stride = 8 * words, 8 * words + row_gap
    storage = torch.randint(
        0, 256, (offset + nbytes + rows * stride,), generator=generator, dtype=torch.uint8
    ).to(device)
    current = storage[offset : offset + nbytes]
    window = storage[offset + nbytes :].as_strided((rows, nbytes), (stride, 1))
    got = ops.hamming_window(current, window, backend=backend)
    assert torch.equal(got, reference.hamming_window(current, window)), (words, rows, offset)


def step_inputs(draw_sizes, dtypes, layouts, generator, device):
    """Params stored with their drawn layouts, grads with another one each."""
    params = [
        laid_out(random_tensor(n, d, generator), layout, device)
        for n, d, layout in zip(draw_sizes, dtypes, layouts)
    ]
    grads = [
        laid_out(random_tensor(p.numel(), p.dtype, generator), LAYOUTS[LAYOUTS.index(layout) - 1],
                 device)
        for p, layout in zip(params, layouts)
    ]  # fmt: skip
    return params, grads


tensors_of_a_step = st.lists(
    st.tuples(sizes, st.sampled_from(DTYPES), st.sampled_from(LAYOUTS), densities, st.booleans()),
    min_size=1,
    max_size=4,
)


@given(
    tensors=tensors_of_a_step,
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.25]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    maximize=st.booleans(),
    is_first_step=st.booleans(),
    truncation=st.one_of(st.sampled_from([0.0, 1.0, 3e-3]), st.floats(0.0, 1.0)),
    lr=st.floats(1e-4, 1.0),
    grad_scale=st.sampled_from([None, 0.5, 1024.0]),
    seed=seeds,
)
def test_masked_sgd_step(
    backend_device, tensors, momentum, dampening, nesterov, weight_decay, maximize,
    is_first_step, truncation, lr, grad_scale, seed,
):  # fmt: skip
    backend, device = backend_device
    nesterov = nesterov and momentum != 0 and dampening == 0
    generator = torch.Generator().manual_seed(seed)
    sizes_, dtypes, layouts, mask_densities, masked = zip(*tensors)
    params, grads = step_inputs(sizes_, dtypes, layouts, generator, device)
    buffers = [
        random_tensor(p.numel(), p.dtype, generator).to(device).view(p.shape) for p in params
    ]
    masks = [
        random_mask(p.numel(), density, generator, device) if use else None
        for p, density, use in zip(params, mask_densities, masked)
    ]
    hyperparameters = dict(
        lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
        weight_decay=weight_decay, maximize=maximize, is_first_step=is_first_step,
        truncation=truncation,
        grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
    )  # fmt: skip
    results = {}
    for name in (backend, "reference"):
        state, state_buffers = clones(params), clones(buffers) if momentum else []
        ops.masked_sgd_step_(state, grads, state_buffers, masks, **hyperparameters, backend=name)
        results[name] = state + state_buffers
    assert_all_close(results[backend], results["reference"], f"{backend} {tensors}")


@given(
    tensors=tensors_of_a_step,
    beta1=st.sampled_from([0.0, 0.4, 0.9]),
    beta2=st.sampled_from([0.0, 0.5, 0.999]),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    eps=st.sampled_from([1e-8, 1e-3]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    truncation=st.one_of(st.sampled_from([0.0, 1.0, 3e-3]), st.floats(0.0, 1.0)),
    lr=st.floats(1e-4, 0.1),
    step=st.sampled_from([0.0, 1.0, 99.0]),
    seed=seeds,
)
def test_masked_adamw_step(
    backend_device, tensors, beta1, beta2, weight_decay, eps, amsgrad, maximize, truncation,
    lr, step, seed,
):  # fmt: skip
    backend, device = backend_device
    generator = torch.Generator().manual_seed(seed)
    sizes_, dtypes, layouts, mask_densities, masked = zip(*tensors)
    params, grads = step_inputs(sizes_, dtypes, layouts, generator, device)
    exp_avgs = [laid_out(random_tensor(p.numel(), p.dtype, generator, 0.1), "offset", device)
                for p in params]  # fmt: skip
    # Second moments away from 0: a tiny one makes the update large and p - update cancel,
    # and the comparison would measure rounding order instead of the formula.
    exp_avg_sqs = [laid_out(random_tensor(p.numel(), p.dtype, generator).abs() + 0.25,
                            "contiguous", device) for p in params]  # fmt: skip
    max_exp_avg_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(step, device=device) for _ in params]
    masks = [
        random_mask(p.numel(), density, generator, device) if use else None
        for p, density, use in zip(params, mask_densities, masked)
    ]
    hyperparameters = dict(
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
        maximize=maximize, truncation=truncation,
    )  # fmt: skip
    results = {}
    for name in (backend, "reference"):
        state = [clones(t) for t in (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)]
        ops.masked_adamw_step_(state[0], grads, *state[1:], masks, **hyperparameters, backend=name)
        results[name] = [t for tensors_ in state for t in tensors_]
    assert_all_close(results[backend], results["reference"], f"{backend} {tensors}")


def test_the_layouts_really_are_offset_and_strided():
    """The examples above reach non-contiguous storage: the helper is what it claims."""
    values = torch.arange(12.0)
    assert laid_out(values, "offset", "cpu").storage_offset() == 3
    for layout in ("strided", "transposed"):
        matrix = laid_out(values, layout, "cpu")
        assert not matrix.is_contiguous(), layout
        assert torch.equal(matrix.reshape(-1), values), layout
