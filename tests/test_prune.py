"""Ticket pruning: unstructured masks and structured channel removal."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from worm_fast.experiments.models import build_model
from worm_fast.prune import apply_unstructured, prune_channels, zero_pruned_channels

CASES = [("resnet20_projection", 0.5), ("resnet18", 0.125), ("vgg11", 0.125)]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomized(name, width, seed=0):
    """A model in eval mode whose BatchNorms are far from identity, so that every channel
    matters to the output, with a linear layer large enough to make errors visible."""
    torch.manual_seed(seed)
    model = build_model(name, width=width, in_channels=1, num_classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight)
    return model.eval()


def bn_names(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def random_masks(model, keep=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {k: torch.rand(params[k].shape, generator=g) < keep for k in bn_names(model)}


def residual_groups(model):
    """BatchNorms that residual additions couple, by name: a group runs from a projection
    shortcut (or the stem) through every following block's bn2 and projection BN."""
    groups, current = [], ["bn1.weight"]
    for s, stage in enumerate(model.stages()):
        if isinstance(stage[0].shortcut, nn.Sequential):  # a projection starts a new group
            groups.append(current)
            current = []
        for j, block in enumerate(stage):
            current.append(f"layer{s + 1}.{j}.bn2.weight")
            if isinstance(block.shortcut, nn.Sequential):
                current.append(f"layer{s + 1}.{j}.shortcut.1.weight")
    return [*groups, current]


def resnet_params(model, kept):
    """Parameters of the ResNet that keeps ``kept[bn]`` channels, walking its blocks."""
    k = {name: int(mask.sum()) for name, mask in kept.items()}
    cin = k["bn1.weight"]
    total = model.conv1.in_channels * cin * 9 + 2 * cin
    for s, stage in enumerate(model.stages()):
        for j, block in enumerate(stage):
            p = f"layer{s + 1}.{j}"
            mid, out = k[f"{p}.bn1.weight"], k[f"{p}.bn2.weight"]
            total += cin * mid * 9 + 2 * mid + mid * out * 9 + 2 * out
            if isinstance(block.shortcut, nn.Sequential):
                total += cin * out + 2 * out
            cin = out
    return total + cin * model.fc.out_features + model.fc.out_features


def vgg_params(model, kept):
    counts = [int(kept[name].sum()) for name in bn_names(model)]
    total, cin = 0, 1
    for c in counts:
        total += cin * c * 9 + 2 * c
        cin = c
    return total + cin * 5 + 5


@pytest.mark.parametrize(("name", "width"), CASES)
def test_pruned_model_equals_masked_model(name, width):
    model = randomized(name, width)
    masks = random_masks(model)
    x = torch.randn(3, 1, 32, 32)
    before = copy.deepcopy(model.state_dict())
    result = prune_channels(model, masks, x)

    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key
    eff = result.effective_masks
    assert eff.keys() == masks.keys()
    for key in masks:
        assert not (masks[key] & ~eff[key]).any(), f"{key}: a kept channel was removed"
        assert result.model.get_submodule(key[: -len(".weight")]).num_features == eff[key].sum()
    assert result.params_before == n_params(model)
    assert result.params_after == n_params(result.model)
    counter = vgg_params if name == "vgg11" else resnet_params
    assert result.params_after == counter(model, eff)
    assert result.params_after < result.params_before

    expected = zero_pruned_channels(copy.deepcopy(model), eff)(x)
    torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
    # And the removed channels mattered: the unpruned model computes something else.
    assert (model(x) - expected).abs().max() > 1e-2


def test_vgg_removes_exactly_the_masked_channels():
    model = randomized("vgg11", 0.125)
    masks = random_masks(model)
    result = prune_channels(model, masks, torch.randn(1, 1, 32, 32))
    for key in masks:
        assert torch.equal(result.effective_masks[key], masks[key]), key


