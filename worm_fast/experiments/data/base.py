"""What every dataset shares: its description, seeded subsets and seeded loaders."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they must be; the message says what to put where."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset's samples."""

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]  # (height, width) of the tensors the dataset yields
    mean: tuple[float, ...]  # per-channel normalization applied to every image
    std: tuple[float, ...]


def random_subset(dataset: Dataset, size: int | None, *, seed: int, what: str) -> Dataset:
    """``size`` samples drawn without replacement, the same ones for the same seed.

    ``None`` returns ``dataset`` itself. The indices are sorted, so the subset keeps the
    dataset's order and only the loader decides the order of a pass.
    """
    if size is None:
        return dataset
    total = len(dataset)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= total:
        raise ValueError(f"{what} must be an int in [1, {total}] or None, got {size!r}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(total, generator=generator)[:size].sort().values
    return Subset(dataset, indices.tolist())


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader whose batch order depends only on ``seed``.

    The loader owns a seeded generator, so two loaders built with the same seed yield the
    same batches, epoch after epoch. With workers, each worker's torch seed derives from
    that generator too, so random augmentation is reproducible as well; in the main
    process (``num_workers=0``) augmentation draws from the global torch RNG.
    ``collate_fn`` turns a list of samples into a batch (e.g. padding token sequences).
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        collate_fn=collate_fn,
    )
