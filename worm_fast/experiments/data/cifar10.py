"""CIFAR-10 from a local directory in torchvision's format (nothing is downloaded)."""

from pathlib import Path

from torch.utils.data import Dataset

from .base import DatasetInfo, DatasetNotFoundError

FOLDER = "cifar-10-batches-py"
FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta")  # fmt: skip
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
INFO = DatasetInfo("cifar10", 3, 10, (32, 32), MEAN, STD)


def _missing(data_dir, detail: str) -> DatasetNotFoundError:
    where = data_dir if data_dir is not None else "DIR"
    return DatasetNotFoundError(
        f"CIFAR-10 not found: {detail}. Download cifar-10-python.tar.gz from {SOURCE} and "
        f"extract it so that {where}/{FOLDER}/data_batch_1 exists, then pass "
        f"data_dir={where!s} (--data-dir on the command line)"
    )


def _root(data_dir) -> Path:
    """The directory holding ``cifar-10-batches-py``; accepts that folder itself too."""
    if data_dir is None:
        raise _missing(None, "no data directory was given")
    root = Path(data_dir).expanduser()
    if root.name == FOLDER and not (root / FOLDER).is_dir():
        root = root.parent
    missing = [name for name in FILES if not (root / FOLDER / name).is_file()]
    if missing:
        raise _missing(data_dir, f"{root / FOLDER} lacks {', '.join(missing)}")
    return root


def load_cifar10(data_dir) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train set with the standard augmentation (random crop, pad 4; horizontal flip)."""
    # Imported here: the rest of worm_fast (MNIST, text, the CLI) runs without torchvision,
    # e.g. beside a torch for which no matching torchvision build is installed.
    from torchvision import datasets, transforms

    root = _root(data_dir)
    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    try:
        train = datasets.CIFAR10(
            root, train=True, download=False, transform=transforms.Compose(augment + normalize)
        )
        test = datasets.CIFAR10(
            root, train=False, download=False, transform=transforms.Compose(normalize)
        )
    except RuntimeError as error:  # torchvision's MD5 check failed
        raise DatasetNotFoundError(
            f"the CIFAR-10 files in {root / FOLDER} are corrupted ({error}); extract "
            f"cifar-10-python.tar.gz from {SOURCE} again"
        ) from error
    return train, test, INFO
