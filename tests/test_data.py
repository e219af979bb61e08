"""Tests of data.py: the loaders on tiny files in the real on-disk formats, downloads through file:// URLs,
the Dirichlet partition, and the backdoor trigger."""
import gzip
import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

IDX_STEMS = data.IDX_FILES


@pytest.fixture(autouse=True)
def no_system_copy(tmp_path_factory, monkeypatch):
    """These tests run on files they write: the operating system's FashionMNIST copy, if installed, is hidden."""
    monkeypatch.setitem(data.SYSTEM_COPIES, "fmnist",
                        (str(tmp_path_factory.mktemp("system") / "fashion-mnist"), "dataset-fashion-mnist"))


@pytest.fixture
def fake_fmnist(monkeypatch):
    """Tiny FashionMNIST files pass: the check of the original content is off."""
    monkeypatch.delitem(data.CONTENT, "fmnist")


# ---------------------------------------------------------------------------------------------------------------
# Writers of the real formats
# ---------------------------------------------------------------------------------------------------------------

def write_idx(path, array):
    """An idx file (gzipped if ``path`` ends in .gz) holding the uint8 ``array`` (3-d images or 1-d labels)."""
    header = struct.pack(">I", 0x803 if array.ndim == 3 else 0x801) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def idx_arrays(seed):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }


