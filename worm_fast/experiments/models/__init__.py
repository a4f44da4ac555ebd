"""CIFAR-style CNNs for the Early-Bird search, built by name; pretrained transformers for
text classification, loaded from local checkpoints (``models.text``)."""

from collections.abc import Callable

from torch import nn

from .resnet import BasicBlock, CifarResNet, resnet18, resnet20, resnet20_projection
from .text import EMBEDDED_MODEL, ModelNotFoundError, load_classifier, load_tokenizer
from .vgg import VGG, VGG11_ADAPTIVE_CFG, VGG11_CFG, vgg11, vgg11_adaptive

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet20_projection": resnet20_projection,
    "vgg11": vgg11,
    "vgg11_adaptive": vgg11_adaptive,
}

# Models whose zero-padding (option-A) shortcuts torch-pruning cannot follow, so their
# tickets are applied as masks only.
NOT_CHANNEL_PRUNABLE = ("resnet20",)


def build_model(
    name: str, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> nn.Module:
    """A freshly initialized model; ``width`` scales every layer's channel count."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(num_classes=num_classes, in_channels=in_channels, width=width)


__all__ = [
    "EMBEDDED_MODEL",
    "MODELS",
    "NOT_CHANNEL_PRUNABLE",
    "VGG",
    "VGG11_ADAPTIVE_CFG",
    "VGG11_CFG",
    "BasicBlock",
    "CifarResNet",
    "ModelNotFoundError",
    "build_model",
    "load_classifier",
    "load_tokenizer",
    "resnet18",
    "resnet20",
    "resnet20_projection",
    "vgg11",
    "vgg11_adaptive",
]
