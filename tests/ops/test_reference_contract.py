"""The oracle's own contract, where comparing two backends cannot show a slip: its
status, the precision each op computes in (a float64 threshold is rounded to the
values' compute dtype; half-precision steps run in fp32, so an intermediate that would
overflow fp16 does not), edge hyperparameters, and the scalar tensors it refuses."""

import pytest
import torch

from tests.utils import kernels_of
from worm_fast import ops
from worm_fast.backends import BackendStatus, reference


def test_status():
    assert reference.status() == BackendStatus("reference", True, "pure torch, any device", None)


def test_a_float64_threshold_is_rounded_to_the_values_compute_dtype(backend_device):
    # 1 - 1e-12 is 1.0 in float32: a float32 1.0 is not above it, so it is pruned.
    values = torch.tensor([1.0, 2.0, 0.5], device=backend_device[1])
    threshold = torch.tensor(1.0 - 1e-12, dtype=torch.float64, device=backend_device[1])
    packed = kernels_of(backend_device).pack_mask(values, threshold)
    assert ops.unpack_mask(packed.cpu(), 3).tolist() == [False, True, False]


def sgd(backend_device, dtype, values, **hyper):
    """One masked_sgd_step_ of (param, grad, buffer) ``values`` in ``dtype``, no mask."""
    device = backend_device[1]
    param, grad, buffer = (torch.tensor([v], dtype=dtype, device=device) for v in values)
    kwargs = dict(lr=0.25, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                  maximize=False, is_first_step=False, truncation=1.0)  # fmt: skip
    kwargs.update(hyper)
    buffers = [buffer] if kwargs["momentum"] else []
    kernels_of(backend_device).masked_sgd_step_([param], [grad], buffers, [], **kwargs)
    return param.item(), buffer.item()


def test_half_precision_sgd_computes_in_float32(backend_device):
    # weight_decay * p = 120000 overflows fp16 (65504): in fp32, g = 120001 and
    # p - 0.25 * g = 30000 - 0.25 fits.
    param, _ = sgd(backend_device, torch.float16, (60000.0, 1.0, 0.0), weight_decay=2.0)
    assert param == torch.tensor(60000.0 - 0.25 * 120001.0, dtype=torch.float16).item()
    # Momentum: b = 0.5 * 60000 + 60000 = 90000 overflows fp16 unless computed in fp32;
    # p = 30000 - 0.25 * 90000 fits.
    param, buffer = sgd(backend_device, torch.float16, (30000.0, 60000.0, 60000.0),
                        momentum=0.5)  # fmt: skip
    assert param == 30000.0 - 0.25 * 90000.0 and buffer == float("inf")  # stored in fp16


@pytest.mark.parametrize("momentum, weight_decay", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_sgd_with_unit_momentum_or_decay_is_torchs(backend_device, momentum, weight_decay):
    device = backend_device[1]
    param = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, device=device)
    grad = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64, device=device)
    buffer = torch.tensor([0.125, -0.5, 2.0], dtype=torch.float64, device=device)
    theirs = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.SGD([theirs], lr=0.25, momentum=momentum, weight_decay=weight_decay)
    theirs.grad = grad.clone()
    if momentum:
        optimizer.state[theirs]["momentum_buffer"] = buffer.clone()
    optimizer.step()
    kernels_of(backend_device).masked_sgd_step_(
        [param], [grad], [buffer] if momentum else [], [], lr=0.25, weight_decay=weight_decay,
        momentum=momentum, dampening=0.0, nesterov=False, maximize=False,
        is_first_step=False, truncation=1.0,
    )  # fmt: skip
    torch.testing.assert_close(param, theirs.detach(), rtol=1e-12, atol=1e-12)


def test_half_precision_adamw_squares_the_gradient_in_float32(backend_device):
    # g = 300: g * g = 90000 overflows fp16; in fp32 the first step moves p by lr.
    device = backend_device[1]
    param = torch.tensor([1000.0], dtype=torch.float16, device=device)
    grad = torch.tensor([300.0], dtype=torch.float16, device=device)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    step = torch.zeros((), device=device)
    kernels_of(backend_device).masked_adamw_step_(
        [param], [grad], [m], [v], [], [step], [], lr=4.0, beta1=0.9, beta2=0.999,
        weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, truncation=1.0,
    )  # fmt: skip
    assert param.item() == 996.0 and v.item() == torch.tensor(90.0, dtype=torch.float16).item()


