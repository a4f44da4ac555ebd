"""The optimizers' contract beyond their steps: the defaults and argument checks of the
torch optimizers they replace, clearing truncation, and loading states that are wrong in
one way only."""

import copy

import pytest
import torch

from tests.utils import count_calls, fill_grads, make_params, random_bool_masks
from worm_fast import WormAdamW, WormSGD
from worm_fast.backends import reference as reference_kernels
from worm_fast.optim.base import lr_arguments

PAIRS = [(WormSGD, torch.optim.SGD), (WormAdamW, torch.optim.AdamW)]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["sgd", "adamw"])
def test_defaults_are_torchs(ours, theirs):
    params = make_params((3,), torch.float32)
    mine, torchs = ours(params).defaults, theirs(params).defaults
    assert {key: mine[key] for key in torchs if key in mine} == {
        key: torchs[key] for key in torchs if key in mine
    }
    assert set(mine) >= {"lr", "weight_decay", "maximize"}


ARGUMENTS = {
    WormSGD: [
        dict(lr=0.0), dict(lr=-1e-3), dict(lr=torch.tensor([0.1])),
        dict(lr=torch.tensor([0.1, 0.2])), dict(momentum=0.0), dict(momentum=-0.1),
        dict(weight_decay=0.0), dict(weight_decay=-1e-4), dict(momentum=0.9, nesterov=True),
        dict(momentum=0.0, nesterov=True), dict(momentum=0.9, dampening=0.1, nesterov=True),
    ],
    WormAdamW: [
        dict(lr=0.0), dict(lr=-1e-3), dict(lr=torch.tensor([0.1])),
        dict(lr=torch.tensor([0.1, 0.2])), dict(eps=0.0), dict(eps=-1e-8),
        dict(betas=(0.0, 0.0)), dict(betas=(1.0, 0.9)), dict(betas=(0.9, 1.0)),
        dict(betas=(-0.1, 0.9)), dict(betas=(0.9, 1.5)), dict(weight_decay=0.0),
        dict(weight_decay=-1e-2),
    ],
}  # fmt: skip
CASES = [(ours, theirs, kwargs) for ours, theirs in PAIRS for kwargs in ARGUMENTS[ours]]


@pytest.mark.parametrize("ours, theirs, kwargs", CASES)
def test_arguments_are_accepted_exactly_where_torch_accepts_them(ours, theirs, kwargs):
    params = make_params((3,), torch.float32)

    def accepts(optimizer_class) -> bool:
        try:
            optimizer_class(params, **kwargs)
        except ValueError:
            return False
        return True

    assert accepts(ours) == accepts(theirs), kwargs


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_cleared_truncation_steps_like_no_truncation(optimizer_class):
    params, plain = make_params((65, 7), torch.float32), make_params((65, 7), torch.float32)
    optimizer, reference = optimizer_class(params, lr=0.1), optimizer_class(plain, lr=0.1)
    optimizer.set_truncation(random_bool_masks(params, 0.5), 0.1)
    optimizer.clear_truncation()
    assert optimizer.truncation == 1.0 and optimizer.truncation_masks == {}
    for step in range(2):
        fill_grads(params, step)
        fill_grads(plain, step)
        optimizer.step()
        reference.step()
    for ours, theirs in zip(params, plain):
        assert torch.equal(ours, theirs)


def saved(optimizer_class=WormSGD):
    params = make_params((65, 7), torch.float32)
    optimizer = optimizer_class(params, lr=0.1, **(
        dict(momentum=0.9) if optimizer_class is WormSGD else {}))  # fmt: skip
    fill_grads(params, 0)
    optimizer.step()
    optimizer.set_truncation(random_bool_masks(params, 0.5), 0.5)
    return optimizer, copy.deepcopy(optimizer.state_dict())


def test_a_mask_for_a_parameter_past_the_last_is_refused():
    optimizer, state = saved()
    state["worm_truncation"]["masks"][2] = state["worm_truncation"]["masks"][1]
    with pytest.raises(ValueError, match="truncation mask for unknown param 2"):
        optimizer.load_state_dict(state)


def test_a_saved_mask_that_is_not_a_tensor_is_refused():
    optimizer, state = saved()
    state["worm_truncation"]["masks"][1] = state["worm_truncation"]["masks"][1].tolist()
    with pytest.raises(TypeError, match="masks must be tensors, got list"):
        optimizer.load_state_dict(state)


def test_state_of_an_unknown_parameter_does_not_hide_a_bad_one():
    # Entries of ids no group names are torch's to judge; the next entry is still checked.
    optimizer, state = saved()
    state["state"] = {99: {}, **state["state"]}
    state["state"][1]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="saved momentum_buffer of param 1"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("step", [3, 3.0, torch.tensor(3.0, dtype=torch.float64)])