def write_cifar(folder, seed=0):
    """Tiny CIFAR-10 python batches (2 images each) in ``folder``; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in data.CIFAR_FILES:
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 2)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        batches[name] = (x, y)
    return batches


def write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def leftovers(folder):
    """Temporary download/extraction entries left anywhere under ``folder``."""
    return [p for p in Path(folder).rglob("*") if p.name.startswith((".download-", ".extract-"))]


# ---------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------

def test_digits_shapes_and_train_normalisation():
    d = data.load_dataset("digits")
    assert d.name == "digits" and d.num_classes == 10
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64 and d.y_test.dtype == torch.int64
    assert abs(d.x_train.mean().item()) < 1e-4
    assert abs(d.x_train.std(correction=0).item() - 1) < 1e-4
    # the pixel values 0..16 map to the same 17 levels in both splits
    assert torch.unique(d.x_train).numel() == 17
    assert torch.allclose(torch.unique(d.x_test), torch.unique(d.x_train))


def test_digits_split_is_stratified_and_seeded():
    a, b, c = data.load_dataset("digits", seed=0), data.load_dataset("digits", seed=0), data.load_dataset(
        "digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    train_share = torch.bincount(a.y_train, minlength=10) / len(a.y_train)
    test_share = torch.bincount(a.y_test, minlength=10) / len(a.y_test)
    assert (train_share - test_share).abs().max() < 0.01


# ---------------------------------------------------------------------------------------------------------------
# Loaders on the real formats
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fmnist", "FashionMNIST")])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_loader(tmp_path, name, folder, suffix, fake_fmnist):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    arrays = idx_arrays(0)
    for stem, array in arrays.items():
        write_idx(raw / (stem + suffix), array)
    d = data.load_dataset(name, data_dir=str(tmp_path))
    assert d.num_classes == 10 and d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(d.x_train[:, 0], expected, atol=1e-6)
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_idx_plain_and_gz_mixed_and_plain_preferred(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    plain, other = idx_arrays(0), idx_arrays(1)
    for i, (stem, array) in enumerate(plain.items()):
        write_idx(raw / (stem + ("" if i % 2 else ".gz")), array)
    write_idx(raw / "train-labels-idx1-ubyte.gz", other["train-labels-idx1-ubyte"])  # beside the plain one
    d = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert d.y_train.tolist() == plain["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.tolist() == plain["t10k-labels-idx1-ubyte"].tolist()


def write_idx_files(folder, arrays, suffix=".gz"):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + suffix), array)


@pytest.mark.parametrize("where", ["data_dir", "system"])
def test_fmnist_is_found_in_data_dir_itself_and_in_the_system_copy(tmp_path, where, fake_fmnist):
    arrays = idx_arrays(0)
    folder = tmp_path / "files" if where == "data_dir" else Path(data.SYSTEM_COPIES["fmnist"][0])
    write_idx_files(folder, arrays)
    d = data.load_dataset("fmnist", data_dir=str(tmp_path / "files" if where == "data_dir" else tmp_path / "none"))
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fmnist_torchvision_layout_comes_before_the_system_copy(tmp_path, fake_fmnist):
    write_idx_files(Path(data.SYSTEM_COPIES["fmnist"][0]), idx_arrays(1))
    write_idx_files(tmp_path / "FashionMNIST" / "raw", idx_arrays(0))
    d = data.load_dataset("fmnist", data_dir=str(tmp_path))
    assert d.y_test.tolist() == idx_arrays(0)["t10k-labels-idx1-ubyte"].tolist()


def test_fmnist_content_is_checked_against_the_original(tmp_path):
    write_idx_files(tmp_path / "FashionMNIST" / "raw", idx_arrays(0))
    with pytest.raises(data.DataError) as error:
        data.load_dataset("fmnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message
    assert f"holds {16 + 6 * 28 * 28} bytes decompressed where the original holds 47040016" in message
    assert "--download" in message


def test_fmnist_content_md5_mismatch_names_the_file(tmp_path, monkeypatch):
    arrays = idx_arrays(0)
    write_idx_files(tmp_path, arrays, suffix="")
    sizes = {stem: (tmp_path / stem).stat().st_size for stem in IDX_STEMS}
    monkeypatch.setitem(data.CONTENT, "fmnist", {stem: (sizes[stem], md5(tmp_path / stem)) for stem in IDX_STEMS})
    assert data.load_dataset("fmnist", data_dir=str(tmp_path)).x_train.shape == (6, 1, 28, 28)
    arrays["t10k-images-idx3-ubyte"][0, 0, 0] ^= 1  # one bit of one pixel
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte is corrupted: its content has md5"):
        data.load_dataset("fmnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("damage,reason", [
    (lambda raw: raw[:len(raw) // 2], "is truncated"),
    (lambda raw: b"\x1f\x8b" + bytes(len(raw) - 2), "cannot be read"),
])
def test_truncated_or_corrupt_gzip_is_a_one_line_data_error(tmp_path, damage, reason):
    write_idx_files(tmp_path / "MNIST" / "raw", {**idx_arrays(0), "train-images-idx3-ubyte": np.zeros(
        (300, 28, 28), dtype=np.uint8) + np.arange(28, dtype=np.uint8)})
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(data.DataError, match=reason) as error:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_idx_bad_magic_is_a_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, array in idx_arrays(0).items():
        write_idx(raw / stem, array)
    write_idx(raw / "train-labels-idx1-ubyte", idx_arrays(0)["train-images-idx3-ubyte"])  # images where labels go
    with pytest.raises(data.DataError, match="magic"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_cifar10_loader(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    d = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32) and d.num_classes == 10
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert d.y_test.tolist() == batches["test_batch"][1] and d.y_train.dtype == torch.int64
    raw = torch.from_numpy(batches["data_batch_1"][0][0]).view(3, 32, 32).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(d.x_train[0], (raw - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-6)


def test_cinic10_loader(tmp_path):
    root = tmp_path / "cinic-10"
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    for split in ("train", "test"):
        write_png(root / split / "truck" / "b.png", colour, "RGB")
        write_png(root / split / "airplane" / "a.png", grey, "L")  # converted to RGB
        write_png(root / split / "airplane" / "c.png", colour, "RGB")
    (root / "train" / "airplane" / "notes.txt").write_text("not an image")
    d = data.load_dataset("cinic10", data_dir=str(tmp_path))
    assert d.x_train.shape == (3, 3, 32, 32) and d.num_classes == 2
    assert d.y_train.tolist() == [0, 0, 1] and d.y_test.tolist() == [0, 0, 1]  # sorted class names, sorted files
    mean = torch.tensor([0.47889522, 0.47227842, 0.43047404]).view(3, 1, 1)
    std = torch.tensor([0.24205776, 0.23828046, 0.25874835]).view(3, 1, 1)
    pixels = d.x_train * std + mean
    assert torch.allclose(pixels[0], torch.from_numpy(grey).float().div(255).expand(3, 32, 32), atol=1e-6)
    assert torch.allclose(pixels[2], torch.from_numpy(colour).float().div(255).permute(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("name,path", [
    ("mnist", os.path.join("MNIST", "raw")),
    ("fmnist", os.path.join("FashionMNIST", "raw")),
    ("cifar10", "cifar-10-batches-py"),
    ("cinic10", os.path.join("cinic-10", "train")),
])
def test_missing_files_name_the_path_and_the_flag(tmp_path, name, path):
    with pytest.raises(data.DataError) as error:
        data.load_dataset(name, data_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(name + ":") and str(tmp_path / path) in message and "--download" in message
    assert "\n" not in message and "--data-dir" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fmnist")
    assert list(tmp_path.iterdir()) == []  # nothing created without --download


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(data.DataError, match="digits"):
        data.load_dataset("imagenet")


# ---------------------------------------------------------------------------------------------------------------
# Downloads through file:// URLs
# ---------------------------------------------------------------------------------------------------------------

def serve_idx(tmp_path, arrays):
    """Gzipped idx files in a 'server' folder and the matching SOURCES entry of file:// URLs."""
    server = tmp_path / "server"
    server.mkdir()
    sources = []
    for stem, array in arrays.items():
        write_idx(server / (stem + ".gz"), array)
        sources.append(((server / (stem + ".gz")).as_uri(), md5(server / (stem + ".gz"))))
    return sources


