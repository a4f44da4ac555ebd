"""VGG-11 with BatchNorm for 32x32 inputs.

``vgg11`` is the Early-Bird code's (``models/vgg.py`` of GATECH-EIC/Early-Bird-Tickets, the
model the paper's VGG-11 results come from): four 2x2 max-pools bring a 32x32 input to
2x2, a 2x2 average pool to 1x1; BatchNorm γ starts at 0.5 (the network-slimming
convention, so the γ magnitudes that the search ranks start away from their upper end).
``vgg11_adaptive`` is this project's earlier variant: five max-pools, an adaptive average
pool (any input of at least 32x32) and torchvision's initialization (γ = 1).
"""

from collections.abc import Sequence

import torch
from torch import nn

from ._width import check_width, scaled

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
VGG11_ADAPTIVE_CFG: tuple[int | str, ...] = (*VGG11_CFG, "M")


class VGG(nn.Module):
    """``features`` (conv-BN-ReLU and max-pools per ``cfg``), average pool, one linear.

    ``pool``: a fixed 2x2 average pool (``"avg2"``, the Early-Bird code) or an adaptive one
    to 1x1 (``"adaptive"``); ``bn_gamma``: the initial BatchNorm weight.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG11_CFG,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        pool: str = "avg2",
        bn_gamma: float = 0.5,
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
        if pool not in ("avg2", "adaptive"):
            raise ValueError(f"pool must be 'avg2' or 'adaptive', got {pool!r}")
        self.avgpool = nn.AvgPool2d(2) if pool == "avg2" else nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights(bn_gamma)

    def _init_weights(self, bn_gamma: float) -> None:
        # Convs: normal with std sqrt(2 / (k * k * out_channels)), as both the Early-Bird
        # code and torchvision (kaiming, fan_out) draw them; the linear layer N(0, 0.01).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, bn_gamma)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """The Early-Bird code's VGG-11 (BatchNorm), for 32x32 inputs."""
    return VGG(VGG11_CFG, num_classes=num_classes, in_channels=in_channels, width=width)


def vgg11_adaptive(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG-11 (BatchNorm) with five max-pools, an adaptive pool and torchvision's init."""
    return VGG(
        VGG11_ADAPTIVE_CFG, num_classes=num_classes, in_channels=in_channels, width=width,
        pool="adaptive", bn_gamma=1.0,
    )  # fmt: skip
