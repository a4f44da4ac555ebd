"""CIFAR-style models: shapes, width scaling, parameter counts, registry errors."""

import math

import pytest
import torch
from torch import nn

from worm_fast.experiments.models import MODELS, VGG11_ADAPTIVE_CFG, VGG11_CFG, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vgg_params(cfg, width, in_channels, num_classes) -> int:
    """VGG parameter count from the config alone: bias-free 3x3 convs, BN, one linear."""
    total, channels = 0, in_channels
    for v in cfg:
        if v == "M":
            continue
        out = max(1, round(v * width))
        total += channels * out * 9 + 2 * out
        channels = out
    return total + channels * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(name, in_channels):
    model = build_model(name, num_classes=7, in_channels=in_channels, width=0.25).eval()
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_parameter_count(name):
    narrow = n_params(build_model(name, width=0.25))
    wider = n_params(build_model(name, width=0.5))
    # Conv weights dominate and grow with the square of the width.
    assert 3.0 < wider / narrow < 4.2


def test_tiny_width_keeps_one_channel_per_layer():
    model = build_model("vgg11", width=1e-3).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [1] * 8
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "cfg"), [("vgg11", VGG11_CFG), ("vgg11_adaptive", VGG11_ADAPTIVE_CFG)]
)
def test_vgg11_parameter_count_matches_config(name, cfg):
    for width, in_channels in [(1.0, 3), (0.3, 1)]:
        model = build_model(name, in_channels=in_channels, width=width)
        assert n_params(model) == vgg_params(cfg, width, in_channels, 10)


def test_vgg11_pools_as_the_early_bird_code():
    # Four max-pools take 32x32 to 2x2 and a 2x2 average pool to 1x1 (the Early-Bird
    # code's models/vgg.py); the adaptive variant has a fifth max-pool.
    model = build_model("vgg11", width=0.25).eval()
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and isinstance(model.avgpool, nn.AvgPool2d)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (2, 2)
    adaptive = build_model("vgg11_adaptive", width=0.25)
    assert len([m for m in adaptive.features if isinstance(m, nn.MaxPool2d)]) == 5


def test_resnet_parameter_counts_match_reference_implementations():
    # kuangliu/pytorch-cifar ResNet18 (the Early-Bird code's model): 11,173,962.
    assert n_params(build_model("resnet18")) == 11_173_962

    # ResNet-20, counted by hand: stem 3*16*9+32; stage k: 3 blocks of two 3x3 convs
    # + 2 BNs. He et al.'s option-A shortcuts have no parameters (0.27M in their Table 6);
    # projection shortcuts add a 1x1 conv + BN where the shape changes.
    def block(cin, c):
        return cin * c * 9 + c * c * 9 + 4 * c

    option_a = 3 * 16 * 9 + 32
    option_a += 3 * block(16, 16)
    option_a += block(16, 32) + 2 * block(32, 32)
    option_a += block(32, 64) + 2 * block(64, 64)
    option_a += 64 * 10 + 10
    assert n_params(build_model("resnet20")) == option_a == 269_722
    projections = 16 * 32 + 64 + 32 * 64 + 128
    assert n_params(build_model("resnet20_projection")) == option_a + projections


@pytest.mark.parametrize("width", [1.0, 0.25, 0.3])
def test_padding_shortcut_subsamples_and_centres_the_input(width):
    model = build_model("resnet20", width=width).eval()
    block = model.layer2[0]  # the block that halves the resolution and widens
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    out = block.shortcut(x)
    c_in, c_out = x.shape[1], block.conv1.out_channels
    lo = (c_out - c_in) // 2
    assert out.shape == (2, c_out, 4, 4)
    assert torch.equal(out[:, lo : lo + c_in], x[:, :, ::2, ::2])
    assert out[:, :lo].abs().sum() == 0 and out[:, lo + c_in :].abs().sum() == 0


@pytest.mark.parametrize(
    ("name", "count", "gamma"),
    [
        ("resnet18", 20, 1.0),
        ("resnet20", 19, 1.0),  # option A: no shortcut BatchNorms
        ("resnet20_projection", 21, 1.0),
        ("vgg11", 8, 0.5),  # the Early-Bird code starts gamma at 0.5
        ("vgg11_adaptive", 8, 1.0),
    ],
)
def test_batchnorms_are_plain_batchnorm2d(name, count, gamma):
    bns = [
        m
        for m in build_model(name, width=0.25).modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    assert len(bns) == count
    assert all(type(m) is nn.BatchNorm2d for m in bns)
    assert all(torch.equal(m.weight, torch.full_like(m.weight, gamma)) for m in bns)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_adaptive"])
def test_kaiming_fan_out_init(name):
    torch.manual_seed(0)
    conv = [m for m in build_model(name, width=0.5).features if isinstance(m, nn.Conv2d)][-1]
    assert isinstance(conv, nn.Conv2d)
    expected = math.sqrt(2 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="resnet18, resnet20, resnet20_projection, vgg11"):
        build_model("resnet50")


@pytest.mark.parametrize("width", [0, -1.0, "1"])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", width=width)
