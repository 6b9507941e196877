"""Data loading: the fake set, the IDX reader, batching, errors, and real Fashion-MNIST when installed."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import common

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_fake_dataset_is_structured():
    data = common.load_dataset("fake", image_size=32)
    assert data.images.dtype == torch.uint8 and data.images.shape == (1024, 1, 32, 32)
    assert data.num_classes == 10 and set(data.labels.tolist()) == set(range(10))
    # Not noise: images of one class are far more alike than images of different classes.
    x = common.to_float(data.images).flatten(1)
    same = torch.cdist(x[data.labels == 0], x[data.labels == 0]).mean()
    other = torch.cdist(x[data.labels == 0], x[data.labels == 7]).mean()
    assert same < 0.6 * other


def test_batches_are_in_range_and_resume_exactly():
    data = common.load_dataset("fake")
    a = common.Batches(data, 100, seed=5)
    seen = [a.next() for _ in range(25)]  # crosses two epoch boundaries (10 batches per epoch)
    assert a.epoch == 2
    x, y = seen[0]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64
    b = common.Batches(data, 100, seed=5, position=13)
    for i in range(13, 25):
        xb, yb = b.next()
        assert torch.equal(xb, seen[i][0]) and torch.equal(yb, seen[i][1])
    with pytest.raises(common.UsageError, match="larger than the dataset"):
        common.Batches(data, 5000, seed=0)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_in_data_root_are_read(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    folder.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (50, 28, 28))
    labels = np.arange(50) % 10
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    data = common.load_dataset("fashion-mnist", tmp_path, image_size=32)
    assert data.images.shape == (50, 1, 32, 32)
    assert data.labels.tolist() == labels.tolist()
    native = common.load_dataset("fashion-mnist", tmp_path)
    assert torch.equal(native.images[:, 0], torch.from_numpy(imgs.astype(np.uint8)))


def test_unknown_and_missing_datasets_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(common.UsageError, match="unknown dataset"):
        common.load_dataset("imagenet", tmp_path)
    import torchvision.datasets as tvd

    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(tvd.MNIST, "download", offline)  # FashionMNIST inherits it
    monkeypatch.setattr(common, "SYSTEM_DATA", tmp_path / "nowhere")
    with pytest.raises(common.UsageError) as e:
        common.load_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(e.value)
    assert "dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist package")
def test_real_fashion_mnist_loads(tmp_path):
    data = common.load_dataset("fashion-mnist", tmp_path)  # an empty data root: found in /usr/share/datasets
    assert data.images.shape == (60000, 1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.labels).tolist() == [6000] * 10
    test = common.load_dataset("fashion-mnist", tmp_path, train=False)
    assert len(test) == 10000
    x = common.to_float(data.images[:1000])
    assert -1 <= x.min() < -0.99 and 0.99 < x.max() <= 1


def test_stl10_trains_on_its_unlabelled_images_and_evaluates_on_its_test_split(tmp_path, monkeypatch):
    """STL-10 as the SNGAN authors used it: training data = the 100k unlabelled + 5k labelled training images
    (torchvision's "train+unlabeled"), with no classes (the unlabelled ones have label -1, which would index out
    of a class embedding), and the labelled test split for evaluation. Catches the loader training on the 13k
    labelled images only, or passing the -1 labels on. torchvision's STL10 is replaced by a stand-in that
    records the asked split (the real archive is 2.6 GB and cannot be fetched here)."""
    import torchvision.datasets as tvd
    asked = []

    class FakeSTL10:
        def __init__(self, root, split, download=False):
            asked.append(split)
            n = {"train+unlabeled": 30, "test": 8}[split]
            self.data = np.random.default_rng(0).integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
            self.labels = np.full(n, -1) if split == "train+unlabeled" else np.arange(n) % 10
    monkeypatch.setattr(tvd, "STL10", FakeSTL10)
    train = common.load_dataset("stl10", tmp_path)
    test = common.load_dataset("stl10", tmp_path, train=False)
    assert asked == ["train+unlabeled", "test"]
    assert train.images.shape == (30, 3, 48, 48) and train.num_classes == 1 and train.labels.min() >= 0
    assert test.num_classes == 10 and test.labels.tolist() == [i % 10 for i in range(8)]