def test_download_idx_fetches_only_what_is_missing(tmp_path, monkeypatch, fake_fmnist):
    arrays = idx_arrays(0)
    sources = serve_idx(tmp_path, arrays)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"])  # already there
    sources[3] = ((tmp_path / "nowhere" / "t10k-labels-idx1-ubyte.gz").as_uri(), None)  # fetching it would fail
    monkeypatch.setitem(data.SOURCES, "fmnist", sources)
    d = data.load_dataset("fmnist", data_dir=str(tmp_path / "data"), download=True)
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["t10k-labels-idx1-ubyte"] + [s + ".gz" for s in IDX_STEMS[:3]])
    # a second load finds everything and downloads nothing
    monkeypatch.setitem(data.SOURCES, "fmnist", [])
    assert torch.equal(data.load_dataset("fmnist", data_dir=str(tmp_path / "data"), download=True).x_test, d.x_test)


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    sources = serve_idx(tmp_path, idx_arrays(0))
    sources[0] = (sources[0][0], "0" * 32)
    monkeypatch.setitem(data.SOURCES, "mnist", sources)
    with pytest.raises(data.DataError, match="md5") as error:
        data.load_dataset("mnist", data_dir=str(tmp_path / "data"), download=True)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "data").exists()  # the folders made for the download are gone too


def test_download_failure_is_a_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SOURCES, "mnist", [((tmp_path / "nowhere.gz").as_uri(), None)])
    (tmp_path / "data").mkdir()
    with pytest.raises(data.DataError, match="download of .* failed") as error:
        data.load_dataset("mnist", data_dir=str(tmp_path / "data"), download=True)
    assert "\n" not in str(error.value) and list((tmp_path / "data").iterdir()) == []


def test_failed_archive_download_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SOURCES, "cifar10", [((tmp_path / "nowhere.tar.gz").as_uri(), None)])
    with pytest.raises(data.DataError, match="download of .* failed"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "data" / "sub"), download=True)
    assert list(tmp_path.iterdir()) == []


def make_tar(path, folder, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)