@pytest.mark.parametrize("scalar", ["lr_tensor", "grad_scale", "found_inf"])
@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_the_reference_refuses_scalars_of_several_elements(op, scalar):
    param, grad = torch.zeros(3), torch.ones(3)
    two = {scalar: torch.ones(2)}
    with pytest.raises(ValueError, match=rf"^{scalar} has 2 elements, expected 1$"):
        if op == "sgd":
            reference.masked_sgd_step_(
                [param], [grad], [], [], lr=0.1, weight_decay=0.0, momentum=0.0,
                dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                truncation=1.0, **two,
            )  # fmt: skip
        else:
            reference.masked_adamw_step_(
                [param], [grad], [torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())],
                [], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                amsgrad=False, maximize=False, truncation=1.0, **two,
            )  # fmt: skip


def test_half_precision_sgd_unscales_in_float32(backend_device):
    # 60000 / 0.5 = 120000 overflows fp16; in fp32, p = 40000 - 0.25 · 120000 fits.
    device = backend_device[1]
    param = torch.tensor([40000.0], dtype=torch.float16, device=device)
    grad = torch.tensor([60000.0], dtype=torch.float16, device=device)
    kernels_of(backend_device).masked_sgd_step_(
        [param], [grad], [], [], lr=0.25, weight_decay=0.0, momentum=0.0, dampening=0.0,
        nesterov=False, maximize=False, is_first_step=False, truncation=1.0,
        grad_scale=torch.tensor(0.5, device=device),
    )  # fmt: skip
    assert param.item() == 10000.0


def test_half_precision_adamw_decays_the_parameter_in_float32(backend_device):
    # p (1 - lr·wd) = 999.9 rounds to 1000 in fp16; in fp32, 999.9 - 0.2 (the first
    # step's update, lr · sign(g)) = 999.7 rounds to 999.5 once, at the end.
    device = backend_device[1]
    param = torch.tensor([1000.0], dtype=torch.float16, device=device)
    grad = torch.tensor([1.0], dtype=torch.float16, device=device)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    kernels_of(backend_device).masked_adamw_step_(
        [param], [grad], [m], [v], [], [torch.zeros((), device=device)], [], lr=0.2,
        beta1=0.9, beta2=0.999, weight_decay=5e-4, eps=1e-8, amsgrad=False, maximize=False,
        truncation=1.0,
    )  # fmt: skip
    assert param.item() == 999.5


def test_an_inf_step_with_unit_momentum_keeps_the_buffer(backend_device):
    device = backend_device[1]
    param, grad = torch.ones(3, device=device), torch.ones(3, device=device)
    buffer = torch.full((3,), 0.5, device=device)
    kernels_of(backend_device).masked_sgd_step_(
        [param], [grad], [buffer], [], lr=0.25, weight_decay=0.0, momentum=1.0,
        dampening=0.0, nesterov=False, maximize=False, is_first_step=False, truncation=1.0,
        found_inf=torch.ones((), device=device),
    )  # fmt: skip
    assert param.tolist() == [1.0] * 3 and buffer.tolist() == [0.5] * 3


def test_a_zero_weight_has_a_zero_soft_mask_gradient(backend_device):
    # |v| has no slope at 0: sign(0) = 0, never a division by it.
    backend, device = backend_device
    values = torch.tensor([0.0, 0.5, -0.5], device=device, requires_grad=True)
    window = torch.zeros(1, 8, dtype=torch.uint8, device=device)
    window[0, 0] = 0b101
    distance = ops.soft_mask_distance([values], window, [0.25], [0.1], backend=backend)
    distance.backward()
    assert values.grad[0].item() == 0.0 and torch.isfinite(values.grad).all()
    # The oracle of the backward kernels, called as they are.
    (oracle,) = reference.soft_mask_distance_backward(
        torch.ones((), device=device), [values.detach()], window, torch.tensor([0.25]),
        torch.tensor([0.1]),
    )  # fmt: skip
    torch.testing.assert_close(oracle, values.grad, rtol=1e-6, atol=0)


def test_the_soft_mask_backward_checks_its_gradient():
    values, window = [torch.ones(3)], torch.zeros(1, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="grad"):
        reference.soft_mask_distance_backward(
            torch.ones(2), values, window, torch.tensor([0.5]), torch.tensor([0.1])
        )


def test_the_soft_mask_backward_returns_gradients_in_the_values_dtype():
    values = [torch.tensor([0.25, -0.75, 1.5], dtype=torch.float16)]
    window = torch.zeros(1, 8, dtype=torch.uint8)
    (grad,) = reference.soft_mask_distance_backward(
        torch.ones(()), values, window, torch.tensor([0.5]), torch.tensor([0.25])
    )
    assert grad.dtype == torch.float16 and grad.shape == (3,)
