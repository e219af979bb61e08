"""run.py: the CLI's errors, participant sampling and attack patterns, the metrics, NaN rejection, determinism."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attacks
import fedredefense
import fl
import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--clients", "6", "--malicious", "2", "--rounds", "2"]


def test_missing_dataset_names_the_path_and_the_flag(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--download" in proc.stderr and "MNIST" in proc.stderr
    assert not out.exists(), "nothing half-written is left behind"


def attacker_counts(sampling, draws=3000):
    """Attackers per round when 10 of 20 clients (10 of them malicious) are sampled with A-bar = 0.6."""
    malicious, rng, counts = set(range(10, 20)), torch.Generator().manual_seed(0), []
    for _ in range(draws):
        chosen = run.sample_participants(list(range(20)), malicious, 10, 0.6, rng, sampling)
        assert len(chosen) == 10 and len(set(chosen)) == 10 and chosen == sorted(chosen)
        counts.append(sum(c in malicious for c in chosen))
    return torch.tensor(counts, dtype=torch.float)


def test_sampling_rules_bring_the_attacker_counts_each_paper_describes():
    assert set(attacker_counts("attackers-first", 50).tolist()) == {6}  # floor(0.6 * 10), every round
    capped = attacker_counts("capped")
    assert set(capped.tolist()) == {3, 4, 5, 6}  # uniform on {ceil(6/2), ..., 6}: A-bar is the maximum
    assert capped.mean().item() == pytest.approx((3 + 4 + 5 + 6) / 4, abs=0.06)
    uniform = attacker_counts("uniform")  # hypergeometric: mean 10 * 10/20 = 5, variance 5 * 0.5 * 10/19
    assert uniform.mean().item() == pytest.approx(5.0, abs=0.06)
    assert uniform.var().item() == pytest.approx(10 * 0.5 * 0.5 * 10 / 19, rel=0.1)
    assert uniform.max() > 6  # no cap
    for sampling in run.SAMPLING:  # every available client when the round asks for more, expelled ones never
        chosen = run.sample_participants([0, 1, 2, 15, 16], set(range(10, 20)), 10, 0.6,
                                         torch.Generator().manual_seed(0), sampling)
        assert chosen == [0, 1, 2, 15, 16]
    assert run.max_attackers(100, 0.28) == 28


def test_each_protocol_sets_its_papers_threat_model_and_single_flags_override_it():
    assert [getattr(run.parse_args([]), k) for k in ("protocol", "sampling", "knowledge", "model")] == \
        ["fedredefense", "uniform", "partial", "cnn"]
    assert [getattr(run.parse_args(["--defense", "feddefuse"]), k) for k in ("protocol", "sampling", "knowledge",
                                                                              "model")] == \
        ["feddefuse", "capped", "full", "mlp"]
    a = run.parse_args(["--defense", "fedavg", "--protocol", "feddefuse", "--model", "cnn"])
    assert (a.sampling, a.knowledge, a.model) == ("capped", "full", "cnn")


@pytest.mark.parametrize("argv, clients, malicious, participants, rounds, train_size", [
    ([], 25, 7, 25, 100, 15000),                              # laptop: 25 clients of the papers' 600 images
    (["--defense", "feddefuse"], 25, 7, 10, 100, 15000),      # 10 a round: 3-6 attackers under A-bar = 0.6
    (["--scale", "small"], 10, 3, 10, 50, 6000),
    (["--scale", "small", "--defense", "feddefuse"], 20, 6, 10, 50, 12000),
    (["--scale", "paper"], 100, 28, 100, 500, None),          # FedREDefense sec. 5.1.4: every client, every round
    (["--scale", "paper", "--defense", "feddefuse"], 100, 28, 20, 500, None),
    (["--clients", "100"], 100, 28, 100, 100, None),          # 100 clients of 600 images: the whole training set
])
def test_each_scale_sets_the_clients_rounds_participants_and_training_images(argv, clients, malicious,
                                                                              participants, rounds, train_size):
    a = run.parse_args(["--dataset", "fmnist", *argv])
    assert (a.clients, a.malicious, a.participants, a.rounds, a.train_size) == \
        (clients, malicious, participants, rounds, train_size)


def test_the_scale_line_names_a_scale_only_where_scale_applies():
    assert run.scale_of(run.parse_args(["--dataset", "fmnist"])) == \
        "laptop scale (25 clients, 15,000 training images, 100 rounds)"
    assert run.scale_of(run.parse_args([])) == "digits' one scale (25 clients, all training images, 40 rounds)"


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
    rounds[1]["accepted"].append(3)  # client 3 took part in round 2 without attacking, and was aggregated
    m = run.round_metrics(torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool),
                          torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool))
    assert m == {"dacc": 3 / 5, "fpr": 1 / 3, "fnr": 1 / 2, "mr": 1 / 3}
    f = run.final_metrics(rounds, 5, {3, 4}, {4}, True, tacc=0.9, asr=None)
    assert f["dacc"] == 4 / 5 and f["fpr"] == 0.0 and f["fnr"] == 1 / 2  # client level: 4 expelled, 3 slipped by
    assert f["aar"] == 2 / 2  # App. A.4: client 3 aggregated in both rounds, client 4 never
    assert f["aar_attacking"] == 1 / 2  # client 3 aggregated once while attacking
    assert f["adacc"] == 0.9 and f["afnr"] == 0.5 and f["mr"] == 1 / 6 and f["mr_zero_rounds"] == 0.5
    assert f["aoi"] == 2.0
    assert run.final_metrics(rounds, 5, {3, 4}, set(), False, 0.9, None)["dacc"] is None
    undecided = [{**r, "accepted": None, "mr": None, "dacc": None, "fpr": None, "fnr": None} for r in rounds]
    f = run.final_metrics(undecided, 5, {3, 4}, set(), False, 0.9, None)  # a rule with no per-client decision
    assert f["aar"] is None and f["adacc"] is None and f["mr_zero_rounds"] is None
    assert run.round_metrics(None, torch.tensor([True]))["mr"] is None


def test_nonfinite_updates_are_rejected_before_anyone_sees_them(monkeypatch, tmp_path):
    genuine = fl.local_update
    def poisoned(model, w, x, y, lr, generator):
        g = genuine(model, w, x, y, lr, generator)
        return torch.full_like(g, float("nan")) if len(x) == len_of_client_0 else g
    seen = []
    def spy(updates, rnd):
        seen.append((torch.isfinite(updates).all().item(), len(updates), 0 in rnd.clients))
        return run.baselines.fedavg(updates, rnd)
    args = run.parse_args(TINY + ["--attack", "fang", "--defense", "fedavg", "--out", str(tmp_path)])
    parts = run.data.dirichlet_partition(run.data.load_dataset("digits").y_train, 6, 0.1, 0)
    len_of_client_0 = len(parts[0])
    monkeypatch.setattr(fl, "local_update", poisoned)
    monkeypatch.setattr(run, "make_defense", lambda *a: spy)
    monkeypatch.setattr(run, "save_checkpoint", lambda out, state: None)  # a local spy cannot be pickled
    results = run.run(args)
    assert seen == [(True, 5, False)] * 2  # the defense saw the 5 finite updates only, client 0 not among them
    for r in results["rounds"]:
        assert 0 in r["flagged"] and 0 in r["rejected_nonfinite"] and 0 not in r["accepted"]
        assert r["participants"][-1] == 0 and len(r["accepted"]) == 5


def test_a_defense_that_expels_expels_a_nonfinite_update_too(monkeypatch, tmp_path):
    """Algorithm 1 removes every flagged client for good; a non-finite update is flagged, so its client goes."""
    genuine = fl.local_update
    monkeypatch.setattr(fl, "local_update", lambda model, w, x, y, lr, g: (
        torch.full_like(w, float("inf")) if len(x) == len_of_client_0 else genuine(model, w, x, y, lr, g)))
    monkeypatch.setitem(fedredefense.HYPER, "digits",  # a loose gamma: every finite update passes
                        fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, first_iters=2, max_iters=2, gamma=1e6))
    len_of_client_0 = len(run.data.dirichlet_partition(run.data.load_dataset("digits").y_train, 6, 0.1, 0)[0])
    results = run.run(run.parse_args(TINY + ["--attack", "none", "--out", str(tmp_path)]))
    assert results["expelled"] == [0]
    assert 0 in results["rounds"][0]["participants"] and 0 not in results["rounds"][1]["participants"]


@pytest.mark.parametrize("knowledge", run.KNOWLEDGE)
def test_colluding_attackers_know_what_their_knowledge_level_says(knowledge, monkeypatch, tmp_path):
    """Partial: the genuine updates of every compromised participant, attacking or not; full: every participant's.
    Pattern III leaves rounds with one attacker among several compromised participants: the statistics-based
    attacks then still have >= 2 known updates and never send the zero update (issue: pattern-III bias)."""
    craft, calls = run.attacks.craft, []
    def spy(name, honest, known, **kw):
        out = craft(name, honest, known, **kw)
        calls.append((len(honest), len(known), bool((out == 0).all(dim=1).any())))
        return out
    monkeypatch.setattr(run.attacks, "craft", spy)
    args = ["--clients", "8", "--malicious", "4", "--rounds", "6", "--pattern", "III", "--attack-prob", "0.4",
            "--defense", "fedavg", "--knowledge", knowledge, "--out", str(tmp_path)]
    for attack in ("fang", "lie", "minmax", "minsum"):
        calls.clear()
        run.run(run.parse_args(args + ["--attack", attack]))
        assert calls and any(q == 1 for q, _, _ in calls)  # rounds with a single attacker did happen
        assert all(k == (4 if knowledge == "partial" else 8) for _, k, _ in calls)  # full participation
        assert not any(zero for _, _, zero in calls)


@pytest.mark.parametrize("pattern", ["I", "II", "III"])
def test_a_round_with_every_client_expelled_keeps_the_model(pattern, monkeypatch, tmp_path):
    """Round 2 has no participant left, under every attack pattern (II and III schedule attacks on an empty
    round)."""
    monkeypatch.setitem(fedredefense.HYPER, "digits",
                        fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, first_iters=1, max_iters=1, gamma=1e-3))
    results = run.run(run.parse_args(TINY + ["--pattern", pattern, "--out", str(tmp_path)]))
    first, second = results["rounds"]
    assert len(first["flagged"]) == 6 and second["participants"] == [] and second["tacc"] == first["tacc"]
    assert results["final"]["dacc"] == 2 / 6 and results["final"]["fpr"] == 1.0 and results["final"]["fnr"] == 0.0


class Spy:
    """A defense that records, every round, whether its aggregate was finite and what it accepted; the wrapped
    defense's attributes (``expels``, FLCert's ``groups``) stay visible to the round loop."""

    def __init__(self, defense, log):
        self.defense, self.log = defense, log

    def __getattr__(self, name):  # only called for attributes a Spy lacks (also while it is being deep-copied)
        if name in ("defense", "log"):
            raise AttributeError(name)
        return getattr(self.defense, name)

    def __call__(self, updates, rnd):
        decision = self.defense(updates, rnd)
        self.log.append((torch.isfinite(decision.update).all().item(), decision.accepted))
        return decision


def check_decisions(defense, log):
    """Every aggregate finite (TACC is then computed from a finite model); the rules that select or filter
    report whom they accepted, the others nothing; Krum accepts exactly one update."""
    assert all(finite for finite, _ in log)
    decides = defense in ("krum", "multikrum") + run.baselines.DETECTION and defense != "flcert"
    assert all((accepted is not None) == decides for _, accepted in log)
    if defense == "krum":
        assert all(int(accepted.sum()) == 1 for _, accepted in log)


@pytest.fixture(scope="module")
def attacked_rounds(tmp_path_factory):
    """Round 1 of every attack, as the round loop hands it to a defense: (updates, Round). The adaptive attacker
    faces FedAvg here, which accepts any lambda, so its update is scaled by its search's largest lambda."""
    rounds = {}
    for attack in run.attacks.ATTACKS:
        log = []
        with pytest.MonkeyPatch.context() as m:
            m.setattr(run, "make_defense", lambda *a: Capture(log))
            run.run(run.parse_args(TINY + ["--rounds", "1", "--attack", attack, "--defense", "fedavg",
                                           "--out", str(tmp_path_factory.mktemp(attack))]))
        rounds[attack] = log[0]
    return rounds


