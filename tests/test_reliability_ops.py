"""The registered ops called directly, on every runnable backend: devices checked by every
kernel (a meta tensor among CPU tensors included), the same refusals for the same edge
cases, nothing written before a refusal, and arithmetic in the parameters' precision."""

import struct

import pytest
import torch

from tests.utils import RUNNABLE_BACKENDS, assert_close
from worm_fast import backends, ops
from worm_fast.backends import reference

REFUSED = (RuntimeError, ValueError, TypeError)
SGD = dict(
    lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
    is_first_step=False, truncation=0.5,
)  # fmt: skip
ADAMW = dict(
    lr=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False,
    maximize=False, truncation=0.5,
)  # fmt: skip


def kernels(backend: str):
    """The backend's kernel functions, which call straight into its kernels."""
    return backends._module(backend)


def randn(*shape, device="cpu", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype).to(device)


def sgd_args(device, n=(65, 7)):
    params = [randn(k, device=device, seed=k) for k in n]
    grads = [randn(k, device=device, seed=k + 1) for k in n]
    buffers = [randn(k, device=device, seed=k + 2) for k in n]
    masks = [reference.pack_mask(randn(k, seed=k + 3), torch.tensor(0.5)).to(device) for k in n]
    return params, grads, buffers, masks


def adamw_args(device, n=(65, 7)):
    params, grads, exp_avgs, masks = sgd_args(device, n)
    exp_avg_sqs = [randn(k, device=device, seed=k + 4).abs() for k in n]
    steps = [torch.tensor(3.0, device=device) for _ in n]
    return params, grads, exp_avgs, exp_avg_sqs, [], steps, masks


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(tensors, before):
    for got, expected in zip(tensors, before):
        assert torch.equal(got, expected)


# -- one meta tensor among CPU tensors ------------------------------------------------
# A meta tensor makes the dispatcher pick the fake kernel: it must refuse, not return an
# empty tensor for the mask ops or do nothing for the steps.


def test_direct_calls_with_a_meta_tensor_are_refused():
    meta_uint8 = torch.zeros(8, dtype=torch.uint8, device="meta")
    with pytest.raises(REFUSED, match="threshold is on meta"):
        torch.ops.worm_fast.pack_mask(randn(8), torch.tensor(0.5, device="meta"))
    with pytest.raises(REFUSED, match="current is on"):
        torch.ops.worm_fast.hamming_window(meta_uint8, torch.zeros(2, 8, dtype=torch.uint8))
    params, grads, buffers, masks = sgd_args("cpu")
    before = snapshot(params + buffers)
    for bad in (
        dict(grads=[grads[0], grads[1].to("meta")]),
        dict(momentum_buffers=[buffers[0], buffers[1].to("meta")]),
        dict(masks=[masks[0], masks[1].to("meta")]),
        dict(params=[params[0], params[1].to("meta")]),
    ):
        args = dict(params=params, grads=grads, momentum_buffers=buffers, masks=masks) | bad
        with pytest.raises(REFUSED, match=r"is on meta, expected cpu|is on cpu, expected meta"):
            torch.ops.worm_fast.masked_sgd_step_(**args, **SGD)
    assert_unchanged(params + buffers, before)
    params, grads, exp_avgs, exp_avg_sqs, vmax, steps, masks = adamw_args("cpu")
    before = snapshot(params + exp_avgs + exp_avg_sqs + steps)
    with pytest.raises(REFUSED, match=r"state_steps\[1\] is on meta"):
        torch.ops.worm_fast.masked_adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, vmax, [steps[0], steps[1].to("meta")], masks,
            **ADAMW,
        )  # fmt: skip
    assert_unchanged(params + exp_avgs + exp_avg_sqs + steps, before)


