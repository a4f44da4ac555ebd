"""No half-applied state: every public entry point that raises leaves every object it was
given exactly as it was; and masks are never ambiguous (bool, or explicitly packed)."""

import copy
import math

import pytest
import torch
from torch import nn

from worm_fast import EarlyBirdSearch, WormAdamW, WormSGD, ops, prune
from worm_fast.masks import MaskWindow, compute_masks


def capture(obj):
    """Everything observable about ``obj``'s state, copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, nn.Module):
        hooks = sum(len(m._forward_pre_hooks) for m in obj.modules())
        names = [name for name, _ in obj.named_parameters()]
        return {"state": capture(obj.state_dict()), "hooks": hooks, "names": names}
    if isinstance(obj, torch.optim.Optimizer):
        return {"state_dict": capture(obj.state_dict()), "keys": len(obj.state)}
    if isinstance(obj, EarlyBirdSearch):
        return {"state_dict": capture(obj.state_dict()), "ticket": obj.ticket is not None}
    if isinstance(obj, MaskWindow):
        return capture(obj.state_dict())
    if isinstance(obj, dict):
        return {key: capture(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [capture(value) for value in obj]
    return copy.deepcopy(obj)


def assert_same(before, after, where="state"):
    assert type(before) is type(after), where
    if isinstance(before, torch.Tensor):
        assert before.shape == after.shape and before.dtype == after.dtype, where
        assert torch.equal(before, after) or torch.allclose(before, after, equal_nan=True), where
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            assert_same(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, list):
        assert len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after)):
            assert_same(b, a, f"{where}[{i}]")
    elif isinstance(before, float) and math.isnan(before):
        assert math.isnan(after), where
    else:
        assert before == after, where


class Net(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def trained(optimizer_class=WormSGD, steps=2, **kwargs):
    torch.manual_seed(0)
    model = Net()
    optimizer = optimizer_class(model.parameters(), lr=0.05, **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 1, 6, 6)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def search_after_checks(mode="worm", checks=3):
    model, optimizer = trained(momentum=0.9)
    search = EarlyBirdSearch(model, optimizer, mode=mode, window=2, stop_distance=1e-9)
    for k in range(checks):
        with torch.no_grad():  # a different mask at every check: never converges
            model.bn.weight.copy_(torch.arange(1.0, 9.0).roll(k))
        search.check()
    return model, optimizer, search


# -- every entry point: (objects it may change, the call that must raise, the error) -----


def sgd_step_failing_on_its_second_call():
    # A float32 and a float64 group: the second fused call's mask is stale.
    first = nn.Parameter(torch.randn(7))
    second = nn.Parameter(torch.randn(9, dtype=torch.float64))
    optimizer = WormSGD([first, second], lr=0.1, momentum=0.9)
    optimizer.set_truncation({second: torch.rand(9) < 0.5}, 0.1)
    with torch.no_grad():
        second.data = torch.randn(3, 3, dtype=torch.float64)  # same numel, new shape
    first.grad, second.grad = torch.ones(7), torch.ones(3, 3, dtype=torch.float64)
    return [first, second, optimizer], optimizer.step, ValueError, "changed|was set for shape"


def sgd_step_after_a_masked_parameter_moved():
    # Its mask (and r) stayed on the CPU: refused before the missing r on its new device.
    first = nn.Parameter(torch.randn(7))
    second = nn.Parameter(torch.randn(9))
    optimizer = WormSGD([first, second], lr=0.1, momentum=0.9)
    optimizer.set_truncation({second: torch.rand(9) < 0.5}, 0.1)
    torch.utils.swap_tensors(second, nn.Parameter(torch.randn(9, device="meta")))  # as .to()
    first.grad, second.grad = torch.ones(7), torch.ones(9, device="meta")
    return [first, optimizer], optimizer.step, ValueError, "is on meta, but its truncation mask"


def sgd_step_with_an_expanded_parameter():
    first = nn.Parameter(torch.randn(7))
    second = nn.Parameter(torch.randn(1).expand(5))
    optimizer = WormSGD([first, second], lr=0.1, momentum=0.9)
    first.grad, second.grad = torch.ones(7), torch.ones(5)
    return [first, second, optimizer], optimizer.step, ValueError, "share memory"


def adamw_step_with_a_sparse_gradient_last():
    params = [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(5))]
    optimizer = WormAdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    params[0].grad, params[1].grad = torch.ones(7), torch.ones(5).to_sparse()
    return [*params, optimizer], optimizer.step, RuntimeError, "sparse"


def set_truncation_with_a_bad_second_mask():
    model, optimizer = trained()
    masks = {model.conv.weight: torch.ones_like(model.conv.weight, dtype=torch.bool),
             model.bn.weight: torch.ones(3, dtype=torch.bool)}  # fmt: skip
    return [optimizer], lambda: optimizer.set_truncation(masks, 0.1), ValueError, "bool mask"


def sgd_load_state_dict_with_a_short_buffer():
    _, optimizer = trained(momentum=0.9)
    state = optimizer.state_dict()
    state["state"][1]["momentum_buffer"] = torch.zeros(3)
    return [optimizer], lambda: optimizer.load_state_dict(state), ValueError, "momentum_buffer"


def adamw_load_state_dict_with_a_bad_mask():
    model, optimizer = trained(WormAdamW)
    optimizer.set_truncation({model.bn.weight: torch.rand(8) < 0.5}, 0.1)
    state = optimizer.state_dict()
    state["worm_truncation"]["masks"][3] = torch.zeros(16, dtype=torch.uint8)
    return [optimizer], lambda: optimizer.load_state_dict(state), ValueError, "8 bytes"


def adamw_load_state_dict_with_a_wrong_exp_avg():
    _, optimizer = trained(WormAdamW)
    state = optimizer.state_dict()
    state["state"][0]["exp_avg"] = torch.zeros(2)
    return [optimizer], lambda: optimizer.load_state_dict(state), ValueError, "exp_avg"


def search_check_on_non_finite_values():
    model, optimizer, search = search_after_checks()
    with torch.no_grad():
        model.bn.weight[3] = float("nan")
    return [model, optimizer, search], search.check, FloatingPointError, "NaN or inf"


def search_check_after_a_parameter_changed_shape():
    model, optimizer, search = search_after_checks()
    model.bn.weight.data = torch.ones(4)
    return [optimizer, search], search.check, ValueError, "shape"


def search_load_state_dict_with_a_bad_mask():
    *_, search = search_after_checks()
    state = copy.deepcopy(search.state_dict())
    state["newest"] = [torch.zeros(16, dtype=torch.uint8)]
    _, fresh_optimizer, fresh = search_after_checks(checks=1)
    return (
        [fresh_optimizer, fresh],
        lambda: fresh.load_state_dict(state),
        ValueError,
        "saved mask",
    )


def search_load_state_dict_with_bad_rows():
    _, optimizer, search = search_after_checks()
    state = copy.deepcopy(search.state_dict())
    state["window"]["rows"] = torch.zeros(2, 3)
    return [optimizer, search], lambda: search.load_state_dict(state), ValueError, "rows"


def window_push_of_another_width():
    window = MaskWindow(3, 10)
    window.push(torch.zeros(8, dtype=torch.uint8))
    return [window], lambda: window.push(torch.zeros(16, dtype=torch.uint8)), ValueError, "8"


def apply_unstructured_with_a_bad_second_mask():
    model, _ = trained()
    masks = {"conv.weight": torch.ones(8, 1, 3, 3, dtype=torch.bool),
             "bn.weight": torch.ones(3, dtype=torch.bool)}  # fmt: skip
    return [model], lambda: prune.apply_unstructured(model, masks), ValueError, "shape"


def zero_pruned_channels_with_a_bad_key():
    model, _ = trained()
    masks = {"bn.weight": torch.ones(8, dtype=torch.bool), "head.weight": torch.ones(2, 8)}
    return [model], lambda: prune.zero_pruned_channels(model, masks), ValueError, "BatchNorm"


def masked_sgd_step_op_with_a_bad_last_mask():
    params = [torch.randn(65), torch.randn(7)]
    buffers = [torch.randn(65), torch.randn(7)]
    masks = [ops.pack_mask(params[0], 0.5), torch.zeros(3, dtype=torch.uint8)]
    grads = [torch.ones(65), torch.ones(7)]

    def call():
        ops.masked_sgd_step_(params, grads, buffers, masks, lr=0.1, momentum=0.9)

    return [params, buffers], call, ValueError, "mask 1"


def masked_adamw_step_op_with_a_bad_step():
    params, grads = [torch.randn(65), torch.randn(7)], [torch.ones(65), torch.ones(7)]
    m, v = [torch.zeros(65), torch.zeros(7)], [torch.zeros(65), torch.zeros(7)]
    steps = [torch.zeros(()), torch.zeros((), dtype=torch.float64)]

    def call():
        ops.masked_adamw_step_(params, grads, m, v, [], steps, [], lr=0.1)

    return [params, m, v, steps], call, ValueError, "step 1"


ENTRY_POINTS = [
    sgd_step_failing_on_its_second_call,
    sgd_step_after_a_masked_parameter_moved,
    sgd_step_with_an_expanded_parameter,
    adamw_step_with_a_sparse_gradient_last,
    set_truncation_with_a_bad_second_mask,
    sgd_load_state_dict_with_a_short_buffer,
    adamw_load_state_dict_with_a_bad_mask,
    adamw_load_state_dict_with_a_wrong_exp_avg,
    search_check_on_non_finite_values,
    search_check_after_a_parameter_changed_shape,
    search_load_state_dict_with_a_bad_mask,
    search_load_state_dict_with_bad_rows,
    window_push_of_another_width,
    apply_unstructured_with_a_bad_second_mask,
    zero_pruned_channels_with_a_bad_key,
    masked_sgd_step_op_with_a_bad_last_mask,
    masked_adamw_step_op_with_a_bad_step,
]


@pytest.mark.parametrize("case", ENTRY_POINTS, ids=[case.__name__ for case in ENTRY_POINTS])
def test_an_entry_point_that_raises_changes_nothing(case):
    watched, call, error, message = case()
    before = capture(watched)
    with pytest.raises(error, match=message):
        call()
    assert_same(before, capture(watched))


def test_the_state_capture_sees_a_change():
    """The comparison above can fail: one optimizer step is seen."""
    model, optimizer = trained(momentum=0.9)
    before = capture([model, optimizer])
    model(torch.randn(4, 1, 6, 6)).square().mean().backward()
    optimizer.step()
    with pytest.raises(AssertionError):
        assert_same(before, capture([model, optimizer]))


# -- the search refuses an optimizer it cannot truncate through -------------------------


def test_search_refuses_an_optimizer_without_the_representative_parameters():
    model = Net()
    others = WormSGD([model.conv.weight, model.head.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold 'bn.weight'"):
        EarlyBirdSearch(model, others, mode="worm")
    EarlyBirdSearch(model, others, mode="eb")  # EB never truncates: any optimizer will do


def test_search_refuses_parameters_on_several_devices_and_integer_ones():
    with pytest.raises(ValueError, match="on one device"):
        EarlyBirdSearch([torch.ones(3), torch.ones(3, device="meta")], mode="eb")
    with pytest.raises(TypeError, match="floating-point"):
        EarlyBirdSearch([torch.ones(3, dtype=torch.int64)], mode="eb")


# -- masks: bool, or explicitly packed -------------------------------------------------


def test_a_uint8_mask_is_never_guessed_to_be_packed():
    # BatchNorm with 8 channels: 8 bytes is also its packed size.
    gamma = nn.Parameter(torch.ones(8))
    optimizer = WormSGD([gamma], lr=1.0)
    zero_one = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected a bool mask of shape .* needs packed=True"):
        optimizer.set_truncation({gamma: zero_one}, 0.0)
    assert not optimizer.truncation_masks
    optimizer.set_truncation({gamma: zero_one.bool()}, 0.0)
    gamma.grad = torch.ones(8)
    optimizer.step()
    assert gamma.tolist() == [0.0, 1.0] * 4  # kept elements moved, pruned ones did not


def test_packed_masks_are_taken_with_packed_true_and_round_trip():
    gamma = nn.Parameter(torch.ones(8))
    optimizer = WormSGD([gamma], lr=1.0)
    kept = torch.tensor([True, False] * 4)
    packed = ops.pack_mask(kept, 0.5)
    optimizer.set_truncation({gamma: packed}, 0.0, packed=True)
    again = WormSGD([gamma], lr=1.0)
    again.set_truncation(optimizer.truncation_masks, 0.0, packed=True)
    assert torch.equal(again.truncation_masks[gamma], packed)
    with pytest.raises(ValueError, match="packed uint8 mask of 8 bytes"):
        optimizer.set_truncation({gamma: kept}, 0.0, packed=True)


@pytest.mark.parametrize("optimizer_class", (WormSGD, WormAdamW))
def test_a_mask_whose_parameter_changed_size_is_refused(optimizer_class):
    param = nn.Parameter(torch.ones(8))
    optimizer = optimizer_class([param], lr=1.0)
    optimizer.set_truncation({param: torch.rand(8) < 0.5}, 0.0)
    param.data = torch.ones(7)  # same packed size (one word), other elements
    param.grad = torch.ones(7)
    with pytest.raises(ValueError, match=r"shape \(7,\), but its truncation mask was set for"):
        optimizer.step()
    assert param.tolist() == [1.0] * 7 and not optimizer.state
    optimizer.set_truncation({param: torch.rand(7) < 0.5}, 0.0)  # a new mask: steps again
    optimizer.step()
    assert param.tolist() != [1.0] * 7


def test_a_saved_mask_for_a_resized_parameter_is_refused():
    param = nn.Parameter(torch.ones(130))
    optimizer = WormSGD([param], lr=1.0)
    optimizer.set_truncation({param: torch.rand(130) < 0.5}, 0.1)
    state = optimizer.state_dict()
    param.data = torch.ones(7)
    with pytest.raises(ValueError, match="packed uint8 mask of 8 bytes"):
        WormSGD([param], lr=1.0).load_state_dict(state)


def test_compute_masks_output_goes_to_the_optimizer_packed():
    gamma = nn.Parameter(torch.randn(8))
    optimizer = WormSGD([gamma], lr=1.0)
    (packed,) = compute_masks([gamma], 0.5)
    optimizer.set_truncation({gamma: packed}, 0.1, packed=True)
    assert torch.equal(optimizer.truncation_masks[gamma], packed)
