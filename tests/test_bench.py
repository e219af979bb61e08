"""bench.py's own quantities on tiny inputs: the matmul speed, the projection formula, the demo's run and one
adaptive attacker's trial (the full benchmark takes many minutes and is run by hand)."""
import dataclasses
import math
import os

import pytest

import bench
import fedredefense as fr
import run


def test_matmul_gflops_is_a_positive_finite_speed():
    speed = bench.matmul_gflops("cpu", size=64, repeat=3)
    assert speed > 0 and math.isfinite(speed)


def test_matmul_gflops_is_the_flops_over_the_median_time(monkeypatch):
    times = iter([0.5, 0.1, 0.3])
    monkeypatch.setattr(bench, "seconds", lambda fn, device: next(times))
    assert bench.matmul_gflops("cpu", size=64, repeat=3) == pytest.approx(2 * 64 * 64 * 64 / 0.3 / 1e9)


@pytest.mark.parametrize("fedavg, clients, malicious, rounds, first, later, total", [
    # 10 + (72 * 95 + 28 * 5001) / 20 = 10 + 146868 / 20; 10 + 72 * 5.1 / 20; first + 499 * later
    (10.0, 100, 28, 500, 7353.4, 28.36, 7353.4 + 14151.64),
    # 2.5 + (18 * 95 + 7 * 5001) / 20 = 2.5 + 36717 / 20; 2.5 + 18 * 5.1 / 20; first + 49 * later
    (2.5, 25, 7, 50, 1838.35, 7.09, 1838.35 + 347.41),
])
def test_projected_run_is_the_formula_by_hand(fedavg, clients, malicious, rounds, first, later, total):
    got = bench.projected_run(fedavg, 20.0, {"first": 95, "crafted": 5001, "later": 5.1}, clients=clients,
                              malicious=malicious, rounds=rounds)
    assert got == pytest.approx((first, later, total))


def test_demo_seconds_runs_the_demo_in_a_folder_it_removes(monkeypatch, capsys, single_thread):
    monkeypatch.setitem(fr.HYPER, "digits", dataclasses.replace(fr.HYPER["digits"], first_iters=3, max_iters=3))
    seen = []
    real_run = run.run
    monkeypatch.setattr(run, "run", lambda args: seen.append(args) or real_run(args))
    took, final = bench.demo_seconds("cpu", ["--rounds", "1", "--clients", "6", "--malicious", "2"])
    (args,) = seen
    assert (args.device, args.rounds, args.clients, args.malicious) == ("cpu", 1, 6, 2)
    assert (args.dataset, args.defense, args.attack) == ("digits", "fedredefense", "fang")
    assert not os.path.exists(args.out)
    assert took > 0 and 0 <= final["dacc"] <= 1 and 0 <= final["fpr"] <= 1
    assert capsys.readouterr().out == ""  # the run's own lines are not the benchmark's


def test_adaptive_trial_fails_at_the_first_participation_cap(single_thread):
    took, iterations = bench.adaptive_trial_seconds("cpu", dataclasses.replace(fr.HYPER["digits"], first_iters=3))
    assert took > 0 and iterations == 4
