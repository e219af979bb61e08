"""Tests on the real FashionMNIST, as Debian and Ubuntu install it (``apt-get install dataset-fashion-mnist``).

The expected values come from the dataset's publication and the original files, not from data.py: 60,000 training
and 10,000 test images of 28x28, 6,000 and 1,000 per class, training pixels on [0, 1] with mean 0.2860 and std
0.3530, and the md5s of the four decompressed idx files. Without the package these tests skip, except under
``CI=true``, where a missing package fails them: CI installs it (.ci/run).
"""
import dataclasses
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import fedredefense
import feddefuse
import run

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = Path("/usr/share/datasets/fashion-mnist")
ORIGINAL_MD5 = {  # the decompressed upstream files
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.fixture(scope="module")
def system_copy():
    if not all((SYSTEM / f"{stem}.gz").exists() for stem in ORIGINAL_MD5):
        reason = f"FashionMNIST is not installed in {SYSTEM} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI installs it")
        pytest.skip(reason)
    return SYSTEM


@pytest.fixture(scope="module")
def raw(system_copy):
    """The decompressed bytes of the four files, read with gzip alone."""
    return {stem: gzip.decompress((system_copy / f"{stem}.gz").read_bytes()) for stem in ORIGINAL_MD5}


@pytest.fixture(scope="module")
def fmnist(system_copy):
    return data.load_dataset("fmnist", data_dir="/nonexistent")


def test_the_system_copy_is_the_original(raw):
    assert {stem: hashlib.md5(content).hexdigest() for stem, content in raw.items()} == ORIGINAL_MD5