class Capture:
    """FedAvg that records what it was handed."""

    def __init__(self, log):
        self.log = log

    def __call__(self, updates, rnd):
        self.log.append((updates.clone(), rnd))
        return run.baselines.fedavg(updates, rnd)


@pytest.mark.parametrize("defense", run.baselines.ROBUST + run.baselines.DETECTION)
def test_every_baseline_survives_every_attack_with_a_finite_model(defense, attacked_rounds, small_detection, tmp_path):
    """Each baseline, built as the round loop builds it, for three rounds of each attack's round 1 (its state
    carried over). FLCert's ensemble in the loop: the next test."""
    ds = run.data.load_dataset("digits")
    model = run.fl.CNN(1, 8, 10)
    for attack, (updates, rnd) in sorted(attacked_rounds.items()):
        args = run.parse_args(TINY + ["--defense", defense, "--attack", attack, "--out", str(tmp_path)])
        rule, log = run.make_defense(args, model, ds, ds.x_train, ds.y_train, rnd.w_global, "cpu"), []
        w_global = rnd.w_global.repeat(rule.n_groups, 1) if defense == "flcert" else rnd.w_global
        for t in range(3):
            decision = rule(updates.clone(), run.fl.Round(t, rnd.clients, w_global, rnd.sizes, rnd.malicious))
            log.append((torch.isfinite(decision.update).all().item(), decision.accepted))
        check_decisions(defense, log)