def test_resnet_coupled_channels_removed_only_where_all_prune():
    model = randomized("resnet20_projection", 0.5)
    masks = random_masks(model, keep=0.2)
    eff = prune_channels(model, masks, torch.randn(1, 1, 32, 32)).effective_masks
    coupled = residual_groups(model)
    assert [len(g) for g in coupled] == [4, 4, 4]  # stem + 3 bn2; 3 bn2 + projection
    for group in coupled:
        union = torch.stack([masks[k] for k in group]).any(0)
        assert union.any()
        for key in group:
            assert torch.equal(eff[key], union), key
    for key in set(masks) - {k for g in coupled for k in g}:  # each block's bn1: alone
        assert torch.equal(eff[key], masks[key]) or masks[key].sum() == 0, key


@pytest.mark.parametrize(("name", "width"), [("resnet20_projection", 0.5), ("vgg11", 0.125)])
def test_fully_pruned_layer_keeps_its_largest_gamma(name, width):
    model = randomized(name, width)
    masks = {k: torch.zeros_like(m) for k, m in random_masks(model).items()}
    x = torch.randn(2, 1, 32, 32)
    result = prune_channels(model, masks, x)
    params = dict(model.named_parameters())
    groups = residual_groups(model) if name == "resnet20_projection" else []
    groups += [[k] for k in masks if not any(k in g for g in groups)]
    for group in groups:
        gamma = torch.stack([params[k].detach().abs() for k in group]).amax(0)
        expected = torch.zeros_like(masks[group[0]])
        expected[gamma.argmax()] = True
        for key in group:
            assert torch.equal(result.effective_masks[key], expected), key
    reference = zero_pruned_channels(copy.deepcopy(model), result.effective_masks)(x)
    torch.testing.assert_close(result.model(x), reference, rtol=1e-5, atol=1e-5)


def test_batchnorm_without_mask_is_kept():
    model = randomized("resnet20_projection", 0.5)
    masks = random_masks(model, keep=0.0)
    del masks["layer1.0.bn2.weight"]  # couples the stem and all of stage 1
    del masks["layer2.1.bn1.weight"]
    result = prune_channels(model, masks, torch.randn(1, 1, 32, 32))
    for key in ["bn1.weight", "layer1.1.bn2.weight", "layer1.2.bn2.weight"]:
        assert result.effective_masks[key].all()
    assert result.model.layer2[1].bn1.num_features == 16
    assert result.model.layer1[0].bn2.num_features == 8
    assert result.model.layer2[0].bn2.num_features == 1


