"""VGG-11 with BatchNorm, CIFAR variant (as in the Early-Bird code).

Five 2x2 max-pools bring a 32x32 input to 1x1; the adaptive average pool makes the
classifier input ``channels x 1 x 1`` for any input size of at least 32x32.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ._width import check_width, scaled

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """``features`` (conv-BN-ReLU and max-pools per ``cfg``), average pool, one linear."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG11_CFG,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ):
        super().__init__()
        width = check_width(width)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = scaled(int(v), width)
            # No conv bias: the BatchNorm that follows makes it redundant.
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialization.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    return VGG(VGG11_CFG, num_classes=num_classes, in_channels=in_channels, width=width)
