"""The Triton backend against the reference backend.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``conftest`` sets
``TRITON_INTERPRET=1``); with one, the same tests run the compiled kernels on CUDA.
The interpreter is slow, so the optimizer grid is a representative subset of the
hyperparameter product, each case over the ``ODD_SIZES`` list at once.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import ODD_SIZES, assert_close
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference
from worm_fast.backends import triton as backend

STATUS = backend.status()
pytestmark = pytest.mark.skipif(not STATUS.available, reason=STATUS.reason)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def gpu(test):
    """Mark a test that needs a real GPU, and skip it cleanly without one."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(needs_cuda(test))


def _randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=DEVICE)


def _random_bytes(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(DEVICE)


# Thresholds giving masks of 0 %, random and 100 % density (|x| > -1 always holds).
DENSITY_THRESHOLDS = {"none_kept": float("inf"), "random": 0.5, "all_kept": -1.0}


def test_status_matches_environment():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert STATUS.device_types == (("cpu", "cuda") if interpreted else ("cuda",))


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITY_THRESHOLDS)
def test_pack_mask_matches_reference(size, dtype, density):
    values = _randn(size, dtype=dtype, seed=size)
    threshold = torch.tensor(DENSITY_THRESHOLDS[density], device=DEVICE)
    values[::3] = 0.5  # ties with the random threshold: kept = |v| > t, strictly
    got = backend.pack_mask(values, threshold)
    assert got.dtype == torch.uint8 and got.shape == (packed_nbytes(size),)
    assert torch.equal(got, reference.pack_mask(values, threshold))


def test_pack_mask_flattens_row_major_and_reads_fp64_threshold():
    values = _randn(5, 13, dtype=torch.float64).t()  # non-contiguous
    threshold = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    assert torch.equal(backend.pack_mask(values, threshold), reference.pack_mask(values, threshold))


@pytest.mark.parametrize("size", ODD_SIZES)
def test_unpack_mask_matches_reference(size):
    packed = _random_bytes(packed_nbytes(size), seed=size)
    assert torch.equal(backend.unpack_mask(packed, size), reference.unpack_mask(packed, size))
    values = _randn(size, seed=size)
    threshold = torch.tensor(0.5, device=DEVICE)
    round_trip = backend.unpack_mask(backend.pack_mask(values, threshold), size)
    assert torch.equal(round_trip, values.abs() > threshold)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_hamming_window_matches_reference(size):
    nbytes = packed_nbytes(size)
    current = _random_bytes(nbytes, seed=size)
    # Itself (0 bits), its complement (all bits), and random masks.
    window = torch.stack([current, ~current, *_random_bytes(3, nbytes, seed=size + 1)])
    got = backend.hamming_window(current, window)
    assert got.dtype == torch.int64
    assert torch.equal(got, reference.hamming_window(current, window))
    assert got[0] == 0 and got[1] == 8 * nbytes


def test_hamming_window_of_unaligned_views():
    storage = _random_bytes(3 + 4 * 24)
    current, window = storage[3:27], storage[3:].view(4, 24)  # not 8-byte aligned
    assert torch.equal(
        backend.hamming_window(current, window), reference.hamming_window(current, window)
    )


def test_empty_inputs():
    empty = torch.empty(0, device=DEVICE)
    no_bytes = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    assert backend.pack_mask(empty, torch.tensor(0.0, device=DEVICE)).numel() == 0
    assert backend.unpack_mask(no_bytes, 0).numel() == 0
    assert backend.hamming_window(no_bytes, no_bytes.view(3, 0)).tolist() == [0, 0, 0]
    assert backend.hamming_window(_random_bytes(8), _random_bytes(0, 8)).numel() == 0