def test_shapes_classes_and_pixel_statistics(fmnist, raw):
    assert fmnist.x_train.shape == (60000, 1, 28, 28) and fmnist.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(fmnist.y_train).tolist() == [6000] * 10
    assert torch.bincount(fmnist.y_test).tolist() == [1000] * 10
    pixels = np.frombuffer(raw["train-images-idx3-ubyte"], dtype=np.uint8, offset=16)
    mean = pixels.mean(dtype=np.float64)
    std = np.sqrt((pixels.astype(np.float32) ** 2).mean(dtype=np.float64) - mean ** 2)
    assert round(mean / 255, 4) == 0.2860 and round(std / 255, 4) == 0.3530
    # what the loader returns is those pixels / 255, normalised with the MNIST statistics (the official code's)
    first = torch.from_numpy(pixels[:1000 * 784].astype(np.float32)) / 255
    assert torch.allclose(fmnist.x_train[:1000].flatten() * 0.3081 + 0.1307, first, atol=1e-6)
    labels = np.frombuffer(raw["t10k-labels-idx1-ubyte"], dtype=np.uint8, offset=8)
    assert fmnist.y_test.tolist() == labels.tolist()


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_a_copy_in_data_dir_is_read(tmp_path, fmnist, system_copy, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ORIGINAL_MD5:
        (folder / f"{stem}.gz").symlink_to(system_copy / f"{stem}.gz")
    assert torch.equal(data.load_dataset("fmnist", data_dir=str(tmp_path)).x_test, fmnist.x_test)


def corrupt_copy(tmp_path, system_copy, damage):
    """A torchvision-layout copy in tmp_path/data whose train-images is ``damage``(its .gz bytes)."""
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for stem in ORIGINAL_MD5:
        source = system_copy / f"{stem}.gz"
        if stem == "train-images-idx3-ubyte":
            (folder / source.name).write_bytes(damage(source.read_bytes()))
        else:
            (folder / source.name).symlink_to(source)
    return folder / "train-images-idx3-ubyte.gz"


def flip_one_pixel(gz):
    content = bytearray(gzip.decompress(gz))
    content[1000] ^= 0x10
    return gzip.compress(bytes(content), compresslevel=1)


@pytest.mark.parametrize("damage,reason", [
    (lambda gz: gz[:len(gz) // 3], "is truncated"),
    (lambda gz: gzip.compress(gzip.decompress(gz)[:-784], compresslevel=1), "bytes decompressed where the original"),
    (flip_one_pixel, "is corrupted: its content has md5"),
])
def test_a_damaged_file_is_named_in_one_line(tmp_path, system_copy, damage, reason):
    path = corrupt_copy(tmp_path, system_copy, damage)
    with pytest.raises(data.DataError) as error:
        data.load_dataset("fmnist", data_dir=str(tmp_path / "data"))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and reason in message and "--download" in message


def test_run_py_on_a_damaged_file_exits_2_and_writes_nothing(tmp_path, system_copy):
    path = corrupt_copy(tmp_path, system_copy, lambda gz: gz[:len(gz) // 3])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "--dataset", "fmnist", "--data-dir", str(tmp_path / "data"),
                           "--defense", "fedavg", "--attack", "none", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr and "is truncated" in proc.stderr
    assert not out.exists()


def short_run(tmp_path, *flags):
    """One in-process FashionMNIST run at a tiny scale; its results.json."""
    out = tmp_path / "out"
    run.main(["--dataset", "fmnist", "--data-dir", str(tmp_path / "none"), "--out", str(out), *flags])
    return json.loads((out / "results.json").read_text())


def finite(value):
    return value is None or math.isfinite(value)


def test_fedavg_runs_at_the_laptop_client_size(tmp_path, system_copy):
    results = short_run(tmp_path, "--defense", "fedavg", "--attack", "none", "--clients", "4", "--rounds", "1")
    assert results["config"]["train_size"] == 2400  # 4 clients of the paper's 600 images
    assert sum(p["samples"] for p in results["partition"]) == 2400
    assert 0.1 < results["final"]["tacc"] < 1 and all(map(finite, results["final"].values()))


def test_fedredefense_runs_with_a_small_cap(tmp_path, system_copy, monkeypatch):
    monkeypatch.setitem(fedredefense.HYPER, "fmnist",
                        dataclasses.replace(fedredefense.HYPER["fmnist"], first_iters=3, max_iters=3))
    results = short_run(tmp_path, "--defense", "fedredefense", "--attack", "fang", "--clients", "4",
                        "--rounds", "1")
    (record,) = results["rounds"]
    assert len(record["errors"]) == 4 and all(map(math.isfinite, record["errors"].values()))
    assert all(1 <= i <= 4 for i in record["iterations"].values())  # the cap of 3 outer steps, then the last check
    assert all(map(finite, results["final"].values()))


def test_fedredefense_runs_as_the_authors_code_runs(tmp_path, system_copy, monkeypatch):
    """--model convnet --fedredefense-settings official: the authors' ConvNet (317,706 parameters on FashionMNIST)
    and their FashionMNIST script's settings (the caps shrunk to 3), recorded in results.json."""
    small = dataclasses.replace(fedredefense.OFFICIAL_HYPER["fmnist"], first_iters=3, max_iters=3)
    monkeypatch.setitem(fedredefense.OFFICIAL_HYPER, "fmnist", small)
    results = short_run(tmp_path, "--defense", "fedredefense", "--attack", "fang", "--clients", "4", "--rounds", "1",
                        "--model", "convnet", "--fedredefense-settings", "official")
    assert results["config"]["model"] == "convnet" and results["config"]["fedredefense_settings"] == "official"
    checkpoint = run.load_checkpoint(str(tmp_path / "out"), "cpu")
    assert checkpoint["defense"].hp == small and len(checkpoint["w"]) == 317_706
    (record,) = results["rounds"]
    assert len(record["errors"]) == 4 and all(map(math.isfinite, record["errors"].values()))
    assert all(1 <= i <= 4 for i in record["iterations"].values())
    assert all(map(finite, results["final"].values()))


def test_feddefuse_runs_under_its_own_threat_model(tmp_path, system_copy, monkeypatch):
    monkeypatch.setitem(feddefuse.HYPER, "fmnist", dataclasses.replace(feddefuse.HYPER["fmnist"], surrogate_iters=5))
    results = short_run(tmp_path, "--defense", "feddefuse", "--attack", "scaling", "--clients", "6",
                        "--participants", "5", "--rounds", "2")
    assert results["config"]["model"] == "mlp" and results["config"]["sampling"] == "capped"
    assert all(len(r["participants"]) == 5 and r["attacking"] for r in results["rounds"])
    assert all(map(finite, results["final"].values()))
