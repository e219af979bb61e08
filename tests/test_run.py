"""run.py: the CLI's errors, participant sampling and attack patterns, the metrics, NaN rejection, determinism."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import feddefuse
import fedredefense
import fl
import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--clients", "6", "--malicious", "2", "--rounds", "2"]


@pytest.mark.parametrize("argv, flag", [
    (["--beta", "0"], "--beta"),
    (["--beta", "-1"], "--beta"),
    (["--clients", "1"], "--clients"),
    (["--malicious", "25"], "--malicious"),
    (["--rounds", "0"], "--rounds"),
    (["--participation", "1.5"], "--participation"),
    (["--participants", "0"], "--participants"),
    (["--max-malicious-share", "2"], "--max-malicious-share"),
    (["--attack-prob", "-0.1"], "--attack-prob"),
    (["--attack", "krum"], "--attack"),
    (["--defense", "median"], "--defense"),
    (["--pattern", "IV"], "--pattern"),
    (["--rounds", "two"], "--rounds"),
    (["--attack", "lie", "--malicious", "15", "--participants", "10"], "--attack"),
])
def test_bad_input_gets_one_line_and_exit_code_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run.py: error:") and flag in err


def test_missing_dataset_names_the_path_and_the_flag(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "--dataset", "fmnist", "--data-dir", str(tmp_path / "none"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--download" in proc.stderr and "FashionMNIST" in proc.stderr
    assert not out.exists(), "nothing half-written is left behind"


def test_sampling_caps_the_attackers_and_skips_expelled_clients():
    malicious = set(range(10, 20))
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = run.sample_participants(list(range(20)), malicious, 10, 0.6, rng)
        assert len(chosen) == 10 and len(set(chosen)) == 10
        assert sum(c in malicious for c in chosen) == 6  # attackers first, floor(0.6 * 10) of them
    everyone = run.sample_participants([0, 1, 2, 15, 16], malicious, 10, 0.6, rng)
    assert everyone == [0, 1, 2, 15, 16]  # full participation among the clients not expelled
    assert run.max_attackers(100, 0.28) == 28


def test_attack_patterns():
    is_mal = torch.tensor([False, True, True, True])
    rng = torch.Generator().manual_seed(0)
    assert run.attacking_now("I", 99, is_mal, 50, 0.2, rng).tolist() == is_mal.tolist()
    assert run.attacking_now("II", 49, is_mal, 50, 0.2, rng).tolist() == is_mal.tolist()
    assert not run.attacking_now("II", 50, is_mal, 50, 0.2, rng).any()
    draws = torch.stack([run.attacking_now("III", t, is_mal, 50, 0.2, rng) for t in range(2000)]).float()
    assert draws[:, 0].sum() == 0  # a benign client never attacks
    assert draws[:, 1:].mean().item() == pytest.approx(0.2, abs=0.02)


def test_round_and_final_metrics_hand_computed():
    rounds = [
        {"accepted": [0, 1, 3], "attacking": [3, 4], "mr": 1 / 3, "dacc": 0.8, "fpr": 0.0, "fnr": 0.5,
         "iterations": {"0": 1, "3": 3}},
        {"accepted": [0, 1], "attacking": [], "mr": 0.0, "dacc": 1.0, "fpr": 0.0, "fnr": None, "iterations": None},
    ]
    m = run.round_metrics(torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool),
                          torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool))
    assert m == {"dacc": 3 / 5, "fpr": 1 / 3, "fnr": 1 / 2, "mr": 1 / 3}
    f = run.final_metrics(rounds, 5, {3, 4}, {4}, True, tacc=0.9, asr=None)
    assert f["dacc"] == 4 / 5 and f["fpr"] == 0.0 and f["fnr"] == 1 / 2  # client level: 4 expelled, 3 slipped by
    assert f["aar"] == 1 / 2  # client 3 aggregated once while attacking, client 4 never
    assert f["adacc"] == 0.9 and f["afnr"] == 0.5 and f["mr"] == 1 / 6 and f["mr_zero_rounds"] == 0.5
    assert f["aoi"] == 2.0
    assert run.final_metrics(rounds, 5, {3, 4}, set(), False, 0.9, None)["dacc"] is None


def test_nonfinite_updates_are_rejected_before_anyone_sees_them(monkeypatch, tmp_path):
    genuine = fl.local_update
    def poisoned(model, w, x, y, lr, generator):
        g = genuine(model, w, x, y, lr, generator)
        return torch.full_like(g, float("nan")) if len(x) == len_of_client_0 else g
    seen = []
    def spy(updates, rnd):
        seen.append(torch.isfinite(updates).all().item())
        return run.baselines.fedavg(updates, rnd)
    args = run.parse_args(TINY + ["--attack", "fang", "--defense", "fedavg", "--out", str(tmp_path)])
    parts = run.data.dirichlet_partition(run.data.load_dataset("digits").y_train, 6, 0.1, 0)
    len_of_client_0 = len(parts[0])
    monkeypatch.setattr(fl, "local_update", poisoned)
    monkeypatch.setattr(run, "make_defense", lambda *a: spy)
    results = run.run(args)
    assert all(seen)
    for r in results["rounds"]:
        assert 0 in r["flagged"] and 0 in r["rejected_nonfinite"] and 0 not in r["accepted"]
    assert all(torch.isfinite(torch.tensor(r["tacc"])) for r in results["rounds"])


@pytest.mark.parametrize("defense", ["fedredefense", "feddefuse"])
def test_same_command_same_results(defense, monkeypatch, tmp_path):
    """Reproducibility of a whole run, reconstruction included (small budgets keep it quick)."""
    monkeypatch.setitem(fedredefense.HYPER, "digits",
                        fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, first_iters=20, max_iters=20))
    monkeypatch.setitem(feddefuse.HYPER, "digits", feddefuse.Hyper(surrogate_iters=20, sim_steps=2, alpha=0.3))
    outputs = []
    for name in ("a", "b"):
        run.main(TINY + ["--defense", defense, "--attack", "scaling", "--out", str(tmp_path / name)])
        outputs.append(json.loads((tmp_path / name / "results.json").read_text()))
        assert (tmp_path / name / "results.png").stat().st_size > 0
    strip = lambda r: {**r, "seconds": 0, "rounds": [{**x, "seconds": 0} for x in r["rounds"]],
                       "config": {**r["config"], "out": ""}}
    assert strip(outputs[0]) == strip(outputs[1])
    assert outputs[0]["rounds"][0]["errors"] is not None and outputs[0]["final"]["asr"] is not None


def test_a_round_with_every_client_expelled_keeps_the_model(monkeypatch, tmp_path):
    monkeypatch.setitem(fedredefense.HYPER, "digits",
                        fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, first_iters=1, max_iters=1, gamma=1e-3))
    results = run.run(run.parse_args(TINY + ["--out", str(tmp_path)]))
    first, second = results["rounds"]
    assert len(first["flagged"]) == 6 and second["participants"] == [] and second["tacc"] == first["tacc"]
    assert results["final"]["dacc"] == 2 / 6 and results["final"]["fpr"] == 1.0 and results["final"]["fnr"] == 0.0
