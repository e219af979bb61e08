"""Shared test set-up. Makes the flat modules at the repository root importable, whatever the working directory."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import fl  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is far faster (and immune to a busy machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def genuine_round(n_clients, n_updates):
    """Round 0 on digits (n_clients clients, beta 0.1): the model, w^0, the dataset, and the genuine updates and
    data sizes of clients 0 .. n_updates - 1."""
    torch.manual_seed(0)
    ds = data.load_dataset("digits")
    parts = data.dirichlet_partition(ds.y_train, n_clients, 0.1, 0)
    model = fl.CNN(1, 8, 10)
    w = fl.flatten_params(model)
    g = torch.Generator().manual_seed(0)
    updates = torch.stack([fl.local_update(model, w, ds.x_train[parts[c]], ds.y_train[parts[c]],
                                           fl.LOCAL_LR["digits"], g) for c in range(n_updates)])
    return model, w, ds, updates, torch.tensor([len(parts[c]) for c in range(n_updates)])


@pytest.fixture
def small_detection(monkeypatch):
    """Digits' detection settings shrunk so that a 2-3 round run reaches every part of every detection baseline:
    FLDetector detects (window 1, no cold start) and restarts, Auror clusters after 1 round, FLCert has 3 groups."""
    import baselines
    monkeypatch.setitem(baselines.DETECTION_HYPER, "digits", {
        "fldetector_window": 1, "fldetector_cold_start": 0, "flcert_groups": 3, "auror_warmup": 1,
        "auror_alpha": 0.01})


@pytest.fixture(scope="session")
def digits_round():
    """25 clients, the updates of clients 0-3: (model, w^0, updates, sizes)."""
    model, w, _, updates, sizes = genuine_round(25, 4)
    return model, w, updates, sizes


@pytest.fixture(scope="session")
def digits_round_of_10():
    """10 clients (FedDefuse's participants a round on digits), all their updates: (model, w^0, dataset, updates)."""
    return genuine_round(10, 10)[:4]


if "PYTEST_XDIST_WORKER" in os.environ:  # pytest -n: one intra-op thread per worker, or they fight over the cores
    torch.set_num_threads(1)