@pytest.mark.skipif(
    not any(b == "triton" for b, _ in RUNNABLE_BACKENDS),
    reason="the triton backend is not runnable",
)
def test_triton_ops_called_directly_with_a_meta_tensor_are_refused():
    with pytest.raises(REFUSED, match="threshold is on meta"):
        torch.ops.worm_fast.triton_pack_mask(randn(8), torch.tensor(0.5, device="meta"))
    params, grads, buffers, masks = sgd_args("cpu")
    before = snapshot(params + buffers)
    with pytest.raises(REFUSED, match="is on meta"):
        torch.ops.worm_fast.triton_masked_sgd_step_(
            params, [grads[0], grads[1].to("meta")], buffers, masks, None, None, None, **SGD
        )
    assert_unchanged(params + buffers, before)


def test_every_kernel_checks_devices(backend_device):
    backend, device = backend_device
    k = kernels(backend)
    params, grads, buffers, masks = sgd_args(device)
    before = snapshot(params + buffers)
    with pytest.raises(REFUSED, match="meta"):
        k.masked_sgd_step_(params, [grads[0], grads[1].to("meta")], buffers, masks, **SGD)
    with pytest.raises(REFUSED, match="meta"):
        k.hamming_window(masks[0].to("meta"), torch.stack([masks[0], masks[0]]))
    assert_unchanged(params + buffers, before)


# -- the same edge cases refused by every backend ---------------------------------------


def test_negative_numel_is_refused(backend_device):
    backend, device = backend_device
    with pytest.raises(REFUSED, match=r"numel|bits"):
        kernels(backend).unpack_mask(torch.zeros(8, dtype=torch.uint8, device=device), -3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(truncation=1.5), "truncation must be >= 0 and <= 1"),
        (dict(truncation=-0.1), "truncation must be >= 0 and <= 1"),
        (dict(truncation=float("nan")), "truncation must be >= 0 and <= 1"),
        (dict(beta2=1.0), "beta2 must be >= 0 and < 1"),
        (dict(beta2=1.5), "beta2 must be >= 0 and < 1"),
        (dict(beta1=-0.1), "beta1 must be >= 0 and < 1"),
        (dict(beta2=float("nan")), "beta2 must be >= 0 and < 1"),
    ],
)
def test_adamw_hyperparameters_out_of_range_are_refused(backend_device, change, message):
    backend, device = backend_device
    args = adamw_args(device)
    before = snapshot([t for ts in args[:4] + args[5:6] for t in ts])
    with pytest.raises(REFUSED, match=message):
        kernels(backend).masked_adamw_step_(*args, **(ADAMW | change))
    assert_unchanged([t for ts in args[:4] + args[5:6] for t in ts], before)
    with pytest.raises(ValueError, match=message.split()[0]):  # the public op, too
        ops.masked_adamw_step_(*args, **(ADAMW | change), backend=backend)


@pytest.mark.parametrize("truncation", (1.5, -0.1, float("nan")))
def test_sgd_truncation_out_of_range_is_refused(backend_device, truncation):
    backend, device = backend_device
    params, grads, buffers, masks = sgd_args(device)
    before = snapshot(params + buffers)
    with pytest.raises(REFUSED, match="truncation must be >= 0 and <= 1"):
        kernels(backend).masked_sgd_step_(
            params, grads, buffers, masks, **(SGD | dict(truncation=truncation))
        )
    assert_unchanged(params + buffers, before)


def test_a_step_tensor_shared_by_two_params_is_refused(backend_device):
    # Advanced once per param by one backend and once per call by another: refused by all.
    backend, device = backend_device
    params, grads, exp_avgs, exp_avg_sqs, vmax, steps, masks = adamw_args(device)
    shared = [steps[0], steps[0]]
    before = snapshot(params + exp_avgs + exp_avg_sqs + steps)
    with pytest.raises(REFUSED, match=r"state_steps\[1\] and state_steps\[0\] are the same"):
        kernels(backend).masked_adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, vmax, shared, masks, **ADAMW
        )
    assert_unchanged(params + exp_avgs + exp_avg_sqs + steps, before)


def test_aliased_params_or_buffers_are_refused(backend_device):
    backend, device = backend_device
    params, grads, buffers, masks = sgd_args(device, n=(65, 65))
    before = snapshot(params + buffers)
    for bad, message in (
        (dict(params=[params[0], params[0]]), r"params\[1\] and params\[0\]"),
        (dict(momentum_buffers=[buffers[0], params[1]]), r"momentum_buffers\[1\] and params\[1\]"),
    ):
        args = dict(params=params, grads=grads, momentum_buffers=buffers, masks=masks) | bad
        with pytest.raises(REFUSED, match=message):
            kernels(backend).masked_sgd_step_(**args, **SGD)
    assert_unchanged(params + buffers, before)


