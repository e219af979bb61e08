"""Datasets, the non-IID client partition, and the backdoor trigger.

- ``load_dataset`` returns a whole dataset as normalised in-memory tensors. ``digits`` (scikit-learn's 1,797 8x8
  images) is embedded and needs no files; ``mnist``, ``fmnist``, ``cifar10`` and ``cinic10`` are read from their
  real on-disk formats in the layout torchvision writes (torchvision itself is not needed), and are fetched with
  the standard library only when ``download=True``. FashionMNIST is also found where Debian and Ubuntu install it
  (``apt-get install dataset-fashion-mnist``), and its decompressed content is checked against the original files.
- ``training_subset`` keeps a seeded, class-stratified part of a training set (the laptop scale of run.py).
- ``dirichlet_partition`` splits the training set over clients as FedREDefense sec. 5.1.1 and its official code do.
- ``trigger_pixels`` / ``add_trigger`` give the 4-pixel backdoor trigger of the Scaling and DBA attacks (App. A.2).

Facts about the FedREDefense authors' code (github.com/xyq7/FedREDefense) are cited as "code sec. N".
"""
import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fl

DATASETS = ("digits", "mnist", "fmnist", "cifar10", "cinic10")

# Per-channel (mean, std) of the normalisation, as in the official code (code sec. 5): it uses the MNIST
# statistics for FashionMNIST too. `digits` is normalised with its own training-set statistics instead.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cinic10": ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
}

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# What `download=True` fetches: (url, md5 or None where no checksum is published) per dataset. The file keeps the
# URL's base name. The idx files are stored gzipped in the raw folder; the archives are kept next to what they
# extract to, as torchvision does.
SOURCES = {
    "mnist": [
        (_MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (_MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (_MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "fmnist": [
        (_FMNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (_FMNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        (_FMNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        (_FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "cifar10": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
    "cinic10": [("https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz", None)],
}

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_FOLDER = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_HINT = "pass --download to fetch them, or --data-dir to point elsewhere"

# Where an operating-system package installs a dataset's original idx files (gzipped), and the package's name.
SYSTEM_COPIES = {"fmnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist")}

# (bytes, md5) of the original idx files, decompressed. The content is checked rather than the archive: Debian
# recompressed the .gz files, so their md5s differ from the upstream archives' in SOURCES. MNIST's content is
# checked by its idx header only (its decompressed md5s are not published beside the archives).
CONTENT = {"fmnist": {
    "train-images-idx3-ubyte": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
}}


class DataError(fl.UserError):
    """A dataset that cannot be loaded or fetched; the message is one user-facing line."""


@dataclass
class Dataset:
    """A whole dataset in memory: images float32 [N, C, H, W], already normalised; labels int64 [N]."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_dataset(name, data_dir="data", download=False, seed=0):
    """The dataset ``name`` (one of DATASETS), reading its files under ``data_dir``.

    ``download=True`` first fetches whatever files are missing. ``seed`` only matters for ``digits``, the one
    dataset without an official test split; the others use their official test sets (FedREDefense sec. 5.1.1).
    """
    if name == "digits":
        return load_digits_dataset(seed)
    if name in IDX_FOLDER:
        return load_idx_dataset(name, data_dir, download)
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    if name == "cinic10":
        return load_cinic10(data_dir, download)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------

def normalise(x_uint8, name):
    """ToTensor + Normalize as the official code does (code sec. 5): x / 255, then (x - mean) / std per channel."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALISATION[name])
    return (x_uint8.float() / 255 - mean) / std


def load_digits_dataset(seed):
    """scikit-learn's digits (1,797 real 8x8 images, values 0..16), the small embedded default.

    Scaled to [0, 1], split 75/25 stratified by class with ``seed``, then normalised with the training set's
    scalar mean and (population) std, so the training images have mean 0 and std 1.
    """
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)
    mean, std = x_train.mean(), x_train.std()
    return Dataset("digits", torch.from_numpy((x_train - mean) / std).unsqueeze(1),
                   torch.from_numpy(y_train).long(), torch.from_numpy((x_test - mean) / std).unsqueeze(1),
                   torch.from_numpy(y_test).long(), 10)


def read_bytes(path):
    """The content of ``path``, decompressed if it ends in .gz; a truncated or corrupt file is a DataError."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return f.read()
    except EOFError:
        raise DataError(f"{path} is truncated (its gzip stream ends early)") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())})") from None


def check_content(raw, path, expected):
    """``raw`` (a file's decompressed bytes) against the original's (bytes, md5), where known."""
    if expected is None:
        return
    size, md5 = expected
    if len(raw) != size:
        raise DataError(f"{path} holds {len(raw)} bytes decompressed where the original holds {size} (truncated or "
                        f"another file)")
    got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if got != md5:
        raise DataError(f"{path} is corrupted: its content has md5 {got} where the original's is {md5}")


def read_idx(path, magic, expected=None):
    """The array in an idx file (plain or .gz): a big-endian uint32 magic (0x803 images, 0x801 labels), one
    big-endian uint32 per dimension, then the uint8 data. ``expected``: the original's (bytes, md5) to check."""
    raw = read_bytes(path)
    check_content(raw, path, expected)
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an idx file with magic {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(dims):
        raise DataError(f"{path} holds {data.size} values where its header announces {dims}")
    return torch.from_numpy(data.reshape(dims).copy())


def idx_path(folder, stem):
    """``stem`` in ``folder``, plain if that exists, else gzipped if that exists, else None."""
    for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
        if os.path.exists(path):
            return path
    return None


def idx_folders(name, data_dir):
    """Where MNIST or FashionMNIST is looked for, in order: torchvision's layout ``<data_dir>/<Folder>/raw``,
    ``data_dir`` itself (the four files directly in it), then the operating system's copy, if the dataset has one."""
    system = [SYSTEM_COPIES[name][0]] if name in SYSTEM_COPIES else []
    return [os.path.join(data_dir, IDX_FOLDER[name], "raw"), data_dir] + system


def load_idx_dataset(name, data_dir, download):
    """MNIST or FashionMNIST from the first of ``idx_folders`` that holds all four idx files (plain or .gz).

    ``download=True`` fetches whatever is missing into torchvision's layout when no folder is complete. Both are
    normalised with the MNIST statistics (0.1307, 0.3081): the official code uses them for FashionMNIST too
    (code sec. 5).
    """
    folders = idx_folders(name, data_dir)
    complete = lambda folder: all(idx_path(folder, stem) for stem in IDX_FILES)
    if download and not any(map(complete, folders)):
        with removed_on_failure(folders[0]):
            for url, md5 in SOURCES[name]:
                if idx_path(folders[0], os.path.basename(url).removesuffix(".gz")) is None:
                    fetch(name, url, md5, os.path.join(folders[0], os.path.basename(url)))
    folder = next(filter(complete, folders), None)
    if folder is None:
        missing = next(stem for stem in IDX_FILES if idx_path(folders[0], stem) is None)
        install = (f"install them with 'apt-get install {SYSTEM_COPIES[name][1]}', "
                   if name in SYSTEM_COPIES else "")
        raise DataError(f"{name}: expected {IDX_FOLDER[name]} idx files in {' or '.join(folders)} (missing "
                        f"{missing}[.gz]); {install}{_HINT}")
    try:
        x_train, y_train, x_test, y_test = (
            read_idx(idx_path(folder, stem), 0x803 if "images" in stem else 0x801, CONTENT.get(name, {}).get(stem))
            for stem in IDX_FILES)
    except DataError as e:
        fix = (f"reinstall it with 'apt-get install --reinstall {SYSTEM_COPIES[name][1]}'"
               if name in SYSTEM_COPIES and folder == SYSTEM_COPIES[name][0] else
               "delete it and pass --download, or point --data-dir at a good copy")
        raise DataError(f"{name}: {e}; {fix}") from None
    return Dataset(name, normalise(x_train.unsqueeze(1), name), y_train.long(),
                   normalise(x_test.unsqueeze(1), name), y_test.long(), 10)


def read_cifar_batch(path):
    """Images uint8 [n, 3, 32, 32] and labels of one CIFAR-10 python pickle (keys b"data" and b"labels")."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return x, torch.tensor(batch[b"labels"], dtype=torch.int64)


def load_cifar10(data_dir, download):
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python version, data_batch_1..5 and test_batch)."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    paths = [os.path.join(folder, f) for f in CIFAR_FILES]
    if download and not all(map(os.path.exists, paths)):
        fetch_archive("cifar10", data_dir, folder)
    if not all(map(os.path.exists, paths)):
        raise DataError(f"cifar10: expected the CIFAR-10 python batches {', '.join(CIFAR_FILES)} in {folder} "
                        f"({_HINT})")
    train = [read_cifar_batch(p) for p in paths[:-1]]
    x_test, y_test = read_cifar_batch(paths[-1])
    return Dataset("cifar10", normalise(torch.cat([x for x, _ in train]), "cifar10"),
                   torch.cat([y for _, y in train]), normalise(x_test, "cifar10"), y_test, 10)


def read_image_folder(folder, classes):
    """Images uint8 [n, 3, H, W] and labels of an ImageFolder tree: ``folder/<class>/*.png`` with label = the
    class's index in ``classes``; files in sorted order, converted to RGB."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(folder, cls))):
            if file.lower().endswith(".png"):
                with Image.open(os.path.join(folder, cls, file)) as im:
                    images.append(np.asarray(im.convert("RGB")))
                labels.append(label)
    if not images:
        raise DataError(f"no .png images in the class folders of {folder}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)


def class_folders(folder):
    """The sorted names of the sub-folders of ``folder`` (the ImageFolder classes)."""
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def load_cinic10(data_dir, download):
    """CINIC-10 from the image folders ``<data_dir>/cinic-10/{train,test}/<class>/*.png`` (the official code reads
    them with ImageFolder: classes are the sorted folder names). The valid split is not used, as in the official
    code (code sec. 5)."""
    root = os.path.join(data_dir, "cinic-10")
    splits = [os.path.join(root, s) for s in ("train", "test")]
    if download and not all(os.path.isdir(s) for s in splits):
        fetch_archive("cinic10", data_dir, root)
    if not all(os.path.isdir(s) for s in splits):
        raise DataError(f"cinic10: expected CINIC-10 image folders {splits[0]} and {splits[1]} ({_HINT})")
    classes = class_folders(splits[0])
    if class_folders(splits[1]) != classes:
        raise DataError(f"cinic10: {splits[0]} and {splits[1]} have different class folders")
    (x_train, y_train), (x_test, y_test) = (read_image_folder(s, classes) for s in splits)
    return Dataset("cinic10", normalise(x_train, "cinic10"), y_train, normalise(x_test, "cinic10"), y_test,
                   len(classes))


def training_subset(ds, size, seed):
    """``ds`` with only ``size`` of its training images: a seeded subset stratified by class (every class keeps its
    share, scikit-learn's ``train_test_split``), in dataset order; the test set stays whole. None keeps them all."""
    if size is None or size >= len(ds.y_train):
        return ds
    keep, _ = train_test_split(np.arange(len(ds.y_train)), train_size=size, stratify=ds.y_train.numpy(),
                               random_state=seed)
    keep = torch.from_numpy(np.sort(keep))
    return dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])


# ---------------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------------

def md5sum(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def removed_on_failure(folder):
    """Around a download into ``folder``: if it fails, the folders it created for it (``folder`` and any missing
    parents) are removed again, so a failed download leaves nothing behind."""
    created = None
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def fetch(name, url, md5, path):
    """Download ``url`` to ``path`` atomically: into a temporary file in the same folder, check the md5 (where
    known), then rename into place, so that a failure never leaves a partial file behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".download-")
    os.close(fd)
    try:
        print(f"downloading {url}", flush=True)
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(f"{name}: download of {url} failed ({' '.join(str(e).split())})") from None
        got = md5sum(tmp) if md5 is not None else None
        if got != md5:
            raise DataError(f"{name}: {url} has md5 {got}, expected {md5}; the download was discarded")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_archive(name, data_dir, target):
    """Make ``target`` complete from the dataset's .tar.gz (downloaded into ``data_dir`` unless already there).

    The archive is extracted (tarfile's "data" filter) into a temporary folder; its content root is its single
    top-level folder if it has one (CIFAR-10's cifar-10-batches-py), else the extraction folder itself (CINIC-10's
    train/valid/test). Only the entries ``target`` lacks are moved in, so nothing already there is overwritten and
    an interrupted extraction leaves no half-filled folder.
    """
    url, md5 = SOURCES[name][0]
    archive = os.path.join(data_dir, os.path.basename(url))
    if not os.path.exists(archive):
        with removed_on_failure(data_dir):
            fetch(name, url, md5, archive)
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=".extract-")
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{name}: cannot extract {archive} ({' '.join(str(e).split())})") from None
        entries = os.listdir(tmp)
        content = os.path.join(tmp, entries[0]) if len(entries) == 1 and os.path.isdir(
            os.path.join(tmp, entries[0])) else tmp
        os.makedirs(target, exist_ok=True)
        for entry in os.listdir(content):
            if not os.path.exists(os.path.join(target, entry)):
                os.replace(os.path.join(content, entry), os.path.join(target, entry))
    finally:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Non-IID partition
# ---------------------------------------------------------------------------------------------------------------

def dirichlet_partition(labels, n_clients, beta, seed):
    """Split the sample indices over ``n_clients`` clients with the Dirichlet non-IID scheme (sec. 5.1.1).

    The paper only says the training samples are distributed "according to the Dirichlet distribution" with
    parameter beta (smaller = more non-IID; default 0.1). The official code (code sec. 5, "Partition") draws, per
    class c, a row Q[c, :] ~ Dir(beta * 1_{n_clients}), then alternately normalises the columns and the rows of Q
    1000 times (Sinkhorn balancing), which makes every client's total share near-equal while keeping each class's
    skew; class c's indices, in dataset order, are then cut at floor(cumsum(Q[c, :-1]) * |c|) and client i gets
    the i-th piece of every class. We follow the official code, with a ``np.random.default_rng(seed)`` generator.
    One guard it lacks: for tiny beta a client's Dirichlet shares can all underflow to 0, a column sum of 0 that
    would turn Q into NaN; such a column is left at 0 (that client gets no data).

    Returns one sorted int64 index tensor per client; every index appears exactly once.
    """
    labels = np.asarray(labels)
    if not beta > 0:
        raise ValueError(f"the Dirichlet parameter beta must be > 0, got {beta}")
    if not 1 <= n_clients <= len(labels):
        raise ValueError(f"n_clients must be between 1 and the number of samples ({len(labels)}), got {n_clients}")
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(n_clients, float(beta)), size=int(labels.max()) + 1)
    for _ in range(1000):
        columns = q.sum(0, keepdims=True)
        q /= np.where(columns > 0, columns, 1)
        q /= q.sum(1, keepdims=True)
    parts = [[] for _ in range(n_clients)]
    for c, shares in enumerate(q):
        idx = np.flatnonzero(labels == c)
        for client, piece in enumerate(np.split(idx, (np.cumsum(shares[:-1]) * len(idx)).astype(int))):
            parts[client].append(piece)
    return [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in parts]


def partition_summary(labels, parts, num_classes):
    """Per client: its number of samples, of classes present, and its per-class counts."""
    labels = torch.as_tensor(labels)
    summary = []
    for part in parts:
        counts = torch.bincount(labels[part], minlength=num_classes)
        summary.append({"samples": len(part), "classes": int((counts > 0).sum()), "class_counts": counts.tolist()})
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Backdoor trigger
# ---------------------------------------------------------------------------------------------------------------

def trigger_pixels(image_size):
    """The 4 (row, col) trigger pixels of the Scaling/DBA backdoor (App. A.2; the positions are in code sec. 3).

    The official code sets (26,26), (24,26), (26,24), (25,25) (three corners and the centre of the 3x3 block at
    rows/cols 24-26) on both 28x28 and 32x32 images. We generalise with the anchor a = min(image_size, 28) - 2:
    [(a,a), (a-2,a), (a,a-2), (a-1,a-1)], which gives exactly those pixels at 28 and 32 px, and (6,6), (4,6),
    (6,4), (5,5) on 8x8 digits. DBA gives client ``cid`` the single pixel ``pixels[cid % 4]``. The paper's CNN never
    reads rows and columns 26-27 of 28x28 images; ``attacks.visible_trigger`` moves the pattern where it does.
    """
    if image_size < 4:
        raise ValueError(f"the trigger needs images of at least 4x4 pixels, got {image_size}")
    a = min(image_size, 28) - 2
    return [(a, a), (a - 2, a), (a, a - 2), (a - 1, a - 1)]


def add_trigger(x, pixels, value=1.0):
    """A copy of the images ``x`` [..., C, H, W] with channel 0 set to ``value`` at ``pixels``.

    The official code writes 1.0 after normalisation (code sec. 3), so ``value`` is in normalised space; on
    colour images only channel 0 (red) changes. ``x`` itself is never modified.
    """
    rows, cols = zip(*pixels)
    x = x.clone()
    x[..., 0, list(rows), list(cols)] = value
    return x