def test_training_mode_grad_mode_and_backward():
    model = randomized("resnet20_projection", 0.5).train()
    masks = random_masks(model)
    with torch.no_grad():  # tracing needs autograd; prune_channels enables it itself
        result = prune_channels(model, masks, torch.randn(2, 1, 32, 32))
    assert result.model.training
    result.model(torch.randn(4, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in result.model.parameters())


def test_channel_mask_errors():
    model = build_model("vgg11", width=0.125)
    good = torch.ones(8, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=re.escape("'features.0.weight' is not the weight of an affine")
    ):
        prune_channels(model, {"features.0.weight": good}, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=re.escape("'nope.weight' is not the weight")):
        zero_pruned_channels(model, {"nope.weight": good})
    with pytest.raises(ValueError, match=r"'features.1.weight' has shape \(9,\), expected \(8,\)"):
        zero_pruned_channels(model, {"features.1.weight": torch.ones(9, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a bool tensor"):
        zero_pruned_channels(model, {"features.1.weight": torch.ones(8)})


def test_zero_pruned_channels_zeroes_weight_and_bias():
    model = randomized("vgg11", 0.125)
    mask = torch.tensor([True, False, True, False, False, True, True, True])
    bn = model.features[1]
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    assert zero_pruned_channels(model, {"features.1.weight": mask}) is model
    assert torch.equal(bn.weight.detach(), torch.where(mask, weight, 0.0))
    assert torch.equal(bn.bias.detach(), torch.where(mask, bias, 0.0))


def test_unstructured_masks_zero_the_masked_weights():
    model = randomized("resnet20_projection", 0.25)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    names = ["conv1.weight", "layer2.0.conv2.weight", "layer1.1.bn1.weight", "fc.weight"]
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.5 for n in names}
    originals = {n: params[n].detach().clone() for n in names}
    x = torch.randn(2, 1, 32, 32)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            reference.get_parameter(n).mul_(masks[n])

    assert apply_unstructured(model, masks) is model
    for n in names:
        module_name, _, attr = n.rpartition(".")
        module = model.get_submodule(module_name)
        assert torch.equal(getattr(module, attr), torch.where(masks[n], originals[n], 0.0))
        assert torch.equal(getattr(module, attr + "_orig").detach(), originals[n])
    torch.testing.assert_close(model(x), reference(x))


def test_unstructured_errors_leave_the_model_alone():
    model = build_model("resnet20_projection", width=0.25)
    good = {"conv1.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=re.escape("no parameter named 'conv9.weight'")):
        apply_unstructured(model, {**good, "conv9.weight": good["conv1.weight"]})
    with pytest.raises(ValueError, match=r"'fc.bias' has shape \(3,\), expected \(10,\)"):
        apply_unstructured(model, {**good, "fc.bias": torch.ones(3, dtype=torch.bool)})
    assert not hasattr(model.conv1, "weight_orig")


def test_zero_padding_shortcuts_are_refused_not_mispruned():
    # torch-pruning cannot follow channels through He et al.'s option-A shortcut (F.pad
    # over channels); channel removal must refuse, never return a model that computes
    # something else, and leave the input model untouched.
    model = randomized("resnet20", 0.5)
    before = copy.deepcopy(model.state_dict())
    masks = {
        name: torch.rand(p.shape) > 0.5
        for name, p in model.named_parameters()
        if "bn" in name and name.endswith("weight")
    }
    with pytest.raises(ValueError, match=r"zero-padding shortcut.*apply_unstructured"):
        prune_channels(model, masks, torch.randn(1, 1, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    apply_unstructured(model, masks)  # masks work on any architecture
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_a_batchnorm_the_forward_never_uses_keeps_its_channels():
    # torch-pruning's graph holds only what the forward runs: an unused BatchNorm is in
    # no group, so nothing of it is removed, whatever its mask says.
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
            self.spare = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    masks = {"bn.weight": torch.tensor([True, False, True, True]),
             "spare.weight": torch.zeros(3, dtype=torch.bool)}  # fmt: skip
    result = prune_channels(WithSpare().eval(), masks, torch.randn(1, 1, 5, 5))
    assert result.effective_masks["spare.weight"].tolist() == [True] * 3
    assert result.effective_masks["bn.weight"].tolist() == [True, False, True, True]
    assert result.model.bn.num_features == 3 and result.model.spare.num_features == 3


def test_masks_follow_the_model_to_its_device():
    # The meta device stands in for a second device: CPU masks apply to a model there.
    mask = torch.tensor([True, False, True, True])
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).to("meta")
    apply_unstructured(model, {"1.weight": mask})
    assert model[1].weight_mask.device.type == "meta"
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).to("meta")
    zero_pruned_channels(model, {"1.weight": mask})
    assert model[1].weight.device.type == "meta"


def test_channel_removal_is_quiet_about_parameters_outside_layers():
    # torch-pruning warns (when verbose) about parameters outside its known layers; a
    # scalar one has nothing to prune, and prune_channels asks it to stay quiet.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3))) * self.scale

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = prune_channels(Scaled().eval(), {"bn.weight": torch.tensor([True, False] * 2)},
                                torch.randn(1, 1, 5, 5))  # fmt: skip
    assert result.model.bn.num_features == 2
