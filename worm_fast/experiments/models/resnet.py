"""CIFAR-style ResNets (3x3 stem, no max-pool).

ResNet-18 follows the Early-Bird / kuangliu layout (BasicBlock, [2, 2, 2, 2], widths
64-128-256-512) with projection (1x1 conv + BN) shortcuts where the shape changes.
ResNet-20 is He et al.'s CIFAR net ([3, 3, 3], widths 16-32-64) with their option-A
shortcuts: where the shape changes, the input is subsampled and zero-padded with new
channels, so the shortcut has no parameters and no BatchNorm (19 BatchNorm layers, not
21). ``resnet20_projection`` is the variant with projection shortcuts, whose every
residual connection torch-pruning can trace for channel removal.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._width import check_width, scaled

SHORTCUTS = ("projection", "padding")


class PaddingShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride``, zero-pad the new channels evenly."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"a padding shortcut cannot drop channels ({in_planes} -> {planes})")
        self.stride = stride
        self.pad = ((planes - in_planes) // 2, planes - in_planes - (planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "padding":
            self.shortcut = PaddingShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, one stage of BasicBlocks per entry of ``blocks``, global pool, linear.

    Stage ``i`` has ``widths[i]`` channels (times ``width``); every stage after the
    first halves the resolution. Stages are the attributes ``layer1``, ``layer2``, ...
    ``shortcut`` is how a block whose shape changes adds its input: ``projection``
    (1x1 conv + BN) or ``padding`` (He et al.'s parameter-free option A).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        shortcut: str = "projection",
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(
                f"blocks and widths need one entry per stage, got {len(blocks)} and {len(widths)}"
            )
        width = check_width(width)
        planes = [scaled(w, width) for w in widths]
        self.num_stages = len(blocks)
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        in_planes = planes[0]
        for i, (count, out_planes) in enumerate(zip(blocks, planes, strict=True)):
            stage = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(in_planes, out_planes, stride, shortcut))
                in_planes = out_planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            out = stage(out)
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _init_weights(model: nn.Module) -> None:
    # torchvision's ResNet initialization; the linear layer keeps PyTorch's default.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet18(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    return CifarResNet(
        [2, 2, 2, 2], [64, 128, 256, 512],
        num_classes=num_classes, in_channels=in_channels, width=width,
    )  # fmt: skip


def resnet20(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """He et al.'s CIFAR ResNet-20 (option-A shortcuts), as the paper names it."""
    return CifarResNet(
        [3, 3, 3], [16, 32, 64],
        num_classes=num_classes, in_channels=in_channels, width=width, shortcut="padding",
    )  # fmt: skip


def resnet20_projection(
    *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> CifarResNet:
    """ResNet-20 with projection shortcuts (this project's ResNet-20 until 2026-12)."""
    return CifarResNet(
        [3, 3, 3], [16, 32, 64], num_classes=num_classes, in_channels=in_channels, width=width
    )