@pytest.mark.parametrize("attack", ["mpaf", "gaussian", "adaptive-labelflip"])
def test_flcert_survives_the_attacks_that_read_the_global_model_in_the_round_loop(attack, small_detection, monkeypatch,
                                                                                 tmp_path):
    """FLCert's global model is an ensemble [G, d]: MPAF and Gaussian craft from it (one row per attacker), and
    the adaptive attacker tests its update on a copy of the ensemble defense."""
    make, log = run.make_defense, []
    monkeypatch.setattr(run, "make_defense", lambda *a: Spy(make(*a), log))
    run.run(run.parse_args(TINY + ["--rounds", "3", "--defense", "flcert", "--attack", attack, "--out", str(tmp_path)]))
    assert len(log) == 3
    check_decisions("flcert", log)


def test_flcert_clients_train_from_their_groups_model_and_tacc_is_the_groups_vote(monkeypatch, tmp_path):
    """FLCert's ensemble in the round loop: a client starts from its group's row (c mod G), and the TACC printed
    is the plurality vote of the G final models (the mode of their predictions, ties to the smaller label)."""
    monkeypatch.setitem(run.baselines.DETECTION_HYPER, "digits", {**run.baselines.DETECTION_HYPER["digits"],
                                                                  "flcert_groups": 3})
    starts, rounds = [], []
    real_update = run.fl.local_update
    def local_update(model, w, *rest):
        starts.append(w.clone())
        return real_update(model, w, *rest)
    class Recorder(Spy):
        def __call__(self, updates, rnd):
            decision = self.defense(updates, rnd)
            rounds.append((rnd.clients, rnd.w_global.clone(), decision.update.clone()))
            return decision
    make = run.make_defense
    monkeypatch.setattr(run.fl, "local_update", local_update)
    monkeypatch.setattr(run, "make_defense", lambda *a: Recorder(make(*a), []))
    monkeypatch.setattr(run, "save_checkpoint", lambda out, state: None)  # a local class cannot be pickled
    results = run.run(run.parse_args(TINY + ["--defense", "flcert", "--attack", "none", "--out", str(tmp_path)]))

    clients, w_stack, update = rounds[1]
    assert w_stack.shape[0] == 3 and not torch.equal(w_stack[0], w_stack[1])
    second = starts[len(rounds[0][0]):len(rounds[0][0]) + len(clients)]  # in the order the clients' threads ran
    from_group = lambda g: sum(torch.equal(w, w_stack[g]) for w in second)
    assert [from_group(g) for g in range(3)] == [sum(c % 3 == g for c in clients) for g in range(3)]
    final = w_stack + update
    ds = run.data.load_dataset("digits")
    model = fl.CNN(1, 8, 10)
    votes = torch.stack([fl.predict(model, w, ds.x_test) for w in final]).T.tolist()
    mode = lambda v: min(set(v), key=lambda label: (-v.count(label), label))
    vote_accuracy = sum(mode(v) == y for v, y in zip(votes, ds.y_test.tolist())) / len(votes)
    assert results["rounds"][-1]["tacc"] == pytest.approx(vote_accuracy)