# A representative subset of momentum x dampening x nesterov x weight_decay x maximize x
# first step: every flag both ways, and each with and without momentum's other terms.
SGD_CASES = {
    "plain": dict(momentum=0.0),
    "wd_maximize": dict(momentum=0.0, weight_decay=1e-2, maximize=True),
    "momentum_first": dict(momentum=0.9, is_first_step=True),
    "momentum_dampening_wd": dict(momentum=0.9, dampening=0.1, weight_decay=5e-4),
    "dampening_first_maximize": dict(
        momentum=0.9, dampening=0.1, is_first_step=True, maximize=True
    ),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "nesterov_first_all": dict(
        momentum=0.5, nesterov=True, is_first_step=True, maximize=True, weight_decay=1e-2
    ),
    "dampening_maximize": dict(momentum=0.9, dampening=0.5, maximize=True),
}
MASKS = ("no_mask", *DENSITY_THRESHOLDS)


def _sgd_inputs(sizes, dtypes, case, mask_kind, seed=0):
    params = [_randn(n, dtype=d, seed=seed + i) for i, (n, d) in enumerate(zip(sizes, dtypes))]
    grads = [_randn(n, dtype=d, seed=seed + 100 + i) for i, (n, d) in enumerate(zip(sizes, dtypes))]
    buffers = []
    if case.get("momentum", 0) != 0:
        buffers = [
            _randn(n, dtype=d, seed=seed + 200 + i) for i, (n, d) in enumerate(zip(sizes, dtypes))
        ]
    masks = []
    if mask_kind != "no_mask":
        threshold = torch.tensor(DENSITY_THRESHOLDS[mask_kind], device=DEVICE)
        masks = [
            reference.pack_mask(_randn(n, seed=seed + 300 + i), threshold)
            for i, n in enumerate(sizes)
        ]
        masks[0] = None  # a list may mix masked and unmasked tensors
    return params, grads, buffers, masks


def _hyperparameters(**overrides):
    hyperparameters = dict(
        lr=0.1,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
        truncation=3e-3,
    )
    return {**hyperparameters, **overrides}


def _step_both(params, grads, buffers, masks, **hyperparameters):
    """Run both backends on copies; return (triton params + buffers, reference ones)."""
    ours = [t.clone() for t in params], [t.clone() for t in buffers]
    theirs = [t.clone() for t in params], [t.clone() for t in buffers]
    backend.masked_sgd_step_(ours[0], grads, ours[1], masks, **hyperparameters)
    reference.masked_sgd_step_(theirs[0], grads, theirs[1], masks, **hyperparameters)
    return ours[0] + ours[1], theirs[0] + theirs[1]


def _assert_all_close(ours, theirs):
    for i, (got, expected) in enumerate(zip(ours, theirs)):
        assert got.dtype == expected.dtype
        assert_close(got, expected, what=f"tensor {i} ({got.numel()} elements)")


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_matches_reference(dtype, case, mask_kind):
    # fp64 at rtol 1e-12 also proves the float hyperparameters reach the kernel unrounded.
    inputs = _sgd_inputs(ODD_SIZES, [dtype] * len(ODD_SIZES), SGD_CASES[case], mask_kind)
    _assert_all_close(*_step_both(*inputs, **_hyperparameters(**SGD_CASES[case])))


