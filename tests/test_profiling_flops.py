"""Model FLOP counts on the meta device against hand calculations and real tensors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from worm_fast import prune
from worm_fast.profiling import flops
from worm_fast.profiling.flops import FlopCount, model_flops


def test_linear_matches_hand_count():
    batch, n_in, n_out = 5, 6, 4
    counted = model_flops(torch.nn.Linear(n_in, n_out), torch.randn(batch, n_in))
    # Forward x @ W^T; backward only dW = grad^T @ x, since the input needs no gradient.
    assert counted == FlopCount(forward=2 * batch * n_in * n_out, backward=2 * batch * n_in * n_out)
    assert counted.train_step == 4 * batch * n_in * n_out


@pytest.mark.parametrize("stride, side_out", [(1, 10), (2, 5)])
def test_conv2d_matches_hand_count(stride, side_out):
    batch, c_in, c_out, k = 2, 3, 8, 3
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=1)
    counted = model_flops(conv, torch.randn(batch, c_in, 10, 10))
    per_output = 2 * c_in * k * k  # one multiply-add per weight of the output's window
    expected = batch * c_out * side_out * side_out * per_output
    assert counted == FlopCount(forward=expected, backward=expected)  # backward: dW only


def _small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def _cross_entropy(output):
    return torch.nn.functional.cross_entropy(
        output, torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    )


def test_meta_count_equals_count_on_real_tensors():
    model, x = _small_cnn(), torch.randn(4, 3, 12, 12)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        _cross_entropy(out).backward()
    real = FlopCount(forward=forward, backward=counter.get_total_flops() - forward)

    model.zero_grad(set_to_none=True)
    weight = model[0].weight
    assert model_flops(model, x, loss_fn=_cross_entropy) == real
    assert real.forward > 0 and real.backward > real.forward  # dX and dW for inner layers
    # Counting used meta copies: the model's own weights stay where they were, untouched.
    assert model[0].weight is weight and weight.device.type == "cpu" and weight.grad is None


def test_count_is_cached_per_architecture_and_input_shape():
    x = torch.randn(4, 3, 12, 12)
    first = model_flops(_small_cnn(), x)
    assert model_flops(_small_cnn(), x) is first  # a fresh model of the same architecture
    assert model_flops(_small_cnn(), torch.randn(8, 3, 12, 12)).forward == 2 * first.forward

    pruned = _small_cnn()
    pruned[3] = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)  # half the channels
    pruned[6] = torch.nn.Linear(32, 10)
    assert model_flops(pruned, x).forward < first.forward


def test_model_without_float_output_needs_a_loss_fn():
    with pytest.raises(ValueError, match="loss_fn"):
        model_flops(torch.nn.Identity(), torch.ones(3, dtype=torch.long))


def _pruned_cnn() -> torch.nn.Module:
    model = _small_cnn()
    prune.apply_unstructured(
        model,
        {"0.weight": torch.rand(8, 3, 3, 3) < 0.5, "1.weight": torch.arange(8) % 2 == 0},
    )
    return model


def _forward_with_autograd(model):
    model(torch.randn(2, 3, 12, 12)).sum().backward()


def _forward_without_autograd(model):
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 12, 12))
    model.train()


@pytest.mark.parametrize(
    "before_counting",
    [lambda model: None, _forward_with_autograd, _forward_without_autograd],
    ids=["right-after-pruning", "after-a-training-forward", "after-an-evaluation"],
)
def test_masked_model_counts_whatever_ran_since_pruning(before_counting, monkeypatch):
    # custom_from_mask keeps the masked weight as a plain attribute, recomputed from
    # weight_orig * weight_mask before each forward; with autograd on it is a graph
    # tensor, which deepcopy refuses. The count must not depend on what ran last.
    monkeypatch.setattr(flops, "_model_flops_cache", {})  # count this model, not a cached one
    x = torch.randn(4, 3, 12, 12)
    dense = model_flops(_small_cnn(), x)
    model = _pruned_cnn()
    before_counting(model)
    masked_weight, original = model[0].weight, model[0].weight_orig
    monkeypatch.setattr(flops, "_model_flops_cache", {})
    assert model_flops(model, x) == dense  # masking removes no multiply-adds
    # The model itself is untouched: the same tensors, on their device, the hook kept.
    assert model[0].weight is masked_weight and model[0].weight_orig is original
    assert original.device.type == "cpu"
    assert len(model[0]._forward_pre_hooks) == 1