def test_download_cifar_archive(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    make_tar(archive, tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setitem(data.SOURCES, "cifar10", [(archive.as_uri(), md5(archive))])
    target = tmp_path / "data"
    d = data.load_dataset("cifar10", data_dir=str(target), download=True)
    assert d.y_test.tolist() == batches["test_batch"][1]
    assert (target / "cifar-10-python.tar.gz").exists() and leftovers(target) == []
    assert sorted(p.name for p in (target / "cifar-10-batches-py").iterdir()) == sorted(data.CIFAR_FILES)


def test_download_cifar_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_tar(archive, tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setitem(data.SOURCES, "cifar10", [(archive.as_uri(), "f" * 32)])
    (tmp_path / "data").mkdir()
    with pytest.raises(data.DataError, match="md5"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "data"), download=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_cinic_archive_without_wrapper_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    for split in ("train", "valid", "test"):
        write_png(src / split / "cat" / "x.png", pixels, "RGB")
    (src / "README.md").write_text("CINIC-10")
    archive = tmp_path / "CINIC-10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in ("train", "valid", "test", "README.md"):
            tar.add(src / entry, arcname=entry)
    monkeypatch.setitem(data.SOURCES, "cinic10", [(archive.as_uri(), None)])
    d = data.load_dataset("cinic10", data_dir=str(tmp_path / "data"), download=True)
    assert d.x_train.shape == (1, 3, 32, 32) and d.y_test.tolist() == [0]
    assert (tmp_path / "data" / "cinic-10" / "valid" / "cat" / "x.png").exists()
    assert leftovers(tmp_path / "data") == []


# ---------------------------------------------------------------------------------------------------------------
# Training subset (the laptop scale)
# ---------------------------------------------------------------------------------------------------------------

def test_training_subset_keeps_each_class_share_and_is_seeded():
    d = data.load_dataset("digits")
    sub = data.training_subset(d, 674, seed=3)  # half of the 1,347 training images
    counts, full = torch.bincount(sub.y_train, minlength=10), torch.bincount(d.y_train, minlength=10)
    assert len(sub.y_train) == 674 and (counts - full / 2).abs().max() <= 1
    rows = [next(i for i in range(len(d.y_train)) if torch.equal(d.x_train[i], x)) for x in sub.x_train[:20]]
    assert rows == sorted(rows) and all(d.y_train[r] == y for r, y in zip(rows, sub.y_train[:20]))
    assert torch.equal(data.training_subset(d, 674, seed=3).x_train, sub.x_train)
    assert not torch.equal(data.training_subset(d, 674, seed=4).x_train, sub.x_train)
    assert torch.equal(sub.x_test, d.x_test) and data.training_subset(d, None, 0) is d


# ---------------------------------------------------------------------------------------------------------------
# Dirichlet partition
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_labels():
    return data.load_dataset("digits").y_train


def test_partition_covers_every_index_once(digit_labels):
    parts = data.dirichlet_partition(digit_labels, 10, 0.1, seed=0)
    assert len(parts) == 10
    assert all(p.dtype == torch.int64 and torch.equal(p, p.sort().values) for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(digit_labels)))


def test_partition_is_seeded(digit_labels):
    a = data.dirichlet_partition(digit_labels, 10, 0.1, seed=3)
    b = data.dirichlet_partition(digit_labels, 10, 0.1, seed=3)
    c = data.dirichlet_partition(digit_labels, 10, 0.1, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def mean_classes(labels, beta):
    summary = data.partition_summary(labels, data.dirichlet_partition(labels, 10, beta, seed=0), 10)
    return np.mean([s["classes"] for s in summary])


def test_smaller_beta_is_more_non_iid(digit_labels):
    assert mean_classes(digit_labels, 0.05) < 5 < mean_classes(digit_labels, 100) == 10


@pytest.mark.parametrize("beta", [0.05, 0.1, 100])
def test_sinkhorn_balancing_gives_near_equal_sizes(digit_labels, beta):
    sizes = torch.tensor([len(p) for p in data.dirichlet_partition(digit_labels, 10, beta, seed=0)])
    # the floor cuts move at most one sample per class and client away from the balanced share
    assert (sizes - len(digit_labels) / 10).abs().max() <= 10


def test_tiny_beta_still_partitions(digit_labels):
    parts = data.dirichlet_partition(digit_labels, 100, 1e-3, seed=0)  # some clients' shares underflow to 0
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(digit_labels)))


@pytest.mark.parametrize("n_clients,beta", [(10, 0), (10, -1.0), (0, 0.1), (5, float("nan"))])
def test_partition_rejects_bad_arguments(n_clients, beta):
    with pytest.raises(ValueError):
        data.dirichlet_partition(torch.arange(4) % 2, n_clients, beta, seed=0)


def test_partition_rejects_more_clients_than_samples():
    with pytest.raises(ValueError, match="n_clients"):
        data.dirichlet_partition(torch.arange(4) % 2, 5, 0.1, seed=0)


def test_partition_summary_counts():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    parts = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([], dtype=torch.int64)]
    assert data.partition_summary(labels, parts, 4) == [
        {"samples": 3, "classes": 2, "class_counts": [1, 2, 0, 0]},
        {"samples": 3, "classes": 1, "class_counts": [0, 0, 3, 0]},
        {"samples": 0, "classes": 0, "class_counts": [0, 0, 0, 0]},
    ]


# ---------------------------------------------------------------------------------------------------------------
# Backdoor trigger
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [28, 32])
def test_trigger_pixels_are_the_official_ones(size):
    assert data.trigger_pixels(size) == [(26, 26), (24, 26), (26, 24), (25, 25)]


def test_trigger_pixels_on_digits():
    assert data.trigger_pixels(8) == [(6, 6), (4, 6), (6, 4), (5, 5)]
    with pytest.raises(ValueError):
        data.trigger_pixels(3)


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (5, 3, 32, 32), (5, 1, 8, 8)])
def test_add_trigger_sets_four_pixels_of_channel_0(shape):
    x = torch.randn(shape)
    original = x.clone()
    pixels = data.trigger_pixels(shape[-1])
    y = data.add_trigger(x, pixels)
    assert torch.equal(x, original)  # not in place
    changed = (y != x).nonzero()
    assert set(changed[:, 1].tolist()) == {0}
    assert {(r, c) for r, c in changed[:, 2:].tolist()} == set(pixels)
    assert len(changed) == 4 * shape[0]
    assert all(y[n, 0, r, c] == 1.0 for n in range(shape[0]) for r, c in pixels)
    assert torch.equal(data.add_trigger(y, pixels), y)  # idempotent


def test_add_trigger_single_pixel_and_value():
    x = torch.zeros(2, 3, 32, 32)
    y = data.add_trigger(x, [data.trigger_pixels(32)[1]], value=-2.5)  # a DBA client's pattern
    assert (y != 0).sum() == 2 and torch.all(y[:, 0, 24, 26] == -2.5)