def test_a_rule_whose_precondition_fails_falls_back_and_says_so_once():
    said = []
    krum = run.baselines.RobustDefense("krum", 7, warn=said.append)
    updates = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]])
    rnd = fl.Round(0, [0, 1, 2, 3], torch.zeros(2), torch.ones(4), torch.zeros(4, dtype=torch.bool))
    for _ in range(3):
        decision = krum(updates, rnd)  # f = 7 > n - 3 = 1: Krum with f = 1, one neighbour each
        assert decision.accepted.tolist() == [True, False, False, False]
    assert len(said) == 1 and "f = 1" in said[0]
    pair = krum(updates[:2], rnd)  # no neighbours at all: the mean
    assert torch.equal(pair.update, torch.tensor([0.05, 0.0]))
    trmean = run.baselines.RobustDefense("trmean", 7, warn=said.append)(updates, rnd)  # b = 1: drop min and max
    assert torch.allclose(trmean.update, torch.tensor([0.05, 0.05]))


def test_norm_bound_thresholds():
    updates = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 30.0]])  # norms 5, 1, 30
    rnd = fl.Round(0, [0, 1, 2], torch.zeros(2), torch.ones(3), torch.tensor([False, False, True]))
    median = run.baselines.RobustDefense("normbound", 1, "median")(updates, rnd).update  # M = 5
    assert torch.allclose(median, (updates[0] + updates[1] + torch.tensor([0.0, 5.0])) / 3)
    oracle = run.baselines.RobustDefense("normbound", 1, "oracle")(updates, rnd).update  # M = (5 + 1) / 2 = 3
    assert torch.allclose(oracle, (torch.tensor([1.8, 2.4]) + updates[1] + torch.tensor([0.0, 3.0])) / 3)
    fixed = run.baselines.RobustDefense("normbound", 1, 1.0)(updates, rnd).update
    assert torch.allclose(fixed, (torch.tensor([0.6, 0.8]) + updates[1] + torch.tensor([0.0, 1.0])) / 3)