@pytest.mark.parametrize("scalars", ["grad_scale", "lr_tensor", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_device_scalars(dtype, scalars):
    sizes = (7, 65, 4097)
    case = SGD_CASES["momentum_dampening_wd"]
    inputs = _sgd_inputs(sizes, [dtype] * 3, case, "random")
    tensors = {}
    if scalars in ("grad_scale", "both"):
        tensors["grad_scale"] = torch.tensor([1024.0], device=DEVICE)
    if scalars in ("lr_tensor", "both"):  # ignores the float lr
        tensors["lr_tensor"] = torch.tensor([0.05], dtype=torch.float64, device=DEVICE)
    _assert_all_close(*_step_both(*inputs, **_hyperparameters(**case), **tensors))


@pytest.mark.parametrize("is_first_step", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_step_found_inf(dtype, is_first_step):
    sizes = (1, 65, 4097)
    case = dict(SGD_CASES["nesterov_wd"], is_first_step=is_first_step)
    params, grads, buffers, masks = _sgd_inputs(sizes, [dtype] * 3, case, "random")
    scale = torch.tensor([8.0], device=DEVICE)
    before = [t.clone() for t in params + buffers]
    skip = torch.tensor([1.0], device=DEVICE)
    hyperparameters = _hyperparameters(**case)
    backend.masked_sgd_step_(
        params, grads, buffers, masks, grad_scale=scale, found_inf=skip, **hyperparameters
    )
    for got, expected in zip(params + buffers, before):
        assert torch.equal(got, expected), "a step with found_inf != 0 changed a tensor"
    finite = torch.tensor([0.0], device=DEVICE)
    both = _step_both(
        params, grads, buffers, masks, grad_scale=scale, found_inf=finite, **hyperparameters
    )
    _assert_all_close(*both)


def test_masked_sgd_step_trajectory_with_mixed_dtypes():
    sizes, dtypes = (65, 7, 4097, 1), DTYPES
    case = SGD_CASES["momentum_dampening_wd"]
    params, _, buffers, _ = _sgd_inputs(sizes, dtypes, case, "no_mask")
    expected_params, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]
    for step in range(3):
        grads = [
            _randn(n, dtype=d, seed=10 * step + i) for i, (n, d) in enumerate(zip(sizes, dtypes))
        ]
        threshold = torch.tensor(0.2 * step, device=DEVICE)
        masks = [reference.pack_mask(g, threshold) for g in grads]  # a new mask each step
        hyperparameters = _hyperparameters(**case, is_first_step=step == 0)
        backend.masked_sgd_step_(params, grads, buffers, masks, **hyperparameters)
        reference.masked_sgd_step_(
            expected_params, grads, expected_buffers, masks, **hyperparameters
        )
    _assert_all_close(params + buffers, expected_params + expected_buffers)


def test_masked_sgd_step_truncation_extremes():
    inputs = _sgd_inputs((4097,), (torch.float32,), {}, "random")
    inputs[3][0] = reference.pack_mask(_randn(4097, seed=9), torch.tensor(0.5, device=DEVICE))
    for truncation in (0.0, 1.0):  # r = 0 freezes pruned weights
        _assert_all_close(*_step_both(*inputs, **_hyperparameters(truncation=truncation)))
    # r = 1 is exactly plain SGD, whatever the mask.
    unmasked = _step_both(*inputs[:3], [], **_hyperparameters())[0]
    assert torch.equal(_step_both(*inputs, **_hyperparameters(truncation=1.0))[0][0], unmasked[0])


def test_bf16_stores_round_to_nearest_even():
    # p - lr * g lands on ties (1 + 3 * 2**-8: even is up; 1 + 2**-8: even is down) or
    # is inf or NaN: the same bf16 values as torch's fp32 -> bf16 rounding.
    grads = torch.tensor([-3 * 2**-8, -(2**-8), float("inf"), float("nan")])
    params = torch.ones(4, dtype=torch.bfloat16, device=DEVICE)
    inputs = [params], [grads.bfloat16().to(DEVICE)], [], []
    ours, theirs = _step_both(*inputs, **_hyperparameters(lr=1.0))
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0, equal_nan=True)


def test_masked_sgd_step_rejects_bad_input_before_changing_anything():
    params, grads, buffers, masks = _sgd_inputs(
        (65, 7), [torch.float32] * 2, {"momentum": 0.9}, "random"
    )
    before = [t.clone() for t in params + buffers]
    hyperparameters = _hyperparameters(momentum=0.9)
    short_mask = [masks[0], masks[1][:-8]]
    with pytest.raises(ValueError, match=r"masks\[1\] has 0 elements, expected 8"):
        backend.masked_sgd_step_(params, grads, buffers, short_mask, **hyperparameters)
    with pytest.raises(TypeError, match=r"masks\[1\] must be a uint8"):
        backend.masked_sgd_step_(params, grads, buffers, [None, masks[1].bool()], **hyperparameters)
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\] has 6 elements"):
        backend.masked_sgd_step_(
            params, grads, [buffers[0], buffers[1][:6]], masks, **hyperparameters
        )
    with pytest.raises(ValueError, match="needs one buffer per param"):
        backend.masked_sgd_step_(params, grads, buffers[:1], masks, **hyperparameters)
    strided = [params[0], torch.zeros(14, device=DEVICE)[::2]]
    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous"):
        backend.masked_sgd_step_(strided, grads, buffers, masks, **hyperparameters)
    for got, expected in zip(params + buffers, before):
        assert torch.equal(got, expected)