def test_adamw_steps_load_as_float32_scalars_on_the_parameters_device(step):
    # torch.optim.AdamW saves its step as a CPU tensor (a number in older releases).
    optimizer, state = saved(WormAdamW)
    for entry in state["state"].values():
        entry["step"] = step
    optimizer.load_state_dict(state)
    for param in optimizer.param_groups[0]["params"]:
        loaded = optimizer.state[param]["step"]
        assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.float32
        assert loaded.shape == () and loaded.item() == 3.0 and loaded.device == param.device


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_the_backend_is_kept_and_auto_is_none(optimizer_class):
    params = make_params((3,), torch.float32)
    assert optimizer_class(params, backend="reference").backend == "reference"
    assert optimizer_class(params).backend is None  # "auto": chosen per device at each step


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_grad_scaler_leaves_the_unscaling_to_the_step(optimizer_class):
    # The fused step divides by grad_scale itself: GradScaler must not unscale the
    # gradients in a pass of its own (they stay scaled, as they were computed).
    params = make_params((65,), torch.float32)
    optimizer = optimizer_class(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(params[0].square().sum()).backward()
    scaled = params[0].grad.clone()
    scaler.step(optimizer)
    assert torch.equal(params[0].grad, scaled)


# -- the step (a decorated function: mutmut leaves it alone, so these were found by hand)


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_a_parameter_without_a_gradient_skips_only_itself(optimizer_class):
    params = make_params((5, 7), torch.float32)
    optimizer = optimizer_class(params, lr=0.1)
    params[1].grad = torch.ones(7)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert torch.equal(params[0], before[0]) and not torch.equal(params[1], before[1])


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_a_stale_mask_names_its_parameter(optimizer_class):
    params = make_params((5, 9), torch.float32)
    optimizer = optimizer_class(params, lr=0.1)
    optimizer.set_truncation(random_bool_masks(params, 0.5), 0.1)
    with torch.no_grad():
        params[1].data = torch.zeros(3, 3)
    fill_grads(params, 0)
    with pytest.raises(ValueError, match=r"step: parameter 1 has shape \(3, 3\), but its "):
        optimizer.step()


@pytest.mark.parametrize("optimizer_class", [WormSGD, WormAdamW])
def test_step_returns_the_closures_loss(optimizer_class):
    params = make_params((5,), torch.float32)
    optimizer = optimizer_class(params, lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = params[0].square().sum()
        loss.backward()
        return loss

    expected = params[0].detach().square().sum()
    assert torch.equal(optimizer.step(closure), expected)


def test_adamw_initializes_a_state_entry_that_was_only_looked_at():
    # optimizer.state is a defaultdict: reading state[p] before the first step leaves {}.
    params, plain = make_params((7,), torch.float32), make_params((7,), torch.float32)
    optimizer, reference = WormAdamW(params, lr=0.1), WormAdamW(plain, lr=0.1)
    assert optimizer.state[params[0]] == {}
    fill_grads(params, 0)
    fill_grads(plain, 0)
    optimizer.step()
    reference.step()
    assert torch.equal(params[0], plain[0]) and optimizer.state[params[0]]["step"].item() == 1.0


def test_adamw_uses_its_eps():
    ours, theirs = make_params((7,), torch.float32), make_params((7,), torch.float32)
    optimizer = WormAdamW(ours, lr=0.1, eps=0.5)
    reference = torch.optim.AdamW(theirs, lr=0.1, eps=0.5)
    for step in range(2):
        fill_grads(ours, step)
        fill_grads(theirs, step)
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer_class, kernel",
    [(WormSGD, "masked_sgd_step_"), (WormAdamW, "masked_adamw_step_")],
)
def test_a_forced_backend_runs_the_step(optimizer_class, kernel, monkeypatch):
    calls = count_calls(monkeypatch, reference_kernels, kernel)
    params = make_params((5,), torch.float32)
    optimizer = optimizer_class(params, lr=0.1, backend="reference")
    fill_grads(params, 0)
    optimizer.step()
    assert calls == [1]


def test_a_tensor_lr_is_read_on_the_host_only_from_the_cpu():
    # A CPU lr costs nothing to read; one on the accelerator (meta here) goes to the
    # kernel as a tensor, so the step never waits for the device.
    assert lr_arguments(torch.tensor(0.25), torch.device("cpu")) == {"lr": 0.25, "lr_tensor": None}
    device_lr = torch.tensor(0.25, device="meta")
    arguments = lr_arguments(device_lr, torch.device("meta"))
    assert arguments.keys() == {"lr", "lr_tensor"} and arguments["lr"] == 0.0
    assert arguments["lr_tensor"].device.type == "meta"
    assert lr_arguments(0.5, torch.device("cpu")) == {"lr": 0.5, "lr_tensor": None}