def test_fang_is_the_attack_on_krum_only_under_full_knowledge_against_krum(monkeypatch, tmp_path):
    """Partial knowledge (FedREDefense's protocol): the trimmed-mean Fang against every rule, as the FedREDefense
    code runs it. Full knowledge: Fang's attack on Krum against Krum and Multi-Krum, its full-knowledge
    trimmed-mean attack against the others."""
    chosen = []
    monkeypatch.setattr(run.attacks, "fang_krum", lambda known, q, f, g, **kw: chosen.append(("krum", f)) or
                        torch.zeros(q, known.shape[1]))
    monkeypatch.setattr(run.attacks, "fang", lambda known, q, g: chosen.append(("trim", None)) or
                        torch.zeros(q, known.shape[1]))
    monkeypatch.setattr(run.attacks, "fang_full", lambda known, q, g, **kw: chosen.append(("full", None)) or
                        torch.zeros(q, known.shape[1]))
    for knowledge in ("partial", "full"):
        for defense in ("krum", "multikrum", "median"):
            chosen.clear()
            f = ["--assumed-malicious", "3"] if defense != "median" else []  # Median reads no f
            run.run(run.parse_args(TINY + ["--defense", defense, "--attack", "fang", *f, "--knowledge", knowledge,
                                           "--out", str(tmp_path / knowledge / defense)]))
            expected = (("trim", None) if knowledge == "partial" else
                        ("krum", 3) if defense != "median" else ("full", None))
            assert chosen == [expected] * 2


def test_adaptive_attackers_record_their_lambda_and_test_on_a_copy_of_the_defense(tmp_path):
    """Algorithm 3 in the round loop: against FedAvg (which accepts everything) every attacker scales by the
    largest lambda, 4.875, recorded per client and round; against a stateful baseline the attacker's trials
    run on a copy, so the defense's own history is what its real rounds made it."""
    results = run.run(run.parse_args(TINY + ["--defense", "fedavg", "--attack", "adaptive-labelflip",
                                             "--out", str(tmp_path)]))
    for r in results["rounds"]:
        assert r["lambda"] == {str(c): 4.875 for c in r["attacking"]} and r["attacking"]

    defense = run.baselines.FoolsGold()
    updates = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    rnd = fl.Round(0, [0, 1, 2, 3], torch.zeros(6), torch.ones(4), torch.tensor([False, False, False, True]))
    passes = attacks.attacker_test(defense, updates, [3], rnd)
    assert passes(updates[3:4]).tolist() == [True]
    assert passes(updates[0:1].clone()).tolist() == [False]  # a copy of client 0's update is its sybil: weight 0
    assert defense.history == {}  # the trials ran on copies


def test_results_record_the_code_version_that_made_them(tmp_path):
    results = run.run(run.parse_args(TINY + ["--rounds", "1", "--defense", "fedavg", "--attack", "none",
                                             "--out", str(tmp_path)]))
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    assert results["version"] == (git.stdout.strip() if git.returncode == 0 else "unknown")


def test_the_model_and_fedredefense_settings_are_part_of_a_runs_identity():
    """Runs that differ in --model or --fedredefense-settings get other default folders and are never taken for each
    other; a config recorded without --fedredefense-settings is a run at Table 7's settings (paper)."""
    argvs = [[], ["--fedredefense-settings", "official"], ["--model", "convnet"]]
    args = [run.parse_args(["--dataset", "fmnist", *argv]) for argv in argvs]
    assert len({a.out for a in args}) == 3
    paper, official, convnet = map(run.config_of, args)
    assert (paper["fedredefense_settings"], official["fedredefense_settings"]) == ("paper", "official")
    assert not run.same_run(paper, official) and not run.same_run(paper, convnet)
    unrecorded = {k: v for k, v in paper.items() if k != "fedredefense_settings"}
    assert run.same_run(unrecorded, paper) and not run.same_run(unrecorded, official)