def test_mask_ops_reject_bad_input():
    with pytest.raises(ValueError, match="holds 8 bits, asked for 9"):
        backend.unpack_mask(_random_bytes(1), 9)
    with pytest.raises(ValueError, match="multiple of 8"):
        backend.hamming_window(_random_bytes(4), _random_bytes(2, 4))
    with pytest.raises(TypeError, match="window must be a uint8"):
        backend.hamming_window(_random_bytes(8), _randn(2, 8))
    with pytest.raises(ValueError, match="threshold must have one element"):
        backend.pack_mask(_randn(8), _randn(2))


# A representative subset of amsgrad x weight_decay x maximize x betas: every flag both
# ways, and 1 - beta1 >= 0.5 for torch.lerp's second formula.
ADAMW_CASES = {
    "plain": dict(),
    "wd": dict(weight_decay=1e-2),
    "amsgrad": dict(amsgrad=True),
    "amsgrad_wd_maximize": dict(amsgrad=True, weight_decay=1e-2, maximize=True),
    "maximize_wd_small_betas": dict(
        maximize=True, weight_decay=0.1, beta1=0.3, beta2=0.9, eps=1e-6
    ),
    "amsgrad_half_betas": dict(amsgrad=True, beta1=0.5, beta2=0.5, lr=1e-3),
}


def _adamw_hyperparameters(**overrides):
    hyperparameters = dict(
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.0,
        eps=1e-8,
        amsgrad=False,
        maximize=False,
        truncation=3e-3,
    )
    return {**hyperparameters, **overrides}


def _adamw_state(sizes, dtypes, amsgrad, seed=0):
    """[params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]; each tensor has its
    own step count, so a mixed-up count shows in its bias corrections."""
    pairs = list(enumerate(zip(sizes, dtypes)))
    state = [
        [_randn(n, dtype=d, seed=seed + i) for i, (n, d) in pairs],
        [_randn(n, dtype=d, seed=seed + 200 + i) for i, (n, d) in pairs],
        [_randn(n, seed=seed + 300 + i).square().to(d) for i, (n, d) in pairs],
        [],
        [torch.tensor(float(7 * i), device=DEVICE) for i in range(len(sizes))],
    ]
    if amsgrad:  # above or below the new v, element by element
        state[3] = [_randn(n, seed=seed + 400 + i).square().to(d) for i, (n, d) in pairs]
    return state


def _grads(sizes, dtypes, seed, scale=1.0):
    return [(_randn(n, seed=seed + i) * scale).to(d) for i, (n, d) in enumerate(zip(sizes, dtypes))]


def _mixed_masks(sizes, seed=0):
    """No mask, 0 %, random and 100 % density in turn, shifted by ``seed``."""
    kinds = MASKS[seed % len(MASKS) :] + MASKS[: seed % len(MASKS)]
    masks = []
    for i, n in enumerate(sizes):
        kind = kinds[i % len(kinds)]
        threshold = torch.tensor(DENSITY_THRESHOLDS.get(kind, 0.0), device=DEVICE)
        masks.append(
            None if kind == "no_mask" else reference.pack_mask(_randn(n, seed=i), threshold)
        )
    return masks


def _adamw(module, state, grads, masks, **hyperparameters):
    params, *states = state
    module.masked_adamw_step_(params, grads, *states, masks, **hyperparameters)


def _flat(lists):
    return [t for tensors in lists for t in tensors]


def _clone_state(state):
    return [[t.clone() for t in tensors] for tensors in state]


def _assert_adamw_close(ours, theirs):
    *tensors, steps = ours
    *expected_tensors, expected_steps = theirs
    _assert_all_close(_flat(tensors), _flat(expected_tensors))
    for i, (got, expected) in enumerate(zip(steps, expected_steps)):
        assert got.dtype == torch.float32 and torch.equal(got, expected), f"state_steps[{i}]"


