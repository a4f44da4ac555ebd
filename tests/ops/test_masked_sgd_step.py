"""masked_sgd_step_ on every runnable (backend, device) against the reference backend.

One call steps a list of every odd size, as the optimizer makes it, for every dtype,
every combination of momentum / dampening / nesterov / weight decay / maximize, both
``is_first_step`` values and masks of 0 %, 100 % and random density (mixed with
unmasked tensors); and, without a mask, step for step against ``torch.optim.SGD``. The
Triton interpreter is slow: it gets a representative subset (``tests.utils``).
"""

import pytest
import torch

from tests.utils import (
    DTYPES,
    MASK_KINDS,
    ODD_SIZES,
    TORCH_SGD_HYPERPARAMETERS,
    assert_close,
    assert_lists_equal,
    describe,
    interpreted,
    kernel_tolerance,
    kernels_of,
    packed_masks,
    randn,
    random_bytes,
    sgd_case,
    sgd_cases,
    sgd_kwargs,
    skip_large_sizes_when_interpreted,
    skip_mask_kind_when_interpreted,
)
from worm_fast._ops import packed_nbytes
from worm_fast.backends import reference


def step(fn, case, **kwargs):
    """One step of ``fn`` on copies of ``case``; returns (params, buffers, grads)."""
    params, grads, buffers, masks = ([t if t is None else t.clone() for t in ts] for ts in case)
    fn(params, grads, buffers, masks, **kwargs)
    return params, buffers, grads


