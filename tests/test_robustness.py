"""Never crash, never poison the global model, never lose a finished round.

- A fault-injection matrix: every defense of run.py x every strange round, called the way the round loop calls it.
- Checkpoints: a run stopped after any round, or while writing its checkpoint, resumes to the same results.json;
  an --out folder holding another run's results is refused.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import attacks
import fedredefense
import feddefuse
import fl
import run

TINY = ["--clients", "6", "--malicious", "2", "--rounds", "3"]
FAULTS = ("zero", "huge", "overflow", "single", "identical", "all-malicious")


def faulty_round(fault, updates):
    """(updates, malicious, the row of the faulty update or None) for one fault."""
    n, d = updates.shape
    benign, last = torch.zeros(n, dtype=torch.bool), torch.arange(n) == n - 1  # the faulty client counts as malicious
    if fault == "zero":
        return torch.cat([updates[:-1], torch.zeros(1, d)]), last, n - 1
    if fault in ("huge", "overflow"):  # norm 1e12, or 1e20 (finite entries, but its squared norm overflows float32)
        spike = torch.randn(d, generator=torch.Generator().manual_seed(0))
        norm = 1e12 if fault == "huge" else 1e20
        return torch.cat([updates[:-1], norm * spike[None] / spike.norm()]), last, n - 1
    if fault == "single":
        return updates[:1], benign[:1], None
    if fault == "identical":
        return updates[:1].repeat(2, 1), benign[:2], None
    crafted = attacks.fang(updates, n, torch.Generator().manual_seed(1))  # every participant attacks
    return crafted, torch.ones(n, dtype=torch.bool), None


@pytest.fixture
def small_budgets(monkeypatch, small_detection):
    """FedREDefense's reconstruction budget cut and the detection settings shrunk (``small_detection``), so that
    a few digits rounds run every part of every defense in seconds. FedDefuse keeps its own budgets: with a
    3-iteration surrogate its split goes wrong and it accepts the 1e12 update."""
    monkeypatch.setitem(fedredefense.HYPER, "digits", fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, 3, 3))


# Published rules that let the spike move the global model in its first round, pinned as they are (README,
# "Strange updates"): FoolsGold and FedCPA judge directions only, then average (FedCPA's first-round reference is
# the round's own mean, so it stops the spike from round 2 on); FLDetector has no history yet to predict from;
# RFA's 4 smoothed-Weiszfeld iterations stop far from the geometric median (the 1e20 update they weight 0);
# FedDMC's float64 PCA keeps nothing of the benign updates beside a 1e20 one, so its tree flags everybody and
# its fallback admits all.
ADMITS = {"huge": ("rfa", "fldetector", "foolsgold", "fedcpa"),
          "overflow": ("fldetector", "foolsgold", "fedcpa", "feddmc")}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("defense_name", run.DEFENSES)
def test_every_defense_survives_every_fault(defense_name, fault, digits_round_of_10, small_budgets, tmp_path):
    """Two rounds of the fault on a 10-client round (state carried over, as in the loop): no exception, a finite
    aggregate of the global model's shape (the zero update being the explicit "no update this round") and an
    accepted mask over the round where the defense decides per client. The 1e12- and 1e20-norm updates: every
    defense but FedAvg and those ``ADMITS`` pins keeps the aggregate bounded, and every one of them that decides
    per client rejects it, except FLTrust, which rescales each update to its root update's norm and so may accept
    it harmlessly. The all-zero update is harmless and several rules accept it (Krum picks it: it is the update
    closest to its neighbours), so only survival is asked of it. Non-finite updates never reach a defense (run.py
    rejects them first; test_run). Budgets are cut (``small_budgets``): the verdicts on genuine updates do not
    matter here.
    """
    model, w, ds, updates = digits_round_of_10
    args = run.parse_args(["--clients", "10", "--malicious", "3", "--defense", defense_name, "--out", str(tmp_path)])
    defense = run.make_defense(args, model, ds, ds.x_train, ds.y_train, w, "cpu")
    rows, malicious, faulty = faulty_round(fault, updates)
    clients = list(range(len(rows)))
    w_global = w if getattr(defense, "groups", None) is None else w.repeat(defense.n_groups, 1)
    sizes = torch.full((len(rows),), 50)
    for t in range(2):
        decision = defense(rows.clone(), fl.Round(t, clients, w_global, sizes, malicious))
        assert decision.update.shape == w_global.shape and torch.isfinite(decision.update).all()
        if decision.accepted is not None:
            assert decision.accepted.shape == (len(rows),)
        if fault not in ADMITS or defense_name == "fedavg":
            continue
        if defense_name in ADMITS[fault] and not (defense_name == "fedcpa" and t > 0):  # FedCPA: round 1 only
            assert t > 0 or decision.update.norm() > 1e3  # pinned: admitted in round 1
            continue
        assert decision.update.norm() < 1e3
        if decision.accepted is not None and defense_name != "fltrust":
            assert not decision.accepted[faulty], f"{defense_name} accepted the {fault} update"


def test_a_nan_in_one_clients_reconstruction_flags_it_and_leaves_the_others_alone(digits_round_of_10):
    """An optimisation that produces NaN (here: a NaN learning rate in one client's K) fails that client only:
    it is flagged, and the other clients' errors, K and iterations equal a round reconstructed without it."""
    model, w, _, updates = digits_round_of_10
    hp = dataclasses.replace(fedredefense.HYPER["digits"], first_iters=30, max_iters=30)
    k0 = fedredefense.initial_knowledge((1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    k = fedredefense.Knowledge.stack([k0] * 3)
    k.alpha[1] = float("nan")
    caps = torch.full((3,), 30)
    errors, learned, iterations = fedredefense.reconstruct(model, w, updates[:3], k, caps, hp)
    clean, learned_clean, iterations_clean = fedredefense.reconstruct(
        model, w, updates[[0, 2]], fedredefense.Knowledge.stack([k0] * 2), caps[:2], hp)
    assert not errors[1] <= hp.gamma and iterations[1] == 1  # failed at its first evaluation: flagged
    assert torch.equal(errors[[0, 2]], clean) and torch.equal(iterations[[0, 2]], iterations_clean)
    assert torch.equal(learned.images[[0, 2]], learned_clean.images)


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# -----------------------------------------------------------------------------------------------------------------

def timeless(results):
    """results.json without its timings."""
    return {**results, "seconds": 0, "rounds": [{**r, "seconds": 0} for r in results["rounds"]]}


def results_of(out):
    return timeless(json.loads((out / "results.json").read_text()))


class Stop(Exception):
    pass


@pytest.mark.parametrize("defense", run.DEFENSES)
def test_same_command_same_results_even_when_stopped_and_resumed(defense, small_budgets, monkeypatch, tmp_path):
    """For every defense: a run stopped right after round 1's checkpoint (an injected stop) and continued with
    ``--resume`` writes the same results.json as the same command run through (4 of 6 clients a round, so the
    sampler's state must resume too). Round 1 is computed afresh by both: this is also the same-seed-same-results
    check."""
    monkeypatch.setitem(feddefuse.HYPER, "digits", feddefuse.Hyper(surrogate_iters=10, sim_steps=2))  # any budget
    monkeypatch.setattr(run, "plot", lambda results, path: open(path, "wb").close())  # results.json is compared
    argv = TINY + ["--rounds", "2", "--participants", "4", "--defense", defense, "--attack", "scaling"]
    run.main(argv + ["--out", str(tmp_path / "whole")])
    save = run.save_checkpoint
    def stop_after_round_1(out, state):
        save(out, state)
        if len(state["rounds"]) == 1:
            raise Stop
    monkeypatch.setattr(run, "save_checkpoint", stop_after_round_1)
    with pytest.raises(Stop):
        run.main(argv + ["--out", str(tmp_path / "stopped")])
    assert not (tmp_path / "stopped" / "results.json").exists()
    monkeypatch.setattr(run, "save_checkpoint", save)
    run.main(["--resume", str(tmp_path / "stopped")])
    whole, resumed = results_of(tmp_path / "whole"), results_of(tmp_path / "stopped")
    assert resumed["config"]["out"] == str(tmp_path / "stopped")
    assert resumed == {**whole, "config": {**whole["config"], "out": str(tmp_path / "stopped")}}


def test_a_run_killed_while_writing_its_checkpoint_resumes_from_the_round_before(monkeypatch, tmp_path):
    """A crash half-way through writing round 2's checkpoint leaves round 1's intact (written atomically) and no
    half-written file; the same command then resumes from it and reaches the uninterrupted results."""
    argv = TINY + ["--defense", "fltrust", "--attack", "lie"]
    run.main(argv + ["--out", str(tmp_path / "whole")])
    real_save = torch.save
    def crash_on_round_2(state, path):
        if len(state["rounds"]) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise Stop
        real_save(state, path)
    monkeypatch.setattr(torch, "save", crash_on_round_2)
    with pytest.raises(Stop):
        run.main(argv + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(torch, "save", real_save)
    assert len(run.load_checkpoint(str(tmp_path / "killed"), "cpu")["rounds"]) == 1
    assert sorted(os.listdir(tmp_path / "killed")) == [run.CHECKPOINT]  # the half-written one is gone
    run.main(argv + ["--out", str(tmp_path / "killed")])  # the same command resumes
    killed = results_of(tmp_path / "killed")
    assert killed == {**results_of(tmp_path / "whole"), "config": killed["config"]}
    assert (tmp_path / "killed" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_then_resume_gives_the_uninterrupted_results(tmp_path, single_thread):
    """A real process killed with SIGTERM once round 1 is saved, then ``python run.py --resume``; the run it is
    compared with is run here, with the same single thread (bit-for-bit equality needs the same thread count)."""
    argv = [sys.executable, "run.py", "--clients", "6", "--malicious", "2", "--rounds", "4", "--defense",
            "flame", "--attack", "fang"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run.main(argv[2:] + ["--out", str(tmp_path / "whole")])
    killed = tmp_path / "killed"
    process = subprocess.Popen(argv + ["--out", str(killed)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while not (killed / run.CHECKPOINT).exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "run.py", "--resume", str(killed)], cwd=root, env=env, check=True,
                   capture_output=True)
    assert results_of(killed) == {**results_of(tmp_path / "whole"), "config": results_of(killed)["config"]}


def test_an_out_folder_of_another_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(TINY + ["--defense", "median", "--out", out])
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        run.main(TINY + ["--defense", "krum", "--out", out])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in error
    assert "--out" in error and "--defense median there, krum here" in error and "--overwrite" in error
    assert (tmp_path / "run" / "results.json").read_text() == before  # nothing touched
    run.main(TINY + ["--defense", "krum", "--out", out, "--overwrite"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["defense"] == "krum"
    with pytest.raises(SystemExit) as exit_:
        run.main(["--resume", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and "--resume" in capsys.readouterr().err


def test_more_rounds_continue_a_finished_run_and_fewer_are_refused(monkeypatch, tmp_path, capsys):
    """``--resume DIR --rounds 3`` after 2 finished rounds, and the same command with --rounds 4 after that,
    continue from the checkpoint and write what a run through 4 rounds writes; --rounds 3 then is refused."""
    monkeypatch.setattr(run, "plot", lambda results, path: open(path, "wb").close())
    argv = TINY + ["--defense", "flame", "--attack", "lie", "--participants", "4"]  # seeded, and sampled
    run.main(argv + ["--rounds", "4", "--out", str(tmp_path / "whole")])
    extended = str(tmp_path / "extended")
    run.main(argv + ["--rounds", "2", "--out", extended])
    run.main(["--resume", extended, "--rounds", "3"])
    run.main(argv + ["--rounds", "4", "--out", extended])
    assert f"resuming {extended} after round 3" in capsys.readouterr().out
    assert results_of(tmp_path / "extended") == {**results_of(tmp_path / "whole"),
                                                 "config": results_of(tmp_path / "extended")["config"]}
    with pytest.raises(SystemExit) as exit_:
        run.main(argv + ["--rounds", "3", "--out", extended])
    assert exit_.value.code == 2 and "holds 4 rounds of this run already" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="resuming a --device cuda run works here")
def test_resuming_a_cuda_run_without_cuda_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    run.main(TINY + ["--rounds", "1", "--defense", "median", "--out", str(out)])
    checkpoint = run.load_checkpoint(str(out), "cpu")
    torch.save({**checkpoint, "config": {**checkpoint["config"], "device": "cuda"}}, out / run.CHECKPOINT)
    with pytest.raises(SystemExit) as exit_:
        run.main(["--resume", str(out)])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in error and "--resume" in error and "--device cuda" in error