@pytest.mark.parametrize("case", ADAMW_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_matches_reference(dtype, case):
    # Three steps in a row, each one call over every odd size with every kind of mask.
    hyperparameters = _adamw_hyperparameters(**ADAMW_CASES[case])
    dtypes = [dtype] * len(ODD_SIZES)
    ours = _adamw_state(ODD_SIZES, dtypes, hyperparameters["amsgrad"])
    theirs = _clone_state(ours)
    for step in range(3):
        grads, masks = _grads(ODD_SIZES, dtypes, seed=10 * step), _mixed_masks(ODD_SIZES, step)
        _adamw(backend, ours, grads, masks, **hyperparameters)
        _adamw(reference, theirs, grads, masks, **hyperparameters)
        _assert_adamw_close(ours, theirs)


@pytest.mark.parametrize("scalars", ["grad_scale", "lr_tensor", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_device_scalars(dtype, scalars):
    sizes, dtypes = (7, 65, 4097), [dtype] * 3
    hyperparameters = _adamw_hyperparameters(**ADAMW_CASES["amsgrad_wd_maximize"])
    tensors = {}
    if scalars in ("grad_scale", "both"):
        tensors["grad_scale"] = torch.tensor([1024.0], device=DEVICE)
    if scalars in ("lr_tensor", "both"):  # ignores the float lr; fp64 or fp32
        lr_dtype = torch.float64 if scalars == "lr_tensor" else torch.float32
        tensors["lr_tensor"] = torch.tensor([0.05], dtype=lr_dtype, device=DEVICE)
    ours = _adamw_state(sizes, dtypes, amsgrad=True)
    theirs = _clone_state(ours)
    for step in range(2):
        grads = _grads(sizes, dtypes, seed=step, scale=1024.0 if "grad_scale" in tensors else 1.0)
        masks = _mixed_masks(sizes, step)
        _adamw(backend, ours, grads, masks, **hyperparameters, **tensors)
        _adamw(reference, theirs, grads, masks, **hyperparameters, **tensors)
    _assert_adamw_close(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_adamw_step_found_inf(dtype):
    sizes, dtypes = (1, 65, 4097), [dtype] * 3
    hyperparameters = _adamw_hyperparameters(amsgrad=True, weight_decay=1e-2)
    state = _adamw_state(sizes, dtypes, amsgrad=True)
    before = _clone_state(state)
    grads, masks = _grads(sizes, dtypes, seed=1, scale=8.0), _mixed_masks(sizes, 2)
    scale = torch.tensor([8.0], device=DEVICE)
    skip = torch.tensor([1.0], device=DEVICE)
    _adamw(backend, state, grads, masks, grad_scale=scale, found_inf=skip, **hyperparameters)
    for got, expected in zip(_flat(state), _flat(before)):
        assert torch.equal(got, expected), "a step with found_inf != 0 changed a tensor"
    finite = torch.tensor([0.0], device=DEVICE)
    expected = _clone_state(state)
    _adamw(backend, state, grads, masks, grad_scale=scale, found_inf=finite, **hyperparameters)
    _adamw(reference, expected, grads, masks, grad_scale=scale, found_inf=finite, **hyperparameters)
    _assert_adamw_close(state, expected)
    assert [float(s) for s in state[4]] == [float(s) + 1 for s in before[4]]


def test_masked_adamw_step_trajectory_with_mixed_dtypes():
    # One call over every dtype: each tensor gets the bias corrections of its own dtype.
    sizes, dtypes = (65, 7, 4097, 1), DTYPES
    hyperparameters = _adamw_hyperparameters(amsgrad=True, weight_decay=1e-2)
    ours = _adamw_state(sizes, dtypes, amsgrad=True)
    theirs = _clone_state(ours)
    for step in range(3):
        grads = _grads(sizes, dtypes, seed=10 * step)
        threshold = torch.tensor(0.2 * step, device=DEVICE)
        masks = [reference.pack_mask(g, threshold) for g in grads]  # a new mask each step
        _adamw(backend, ours, grads, masks, **hyperparameters)
        _adamw(reference, theirs, grads, masks, **hyperparameters)
    _assert_adamw_close(ours, theirs)


def test_masked_adamw_step_counts_steps_of_empty_tensors():
    sizes, dtypes = (0, 65), [torch.float32] * 2
    hyperparameters = _adamw_hyperparameters(weight_decay=1e-2)
    ours = _adamw_state(sizes, dtypes, amsgrad=False)
    theirs = _clone_state(ours)
    grads, masks = _grads(sizes, dtypes, seed=0), _mixed_masks(sizes, 2)  # a 0-byte mask
    skip = torch.tensor([1.0], device=DEVICE)
    _adamw(backend, ours, grads, masks, found_inf=skip, **hyperparameters)
    assert [float(s) for s in ours[4]] == [0.0, 7.0]
    _adamw(backend, ours, grads, masks, **hyperparameters)
    _adamw(reference, theirs, grads, masks, **hyperparameters)
    _assert_adamw_close(ours, theirs)
    assert [float(s) for s in ours[4]] == [1.0, 8.0]


def test_masked_adamw_step_rejects_bad_input_before_changing_anything():
    sizes, dtypes = (65, 7), [torch.float32] * 2
    state = _adamw_state(sizes, dtypes, amsgrad=True)
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = state
    grads, masks = _grads(sizes, dtypes, seed=0), _mixed_masks(sizes, 2)
    before = _clone_state(state)
    hyperparameters = _adamw_hyperparameters(amsgrad=True)

    def step(**changes):
        args = dict(
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            max_exp_avg_sqs=max_exp_avg_sqs,
            state_steps=steps,
            masks=masks,
        )
        backend.masked_adamw_step_(**{**args, **hyperparameters, **changes})

    with pytest.raises(ValueError, match=r"masks\[1\] has 0 elements, expected 8"):
        step(masks=[masks[0], masks[1][:-8]])
    with pytest.raises(ValueError, match="amsgrad needs one max_exp_avg_sq per param"):
        step(max_exp_avg_sqs=[])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] has 6 elements"):
        step(exp_avg_sqs=[exp_avg_sqs[0], exp_avg_sqs[1][:6]])
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must be contiguous"):
        step(exp_avgs=[exp_avgs[0], torch.zeros(14, device=DEVICE)[::2]])
    with pytest.raises(TypeError, match=r"state_steps\[1\] must be float32"):
        step(state_steps=[steps[0], steps[1].double()])
    with pytest.raises(ValueError, match="as many grads, exp_avgs"):
        step(state_steps=steps[:1])
    with pytest.raises(ValueError, match="beta1 must be >= 0"):
        step(beta1=-0.5)
    for got, expected in zip(_flat(state), _flat(before)):
        assert torch.equal(got, expected)


def _opcheck(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_mask_ops():
    values = _randn(65)
    packed = reference.pack_mask(values, torch.tensor(0.5, device=DEVICE))
    _opcheck(
        torch.ops.worm_fast.triton_pack_mask.default, (values, torch.tensor(0.5, device=DEVICE))
    )
    _opcheck(torch.ops.worm_fast.triton_unpack_mask.default, (packed, 65))
    window = _random_bytes(3, packed.numel())
    _opcheck(torch.ops.worm_fast.triton_hamming_window.default, (packed, window))
    for lo in (torch.tensor([0], device=DEVICE), torch.tensor([0, 7], device=DEVICE)):
        _opcheck(
            torch.ops.worm_fast.triton_magnitude_histogram.default,
            ([values, _randn(7)], lo, 19, 12, 2),
        )


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck_masked_sgd_step(found_inf):
    params, grads, buffers, masks = _sgd_inputs(
        (65, 7), (torch.float32, torch.float64), {"momentum": 0.9}, "random"
    )
    scalars = (
        torch.tensor([0.05], device=DEVICE),
        torch.tensor([2.0], device=DEVICE),
        torch.tensor([found_inf], device=DEVICE),
    )
    _opcheck(
        torch.ops.worm_fast.triton_masked_sgd_step_.default,
        (params, grads, buffers, masks, *scalars),
        _hyperparameters(momentum=0.9, nesterov=True, weight_decay=1e-2),
    )


@pytest.mark.parametrize(("found_inf", "amsgrad"), [(0.0, True), (1.0, False)])
def test_opcheck_masked_adamw_step(found_inf, amsgrad):
    sizes, dtypes = (65, 7), (torch.float32, torch.float64)
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = _adamw_state(sizes, dtypes, amsgrad)
    scalars = (
        torch.tensor([0.05], device=DEVICE),
        torch.tensor([2.0], device=DEVICE),
        torch.tensor([found_inf], device=DEVICE),
    )
    args = (params, _grads(sizes, dtypes, seed=0), exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    _opcheck(
        torch.ops.worm_fast.triton_masked_adamw_step_.default,
        (*args, steps, _mixed_masks(sizes, 2), *scalars),
        _adamw_hyperparameters(amsgrad=amsgrad, weight_decay=1e-2, maximize=True),
    )


def test_torch_compile_runs_the_ops():
    # Under the interpreter the ops stay opaque to AOT tracing (see ops.py); on a GPU
    # Inductor compiles through them.
    compile_backend = "aot_eager" if os.environ.get("TRITON_INTERPRET") == "1" else "inductor"
    params, grads, buffers, masks = _sgd_inputs(
        (65, 4097), [torch.float32] * 2, {"momentum": 0.9}, "random"
    )
    hyperparameters = _hyperparameters(momentum=0.9, weight_decay=1e-2)
    expected_params, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]

    @torch.compile(backend=compile_backend, fullgraph=True)
    def step_and_pack(params, grads, buffers):
        backend.masked_sgd_step_(params, grads, buffers, masks, **hyperparameters)
        return backend.pack_mask(params[1], torch.tensor(0.5, device=DEVICE))

    packed = step_and_pack(params, grads, buffers)
    reference.masked_sgd_step_(expected_params, grads, expected_buffers, masks, **hyperparameters)
    _assert_all_close(params + buffers, expected_params + expected_buffers)
    assert torch.equal(packed, reference.pack_mask(params[1], torch.tensor(0.5, device=DEVICE)))


def test_torch_compile_runs_the_adamw_step():
    compile_backend = "aot_eager" if os.environ.get("TRITON_INTERPRET") == "1" else "inductor"
    sizes, dtypes = (65, 4097), [torch.float32] * 2
    hyperparameters = _adamw_hyperparameters(amsgrad=True, weight_decay=1e-2)
    ours = _adamw_state(sizes, dtypes, amsgrad=True)
    theirs = _clone_state(ours)
    grads, masks = _grads(sizes, dtypes, seed=0), _mixed_masks(sizes, 2)

    @torch.compile(backend=compile_backend, fullgraph=True)
    def step(state, grads):
        _adamw(backend, state, grads, masks, **hyperparameters)

    for _ in range(2):
        step(ours, grads)
        _adamw(reference, theirs, grads, masks, **hyperparameters)
    _assert_adamw_close(ours, theirs)


# Compiling the kernels for a GPU needs no GPU: this proves that the compiled Triton
# frontend (stricter than the interpreter) and ptxas accept each kernel in each dtype,
# with every optional input present and absent.
_COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from worm_fast.backends.triton import kernels

target = GPUTarget("cuda", 90, 32)

def compile(kernel, signature, constexprs):
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    triton.compile(source, target=target)

compile(kernels._unpack_mask_kernel, {"packed_ptr": "*u8", "out_ptr": "*i1", "numel": "i64"},
        {"BLOCK": 2048})
compile(kernels._hamming_window_kernel, {"current_ptr": "*i64", "window_ptr": "*i64",
        "out_ptr": "*i64", "nwords": "i32", "rows": "i32", "row_stride": "i32"}, {"BLOCK": 1024})
bits = dict.fromkeys(["lr_bits", "weight_decay_bits", "momentum_bits",
                      "one_minus_dampening_bits", "truncation_bits"], "i64")
adamw_bits = dict.fromkeys(["step_index", "lr_bits", "decay_bits", "weight_decay_bits",
                            "one_minus_beta1_bits", "beta2_bits", "one_minus_beta2_bits",
                            "log_beta1_bits", "log_beta2_bits", "eps_bits", "truncation_bits"],
                           "i64")
infs = {"fp32": 0x7F800000, "fp64": 0x7FF0000000000000, "fp16": 0x7C00, "bf16": 0x7F80}
for dtype in ("fp32", "fp64", "fp16", "bf16"):
    for histogram_bits in (12, 18):  # per-program counts, and one atomic per key
        compile(kernels._magnitude_histogram_kernel,
                {"values_ptr": f"*{dtype}", "lo_ptr": "*i64", "counts_ptr": "*i64",
                 "numel": "i64", "shift": "i32", "stride": "i64"},
                {"INF": infs[dtype], "BITS": histogram_bits, "BLOCKS": 32})
    compile(kernels._pack_mask_kernel, {"values_ptr": f"*{dtype}", "threshold_ptr": "*fp32",
            "out_ptr": "*u8", "numel": "i32", "nbytes": "i32"}, {"BLOCK_BYTES": 256})
    tensors = dict(param_ptr=f"*{dtype}", grad_ptr=f"*{dtype}", buf_ptr=f"*{dtype}",
                   mask_ptr="*u8", lr_ptr="*fp32", grad_scale_ptr="*fp32",
                   found_inf_ptr="*fp32", numel="i32")
    flags = dict(HAS_WEIGHT_DECAY=True, NESTEROV=True, MAXIMIZE=True, FIRST_STEP=False,
                 BLOCK=1024)
    compile(kernels._masked_sgd_step_kernel, {**tensors, **bits}, flags)
    absent = ("buf_ptr", "mask_ptr", "lr_ptr", "grad_scale_ptr", "found_inf_ptr")
    compile(kernels._masked_sgd_step_kernel,
            {k: v for k, v in {**tensors, **bits}.items() if k not in absent},
            {**flags, **dict.fromkeys(absent), "FIRST_STEP": True})
    tensors = dict(param_ptr=f"*{dtype}", grad_ptr=f"*{dtype}", exp_avg_ptr=f"*{dtype}",
                   exp_avg_sq_ptr=f"*{dtype}", max_exp_avg_sq_ptr=f"*{dtype}", mask_ptr="*u8",
                   lr_ptr="*fp64", grad_scale_ptr="*fp32", found_inf_ptr="*fp32",
                   old_steps_ptr="*fp32", step_ptr="*fp32", numel="i32")
    flags = dict(HAS_WEIGHT_DECAY=True, MAXIMIZE=True, BLOCK=1024)
    compile(kernels._masked_adamw_step_kernel, {**tensors, **adamw_bits}, flags)
    absent = ("max_exp_avg_sq_ptr", "mask_ptr", "lr_ptr", "grad_scale_ptr", "found_inf_ptr")
    compile(kernels._masked_adamw_step_kernel,
            {k: v for k, v in {**tensors, **adamw_bits}.items() if k not in absent},
            {**dict.fromkeys(absent), "HAS_WEIGHT_DECAY": False, "MAXIMIZE": False,
             "BLOCK": 1024})
"""


def test_kernels_compile_for_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_on_gpu(dtype):
    size = (1 << 22) + 3
    values = _randn(size, dtype=dtype)
    threshold = torch.tensor(0.5, device=DEVICE)
    packed = backend.pack_mask(values, threshold)
    assert torch.equal(packed, reference.pack_mask(values, threshold))
    assert torch.equal(backend.unpack_mask(packed, size), reference.unpack_mask(packed, size))
    window = _random_bytes(5, packed.numel())
    assert torch.equal(
        backend.hamming_window(packed, window), reference.hamming_window(packed, window)
    )
    inputs = _sgd_inputs((size,), (dtype,), {"momentum": 0.9}, "random")
    inputs[3][0] = packed
    both = _step_both(*inputs, **_hyperparameters(momentum=0.9, nesterov=True))
    _assert_all_close(*both)
    ours = _adamw_state((size,), (dtype,), amsgrad=True)
    theirs = _clone_state(ours)
    hyperparameters = _adamw_hyperparameters(amsgrad=True, weight_decay=1e-2)
    _adamw(backend, ours, inputs[1], [packed], **hyperparameters)
    _adamw(reference, theirs, inputs[1], [packed], **hyperparameters)
    _assert_adamw_close(ours, theirs)