def assert_matches_reference(kernels, backend, case, what, **kwargs):
    """One step of ``kernels`` and of the reference on copies of ``case`` agree; the
    grads stay as they were, and so do the buffers without momentum."""
    tol = kernel_tolerance(backend, case[0][0].dtype)
    got_p, got_b, got_g = step(kernels.masked_sgd_step_, case, **kwargs)
    exp_p, exp_b, _ = step(reference.masked_sgd_step_, case, **kwargs)
    for i, (gp, ep) in enumerate(zip(got_p, exp_p)):
        assert_close(gp, ep, what=f"{what}: params[{i}]", **tol)
    assert_lists_equal(got_g, case[1], f"{what}: grads must not change")
    if kwargs["momentum"] != 0.0:
        for i, (gb, eb) in enumerate(zip(got_b, exp_b)):
            assert_close(gb, eb, what=f"{what}: momentum_buffers[{i}]", **tol)
    else:
        assert_lists_equal(got_b, case[2], f"{what}: buffers without momentum")


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend_device, dtype, mask_kind):
    # fp64 at rtol 1e-12 also proves the float hyperparameters reach the kernel unrounded.
    kernels = kernels_of(backend_device)
    skip_mask_kind_when_interpreted(backend_device, mask_kind)
    case = sgd_case(ODD_SIZES, dtype, mask_kind, seed=len(mask_kind), device=backend_device[1])
    for hp in sgd_cases(backend_device):
        what = f"{dtype} {mask_kind} {describe(hp)}"
        assert_matches_reference(kernels, backend_device[0], case, what, **sgd_kwargs(**hp))


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_multi_tensor_list(backend_device, dtype):
    # Past the C++ serial threshold, with tensors that straddle its 16384-element work
    # items and many GPU blocks.
    skip_large_sizes_when_interpreted(backend_device)
    kernels = kernels_of(backend_device)
    sizes = (100_003, 16_384, 16_385, 1, 40_000, 64, 65)
    case = sgd_case(sizes, dtype, "mixed", seed=7, device=backend_device[1])
    hp = dict(momentum=0.9, dampening=0.1, weight_decay=5e-4)
    assert_matches_reference(kernels, backend_device[0], case, f"{dtype} large", **sgd_kwargs(**hp))
    nesterov = dict(hp, nesterov=True, dampening=0.0)
    assert_matches_reference(
        kernels, backend_device[0], case, f"{dtype} large nesterov", **sgd_kwargs(**nesterov)
    )


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("scalars", ["grad_scale", "lr_tensor", "both", "truncation_tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_scalars(backend_device, dtype, scalars):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    case = sgd_case(ODD_SIZES, dtype, "random", seed=11, device=device)
    hp = dict(momentum=0.9, nesterov=True, weight_decay=1e-2)
    tensors = {}
    if scalars in ("grad_scale", "both"):
        # Gradients 1024 times too large: a kernel that skipped the unscaling fails loudly.
        tensors["grad_scale"] = torch.tensor(1024.0, device=device)
        case = (case[0], [(g.float() * 1024).to(dtype) for g in case[1]], case[2], case[3])
    if scalars in ("lr_tensor", "both"):  # overrides the float lr
        tensors["lr_tensor"] = torch.tensor([0.05], dtype=torch.float64, device=device)
        hp["lr"] = 123.0
    if scalars == "truncation_tensor":  # overrides the float r (what torch.compile needs)
        tensors["truncation_tensor"] = torch.tensor([3e-3], dtype=torch.float64, device=device)
        hp["truncation"] = 1.0
    kwargs = sgd_kwargs(**hp, **tensors)
    assert_matches_reference(kernels, backend, case, f"{dtype} {scalars}", **kwargs)
    for name, float_name in (("lr_tensor", "lr"), ("truncation_tensor", "truncation")):
        if name in tensors:  # the same numbers as the float it replaces
            with_tensor = step(kernels.masked_sgd_step_, case, **kwargs)
            value = tensors[name].item()
            plain = {key: v for key, v in kwargs.items() if key != name}
            with_float = step(kernels.masked_sgd_step_, case, **dict(plain, **{float_name: value}))
            assert_lists_equal(with_tensor[0] + with_tensor[1], with_float[0] + with_float[1])


@pytest.mark.compares_with_reference
@pytest.mark.parametrize("is_first_step", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_found_inf(backend_device, dtype, is_first_step):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    case = sgd_case(ODD_SIZES, dtype, "random", seed=13, device=device)
    hp = dict(momentum=0.9, weight_decay=1e-2, is_first_step=is_first_step)
    skip = dict(found_inf=torch.tensor([1.0], device=device))
    scale = torch.tensor(2.0, device=device)
    skip_p, skip_b, skip_g = step(
        kernels.masked_sgd_step_, case, **sgd_kwargs(**hp, **skip, grad_scale=scale)
    )
    # Nothing changes, bit for bit.
    assert_lists_equal(skip_p + skip_b + skip_g, case[0] + case[2] + case[1], "found_inf=1")
    finite = torch.tensor(0.0, device=device)
    ran_p, ran_b, _ = step(kernels.masked_sgd_step_, case, **sgd_kwargs(**hp, found_inf=finite))
    plain_p, plain_b, _ = step(kernels.masked_sgd_step_, case, **sgd_kwargs(**hp))
    assert_lists_equal(ran_p + ran_b, plain_p + plain_b, "found_inf=0 vs none")
    assert_matches_reference(
        kernels, backend, case, f"{dtype} found_inf=0",
        **sgd_kwargs(**hp, found_inf=finite, grad_scale=scale),
    )  # fmt: skip


@pytest.mark.compares_with_reference
def test_trajectory_with_mixed_dtypes(backend_device):
    kernels = kernels_of(backend_device)
    backend, device = backend_device
    sizes = (65, 7, 4097, 1)
    params, _, buffers, _ = sgd_case(sizes, DTYPES, "no_masks", device=device)
    expected_params, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]
    hp = dict(momentum=0.9, dampening=0.1, weight_decay=5e-4)
    for i in range(3):
        grads = [randn(n, dtype=d, seed=10 * i + k, device=device) for k, (n, d) in
                 enumerate(zip(sizes, DTYPES))]  # fmt: skip
        threshold = torch.tensor(0.2 * i, device=device)
        masks = [reference.pack_mask(g, threshold) for g in grads]  # a new mask each step
        kwargs = sgd_kwargs(**hp, is_first_step=i == 0)
        kernels.masked_sgd_step_(params, grads, buffers, masks, **kwargs)
        reference.masked_sgd_step_(expected_params, grads, expected_buffers, masks, **kwargs)
    for k, (got, expected) in enumerate(zip(params + buffers, expected_params + expected_buffers)):
        assert got.dtype == expected.dtype
        tol = kernel_tolerance(backend, got.dtype)
        assert_close(got, expected, what=f"tensor {k} after 3 steps", **tol)


@pytest.mark.compares_with_reference
def test_truncation_values_and_strided_grads(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    params = [randn(6, 11, seed=1, device=device), randn(130, seed=2, device=device)]
    grads = [randn(11, 6, seed=3, device=device).t(), randn(260, seed=4, device=device)[::2]]
    assert not any(g.is_contiguous() for g in grads)
    masks = [random_bytes(packed_nbytes(66), seed=5, device=device),
             random_bytes(packed_nbytes(130), seed=6, device=device)]  # fmt: skip
    for r in (0.0, 3e-3, 0.5, 1.0):  # r = 0 freezes pruned weights
        assert_matches_reference(
            kernels, backend_device[0], (params, grads, [], masks), f"truncation={r}",
            **sgd_kwargs(truncation=r),
        )  # fmt: skip


def test_r_one_equals_no_mask(backend_device):
    kernels = kernels_of(backend_device)
    case = sgd_case(ODD_SIZES, torch.float32, "random", seed=19, device=backend_device[1])
    hp = dict(momentum=0.9, weight_decay=1e-2)
    masked = step(kernels.masked_sgd_step_, case, **sgd_kwargs(**hp, truncation=1.0))
    plain = step(kernels.masked_sgd_step_, (*case[:3], []), **sgd_kwargs(**hp))
    assert_lists_equal(masked[0] + masked[1], plain[0] + plain[1])


@pytest.mark.compares_with_reference
def test_bf16_stores_round_to_nearest_even(backend_device):
    # p - lr * g lands on ties (1 + 3 * 2**-8: even is up; 1 + 2**-8: even is down) or
    # is inf or NaN: the same bf16 values as torch's fp32 -> bf16 rounding.
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    grads = torch.tensor([-3 * 2**-8, -(2**-8), float("inf"), float("nan")])
    case = [torch.ones(4, dtype=torch.bfloat16, device=device)], [grads.bfloat16().to(device)]
    ours = step(kernels.masked_sgd_step_, (*case, [], []), **sgd_kwargs(lr=1.0))[0]
    theirs = step(reference.masked_sgd_step_, (*case, [], []), **sgd_kwargs(lr=1.0))[0]
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.compares_with_reference
def test_empty_lists_and_empty_tensors(backend_device):
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    kwargs = sgd_kwargs(momentum=0.9)
    kernels.masked_sgd_step_([], [], [], [], **kwargs)
    empty = torch.empty(0, device=device)
    case = ([empty, randn(5, device=device)], [empty, randn(5, seed=1, device=device)],
            [empty, randn(5, seed=2, device=device)], [])  # fmt: skip
    assert_matches_reference(kernels, backend_device[0], case, "empty tensor", **kwargs)
    assert_matches_reference(
        kernels, backend_device[0], (*case[:3], packed_masks((0, 5), "mixed", 1, device)),
        "empty tensor with a 0-byte mask", **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("foreach", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_matches_torch_sgd_over_ten_steps(backend_device, dtype, foreach):
    # Without a mask the fp32 rounding must be torch's.
    kernels = kernels_of(backend_device)
    device = backend_device[1]
    if interpreted(backend_device):
        pytest.skip("tests/optim/test_sgd.py compares the interpreted kernels with torch")
    for hp in TORCH_SGD_HYPERPARAMETERS:
        ours = [randn(n, dtype=dtype, seed=i, device=device) for i, n in enumerate(ODD_SIZES)]
        theirs = [torch.nn.Parameter(p.clone()) for p in ours]
        bufs = [torch.zeros_like(p) for p in ours]
        optimizer = torch.optim.SGD(theirs, lr=0.05, foreach=foreach, **hp)
        for i in range(10):
            grads = [randn(n, dtype=dtype, seed=100 * i + k, device=device)
                     for k, n in enumerate(ODD_SIZES)]  # fmt: skip
            for p, g in zip(theirs, grads):
                p.grad = g.clone()
            optimizer.step()
            kernels.masked_sgd_step_(
                ours, grads, bufs if hp["momentum"] else [], [],
                **sgd_kwargs(**hp, lr=0.05, is_first_step=i == 0, truncation=1.0),
            )  # fmt: skip
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b.detach(), what=f"{describe(hp)}: params[{k}] after 10 steps")
            if hp["momentum"]:
                buffer = optimizer.state[b]["momentum_buffer"]
                assert_close(bufs[k], buffer, what=f"{describe(hp)}: buf[{k}]")