def test_complex_thresholds_are_refused(backend_device):
    backend, device = backend_device
    values = randn(9, device=device)
    with pytest.raises(REFUSED, match=r"complex|real"):
        kernels(backend).pack_mask(values, torch.tensor(0.5 + 1j, device=device))
    for threshold in (0.5 + 1j, torch.tensor(0.5 + 1j), True):
        with pytest.raises(TypeError, match="threshold must be a real number"):
            ops.pack_mask(values, threshold, backend=backend)


def test_hamming_window_of_any_byte_count_agrees(backend_device):
    backend, device = backend_device
    current = torch.randint(0, 256, (13,), dtype=torch.uint8).to(device)
    window = torch.randint(0, 256, (3, 13), dtype=torch.uint8).to(device)
    got = kernels(backend).hamming_window(current, window)
    assert torch.equal(got, reference.hamming_window(current, window))


# -- the public step: nothing written before a refusal ----------------------------------


def test_an_expanded_parameter_is_refused_before_any_is_updated(backend_device):
    backend, device = backend_device
    first = randn(7, device=device)
    expanded = randn(1, device=device).expand(5)  # stride 0: five elements, one location
    params = [first, expanded]
    before = snapshot(params)
    with pytest.raises(ValueError, match="param 1 has elements that share memory"):
        ops.masked_sgd_step_(params, [torch.ones_like(p) for p in params], [], [], lr=0.1,
                             backend=backend)  # fmt: skip
    assert_unchanged(params, before)


def test_unsupported_parameter_dtypes_are_refused_up_front(backend_device):
    backend, device = backend_device
    params = [randn(7, device=device), torch.zeros(7, dtype=torch.float8_e4m3fn, device=device)]
    before = snapshot(params[:1])
    with pytest.raises(TypeError, match="param 1 must be float32, float64, float16 or bfloat16"):
        ops.masked_sgd_step_(params, [torch.ones_like(p) for p in params], [], [], lr=0.1,
                             backend=backend)  # fmt: skip
    assert_unchanged(params[:1], before)


# -- precision: the truncation factor in the parameters' dtype ---------------------------


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.mark.parametrize("r", (3e-3, 0.1))
def test_float64_steps_keep_the_truncation_factor_in_float64(backend_device, r):
    backend, device = backend_device
    assert _float32(r) != r  # otherwise the test could not tell the two apart
    n = 100  # two words, the second partly used
    pruned = torch.zeros(ops.packed_nbytes(n), dtype=torch.uint8, device=device)
    # SGD on pruned elements from p = 0 with g = 1, lr = 1: p = -r, exactly.
    param = torch.zeros(n, dtype=torch.float64, device=device)
    ops.masked_sgd_step_([param], [torch.ones_like(param)], [], [pruned], lr=1.0, truncation=r,
                         backend=backend)  # fmt: skip
    assert torch.all(param == -r), param[:3]
    # AdamW over a few steps: the reference within fp64 rounding, far from a float32 r.
    results = []
    for name, factor in ((backend, r), ("reference", r), ("reference", _float32(r))):
        param = randn(n, device=device, dtype=torch.float64, seed=1)
        m, v, step = (
            torch.zeros_like(param),
            torch.zeros_like(param),
            torch.zeros((), device=device),
        )
        for k in range(5):
            grad = randn(n, device=device, dtype=torch.float64, seed=10 + k)
            ops.masked_adamw_step_([param], [grad], [m], [v], [], [step], [pruned], lr=0.1,
                                   truncation=factor, backend=name)  # fmt: skip
        results.append(param)
    ours, exact, rounded = results
    assert_close(ours, exact, what=backend, rtol=1e-14, atol=1e-16)
    assert not torch.allclose(rounded, exact, rtol=1e-14, atol=1e-16)
