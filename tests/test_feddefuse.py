"""FedDefuse (feddefuse.py): Algorithm 2 on hand-built rounds, Algorithm 1 and the defense on real updates."""
import json
import math

import numpy as np
import pytest
import pywt
import torch
from scipy.optimize import minimize

import attacks
import feddefuse
import fl
from feddefuse import (benign_distance, dbscan_labels, dwt_lowpass, geometric_median, is_uniformly_benign,
                       malicious_distance, malicious_representatives, min_max, normality_filter,
                       normality_score, replay, select_benign)
from fedredefense import Knowledge


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- DWT low-pass

@pytest.mark.parametrize("d", [64, 37])
def test_dwt_constant_is_scaled_constant(d):
    x = torch.full((2, d), 3.0)
    c = dwt_lowpass(x, "haar", 3)
    assert c.shape == (2, math.ceil(d / 8))
    assert torch.allclose(c, torch.full_like(c, 3.0 * 2 ** 1.5), atol=1e-5)


def test_dwt_level_clamped_for_short_vectors():
    c = dwt_lowpass(torch.full((1, 3), 2.0), "haar", 3)      # dwt_max_level(3, haar) = 1
    assert c.shape == (1, 2)
    assert torch.allclose(c, torch.full_like(c, 2.0 * 2 ** 0.5))
    assert torch.equal(dwt_lowpass(torch.ones(2, 1), "haar", 3), torch.ones(2, 1, dtype=torch.float64))


def test_dwt_slow_sine_is_block_means_and_low_pass():
    d, level = 1024, 3
    x = torch.sin(2 * math.pi * torch.arange(d, dtype=torch.float64) / d)[None].repeat(2, 1)
    x[1] *= -2.0
    c = dwt_lowpass(x, "haar", level)
    block_means = x.reshape(2, d // 8, 8).mean(2)
    assert torch.allclose(c, block_means * 2 ** (level / 2), atol=1e-12)
    details = pywt.wavedec(x.numpy(), "haar", mode="periodization", level=level, axis=1)[1:]
    high = sum((dc ** 2).sum() for dc in details)
    assert high / (x ** 2).sum().item() < 1e-3
    assert abs((c ** 2).sum().item() / (x ** 2).sum().item() - 1) < 1e-3     # Parseval: the energy is low-pass


# ------------------------------------------------------------------------------------------- geometric median

def brute_force_median(points):
    p = points.numpy()
    obj = lambda v: np.linalg.norm(p - v, axis=1).sum()
    res = minimize(obj, p.mean(0), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    return torch.from_numpy(res.x), obj


@pytest.mark.parametrize("pts", [
    [[0, 0], [1, 0], [0, 1], [5, 5]],                     # asymmetric: mean != median
    [[0, 0], [4, 0], [1, 3], [7, 8], [-2, 5]],
    [[0, 0], [1, 0], [-1, 0.2]],                          # angle > 120 deg at the origin: median is a data point
])
def test_geometric_median_matches_brute_force(pts):
    points = t(pts)
    gm = geometric_median(points)
    ref, obj = brute_force_median(points)
    assert obj(gm.numpy()) <= obj(ref.numpy()) + 1e-9
    assert torch.allclose(gm, ref, atol=1e-4)


def test_geometric_median_differs_from_mean_on_asymmetric_points():
    points = t([[0, 0], [1, 0], [0, 1], [5, 5]])
    assert torch.linalg.vector_norm(geometric_median(points) - points.mean(0)) > 0.5


def test_geometric_median_leaves_a_data_point_that_is_not_the_median():
    # the mean (0, 0) is a data point, but the median is (-1, 0); a plain eps clamp would stay at (0, 0)
    points = t([[0, 0], [3, 0], [-1, 0], [-1, 0], [-1, 0]])
    assert torch.allclose(geometric_median(points), t([-1, 0]), atol=1e-6)


def test_geometric_median_single_and_identical_points():
    assert torch.equal(geometric_median(t([[2, 3]])), t([2, 3]))
    assert torch.equal(geometric_median(t([[2, 3]] * 4)), t([2, 3]))


# ---------------------------------------------------------------------------------------- representatives, eq. 9

def test_representatives_are_highest_r_members_of_delta_m():
    r = t([0.1, 0.9, 0.5, 0.7, 0.3])
    assert malicious_representatives(r, [0, 2, 3, 4], 2) == [3, 2]        # client 1 has the top R but is not in Delta_m
    assert sorted(malicious_representatives(r, [0, 2, 3, 4], 10)) == [0, 2, 3, 4]   # K clamped to |Delta_m|
    assert malicious_representatives(r, [], 3) == []


# ----------------------------------------------------------------------------------------- distances and score

def test_distances_and_phi_ordering():
    # prototype at the origin, one representative at (10, 0)
    coeffs = t([[0, 0], [-2, 0], [5, 0], [10, 0]])
    d_b = benign_distance(coeffs, t([0, 0]))
    d_m = malicious_distance(coeffs, [3])
    assert torch.allclose(d_b, t([0, 2, 5, 10]))
    assert torch.allclose(d_m, t([10, 12, 5, 0]))
    phi = normality_score(d_b, d_m, alpha=0.5)
    expected = 0.5 * t([10, 12, 5, 0]) / 12 - 0.5 * t([0, 2, 5, 10]) / 10
    assert torch.allclose(phi, expected)
    assert phi.argmax() == 0 and phi.argmin() == 3                         # at the prototype vs at the representative
    assert phi[0] > phi[1] > phi[2] > phi[3]
    assert torch.equal(normality_score(d_b, d_m, 1.0).argsort(), min_max(d_m).argsort())
    assert torch.allclose(normality_score(d_b, d_m, 0.0), -min_max(d_b))


def test_malicious_distance_sums_over_representatives_and_is_zero_without_any():
    coeffs = t([[0, 0], [3, 4], [6, 8]])
    assert torch.allclose(malicious_distance(coeffs, [1, 2]), t([15, 5, 5]))
    assert torch.equal(malicious_distance(coeffs, []), t([0, 0, 0]))


def test_min_max():
    assert torch.equal(min_max(t([4, 4, 4])), t([0, 0, 0]))
    assert torch.allclose(min_max(t([2, 4, 3])), t([0, 1, 0.5]))


# ----------------------------------------------------------------------------------------- DBSCAN short-circuit

def uniform(d_b, **kw):
    return is_uniformly_benign(dbscan_labels(t(d_b), **kw))


def test_is_uniformly_benign():
    similar = [1.0, 1.1, 0.9, 1.2, 0.95, 1.05]
    assert uniform(similar)
    assert uniform([1e-6 * x for x in similar])                          # scale-free
    assert not uniform([1.0, 1.1, 0.9, 1.2, 0.95, 4.0])                  # lone outlier: noise next to a cluster
    assert not uniform([1.0, 1.1, 0.9, 3.0, 3.1, 3.2])
    assert uniform([0.1, 1.0, 10.0])                                     # all noise (-1): one distinct label
    assert uniform([0, 0, 0])
    assert not uniform([0, 0, 0, 1, 1])                                  # zero median -> mean scale


def test_dbscan_labels_chain_gaps_up_to_eps_of_the_median():
    # median 1.0: the gap 1.0 -> 1.4 is 0.4 (one chain at eps 0.5, two clusters at eps 0.3)
    d_b = [0.6, 0.8, 1.0, 1.4, 1.5]
    assert dbscan_labels(t(d_b)).tolist() == [0] * 5
    assert dbscan_labels(t(d_b), eps=0.3).tolist() == [0, 0, 0, 1, 1]
    assert dbscan_labels(t(d_b), eps=0.3, min_samples=3).tolist() == [0, 0, 0, -1, -1]


# ----------------------------------------------------------------------------------------- KMeans selection

def test_select_benign_mean_vs_sum():
    phi = t([0.2] * 5 + [0.9])              # positive scores: the sum favours the larger, lower cluster
    assert select_benign(phi, "mean").tolist() == [False] * 5 + [True]
    assert select_benign(phi, "sum").tolist() == [True] * 5 + [False]
    phi = t([-0.2] * 5 + [-0.6])            # negative scores: the sum favours the smaller, lower cluster
    assert select_benign(phi, "mean").tolist() == [True] * 5 + [False]
    assert select_benign(phi, "sum").tolist() == [False] * 5 + [True]


def test_select_benign_keeps_everyone_without_two_distinct_scores():
    assert select_benign(t([0.3, 0.3, 0.3])).all()


# ----------------------------------------------------------------------------------------- the whole algorithm

def make_round(n_benign, n_malicious, seed=0, d=256):
    g = torch.Generator().manual_seed(seed)
    base = torch.sin(2 * math.pi * torch.arange(d) / d)
    benign = base + 0.1 * torch.randn(n_benign, d, generator=g)
    malicious = -2.0 * base + 0.1 * torch.randn(n_malicious, d, generator=g)
    return torch.cat([benign, malicious])


def test_all_benign_round_keeps_everyone():
    updates = make_round(10, 0)
    r = torch.linspace(0.1, 0.5, 10)
    # the recoverability split is arbitrary here; the DBSCAN short-circuit must keep everyone anyway
    f = normality_filter(dwt_lowpass(updates), r, list(range(7)), [7, 8, 9])
    assert f.accepted.all() and f.uniform
    assert f.d_b.shape == f.d_m.shape == f.phi.shape == (10,)
    assert is_uniformly_benign(dbscan_labels(f.d_b)) and (f.dbscan_labels == f.dbscan_labels[0]).all()


def test_separated_malicious_group_is_filtered():
    updates = make_round(7, 4)                      # clients 0-6 benign, 7-10 malicious
    r = t([0.1, 0.12, 0.08, 0.11, 0.09, 0.1, 0.4, 0.9, 0.8, 0.95, 0.85])
    benign_idx, malicious_idx = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10]   # benign client 6 misplaced in Delta_m
    assert malicious_representatives(r, malicious_idx, 3) == [9, 7, 10]
    f = normality_filter(dwt_lowpass(updates), r, benign_idx, malicious_idx, n_representatives=3)
    assert f.accepted.tolist() == [True] * 7 + [False] * 4 and not f.uniform
    assert f.phi[:7].min() > f.phi[7:].max()
    assert f.accepted.dtype == torch.bool and f.representatives == [9, 7, 10]


def test_filter_with_empty_delta_m():
    updates = make_round(7, 3)
    f = normality_filter(dwt_lowpass(updates), torch.zeros(10), list(range(10)), [])
    assert torch.equal(f.d_m, torch.zeros(10, dtype=torch.float64)) and f.representatives == []
    assert f.accepted.tolist() == [True] * 7 + [False] * 3


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 and the defense, on real local training
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_round(digits_round):
    """Genuine updates of clients 0-2, then client 3's update sign-flipped and a Gaussian one built from it."""
    model, w, genuine, sizes = digits_round
    crafted = torch.cat([attacks.sign_flip(genuine[3:]),
                         attacks.gaussian(genuine[3:], w, fl.param_sizes(model), torch.Generator().manual_seed(1))])
    return model, w, torch.cat([genuine[:3], crafted]), torch.cat([sizes[:3], sizes[3:].repeat(2)])


def test_genuine_updates_are_more_recoverable_than_sign_flipped_or_gaussian(mixed_round):
    model, w, updates, sizes = mixed_round
    hp = feddefuse.HYPER["digits"]
    steps = torch.tensor([fl.local_steps(int(s)) for s in sizes])
    surrogate = feddefuse.dlg_surrogate(model, w, updates, (1, 8, 8), 10, fl.LOCAL_LR["digits"], steps, hp,
                                        torch.Generator().manual_seed(0))
    candidate = Knowledge(surrogate.images, surrogate.label_logits, torch.full((len(updates),), hp.lr_init))
    r, refined = feddefuse.recoverability(model, w, updates, candidate, surrogate, hp)
    assert r[:3].max() < r[3:].min(), r
    assert (refined.alpha >= 0).all() and not torch.equal(refined.images, candidate.images)


def test_split_by_recoverability():
    benign_idx, malicious_idx = feddefuse.split_by_recoverability(t([0.3, 0.05, 0.35, 0.06, 0.04]))
    assert benign_idx.tolist() == [1, 3, 4] and malicious_idx.tolist() == [0, 2]
    benign_idx, malicious_idx = feddefuse.split_by_recoverability(t([0.2, 0.2, 0.2]))
    assert benign_idx.tolist() == [0, 1, 2] and malicious_idx.tolist() == []


@pytest.fixture(scope="module")
def recorded(mixed_round):
    """The defense (record=True) on three genuine updates and the Gaussian one, as clients 0, 1, 2, 9."""
    model, w, updates, sizes = mixed_round
    keep = [0, 1, 2, 4]
    defense = feddefuse.FedDefuse(model, (1, 8, 8), 10, feddefuse.HYPER["digits"], fl.LOCAL_LR["digits"],
                                  torch.Generator().manual_seed(0), record=True)
    rnd = fl.Round(0, [0, 1, 2, 9], w, sizes[keep], torch.tensor([False, False, False, True]))
    return defense, rnd, updates[keep], defense(updates[keep], rnd)


def test_fed_defuse_drops_gaussian_updates_and_weights_by_data_size(recorded):
    defense, rnd, updates, decision = recorded
    assert decision.accepted.tolist() == [True, True, True, False]
    assert decision.expel is None and decision.errors.shape == (4,)
    expected = (rnd.sizes[:3, None].float() * updates[:3]).sum(0) / rnd.sizes[:3].sum()
    assert torch.allclose(decision.update, expected, atol=1e-7)
    assert set(defense.candidate) == set(defense.surrogate) == {0, 1, 2, 9}


def test_decision_details_are_consistent_and_json_ready(recorded):
    defense, rnd, _, decision = recorded
    d = json.loads(json.dumps(decision.details))
    ids = [str(c) for c in rnd.clients]
    for key in ("r", "d_b", "d_m", "phi", "dbscan_labels"):
        assert list(d[key]) == ids, key
    assert [d["r"][c] for c in ids] == pytest.approx(decision.errors.tolist())
    assert sorted(d["delta_b"] + d["delta_m"]) == rnd.clients and not set(d["delta_b"]) & set(d["delta_m"])
    assert max(d["r"][str(c)] for c in d["delta_b"]) < min(d["r"][str(c)] for c in d["delta_m"])
    k = min(feddefuse.HYPER["digits"].n_representatives, len(d["delta_m"]))
    assert d["representatives"] == sorted(d["delta_m"], key=lambda c: -d["r"][str(c)])[:k]
    assert d["uniform"] is False and d["kmeans"] == [0, 1, 2]             # the gate fired; KMeans kept 0, 1, 2
    assert max(d["phi"][c] for c in ids if c != "9") > d["phi"]["9"]


def test_decision_details_map_rows_to_client_ids():
    # rows 7-10 are malicious; client ids are not row indices
    updates, clients = make_round(7, 4), [40, 3, 17, 8, 21, 5, 11, 30, 2, 14, 9]
    r = t([0.1, 0.12, 0.08, 0.11, 0.09, 0.1, 0.4, 0.9, 0.8, 0.95, 0.85])
    f = normality_filter(dwt_lowpass(updates), r, [0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10], n_representatives=2)
    d = feddefuse.decision_details(clients, r, torch.arange(6), torch.arange(6, 11), f)
    assert d["delta_m"] == [11, 30, 2, 14, 9] and d["representatives"] == [14, 30]
    assert d["phi"] == {str(c): p for c, p in zip(clients, f.phi.tolist())}
    assert d["kmeans"] == [40, 3, 17, 8, 21, 5, 11] and d["uniform"] is False
    assert d["dbscan_labels"]["9"] != d["dbscan_labels"]["40"]


def test_replay_record(recorded):
    defense, rnd, updates, decision = recorded
    assert len(defense.replay) == 1
    rec = defense.replay[0]
    assert rec["clients"] == rnd.clients and torch.equal(rec["malicious"], rnd.malicious)
    assert all(v.device.type == "cpu" for v in rec.values() if torch.is_tensor(v))
    assert torch.equal(rec["coeffs"], dwt_lowpass(updates, "haar", 3).cpu())
    assert torch.allclose(rec["gram"].diagonal(), updates.double().pow(2).sum(1))
    assert rec["hyper"]["n_representatives"] == 5 and rec["hyper"]["alpha"] == 0.3
    off = feddefuse.FedDefuse(defense.model, (1, 8, 8), 10, defense.hp, defense.local_lr, torch.Generator())
    assert off.replay == [] and not off.record


def test_replay_reproduces_the_live_decision_and_applies_variants(recorded):
    defense, rnd, _, decision = recorded
    rec = defense.replay[0]
    live = replay(rec)
    assert torch.equal(live.accepted, decision.accepted)
    assert live.phi.tolist() == pytest.approx([decision.details["phi"][str(c)] for c in rnd.clients])
    loose = replay(rec, dbscan_eps=1e6)                                    # one DBSCAN chain: everyone kept
    assert loose.uniform and loose.accepted.all() and not live.accepted.all()
    with pytest.raises(TypeError):
        replay(rec, no_such_knob=1)


def test_replay_k_picks_the_top_k_recoverability_scores_of_delta_m():
    updates = make_round(6, 4, d=64)
    r = t([0.1, 0.2, 0.1, 0.15, 0.1, 0.6, 0.9, 0.7, 0.95, 0.8])           # client 5 (benign) is in Delta_m
    rec = {"coeffs": dwt_lowpass(updates), "r": r, "benign_idx": torch.arange(5),
           "malicious_idx": torch.arange(5, 10), "malicious": torch.arange(10) >= 6,
           "hyper": {"n_representatives": 5, "alpha": 0.5, "dbscan_eps": 0.5, "dbscan_min_samples": 2, "rule": "mean"}}
    by_r = [8, 6, 9, 7, 5]                                                 # Delta_m by descending R
    for k in (1, 3, 5, 10):
        f = replay(rec, n_representatives=k)
        assert f.representatives == by_r[:k]
        expected = sum(torch.linalg.vector_norm(rec["coeffs"] - rec["coeffs"][j], dim=1) for j in by_r[:k])
        assert torch.allclose(f.d_m, expected)
    assert not torch.allclose(replay(rec, n_representatives=1).phi, replay(rec, n_representatives=5).phi)


def test_replay_metrics_and_command_line(tmp_path, capsys):
    updates = make_round(7, 4)                                             # rows 7-10 malicious
    r = t([0.1, 0.12, 0.08, 0.11, 0.09, 0.1, 0.4, 0.9, 0.8, 0.95, 0.85])
    rec = {"coeffs": dwt_lowpass(updates), "r": r, "benign_idx": torch.arange(6),
           "malicious_idx": torch.arange(6, 11), "malicious": torch.arange(11) >= 7,
           "hyper": {"n_representatives": 3, "alpha": 0.5, "dbscan_eps": 0.5, "dbscan_min_samples": 2, "rule": "mean"}}
    assert feddefuse.replay_metrics([rec]) == {"adacc": 1.0, "mr": 0.0, "mr0": 1.0, "fpr": 0.0, "gated": 1.0}
    m = feddefuse.replay_metrics([rec, rec], dbscan_eps=1e6)              # the gate never fires: accept all
    assert m == pytest.approx({"adacc": 7 / 11, "mr": 4 / 11, "mr0": 0.0, "fpr": 0.0, "gated": 0.0})
    torch.save([rec], tmp_path / "replay.pt")
    feddefuse.main(["replay", str(tmp_path / "replay.pt"), "--n-representatives", "1", "3", "--dbscan-eps", "1e6"])
    rows = [line for line in capsys.readouterr().out.splitlines() if "replay.pt" in line]
    assert len(rows) == 2 and "| 1 | 0.5 | 1000000.0 | 2 | mean | 63.6 | 36.4 | 0.0 | 0.0 | 0.0 |" in rows[0]


def test_diagnosis_counts_what_separates_the_attacked_rounds():
    updates = make_round(7, 4)                                             # rows 7-10 malicious
    r = t([0.1, 0.12, 0.08, 0.11, 0.09, 0.1, 0.4, 0.9, 0.8, 0.95, 0.85])
    u = updates.double()
    rec = {"coeffs": dwt_lowpass(updates), "r": r, "benign_idx": torch.arange(6), "gram": u @ u.T,
           "malicious_idx": torch.arange(6, 11), "malicious": torch.arange(11) >= 7,
           "hyper": {"n_representatives": 3, "alpha": 0.5, "dbscan_eps": 0.5, "dbscan_min_samples": 2, "rule": "mean"}}
    attack_free = {**rec, "malicious": torch.zeros(11, dtype=torch.bool)}
    m = feddefuse.diagnosis([rec, attack_free])
    assert m["rounds"] == 1                                                # the attack-free round is not scored
    assert m["r_separable"] == 1 and m["split_clean"] == 1                 # R of rows 7-10 above all genuine R
    genuine = torch.nn.functional.normalize(u[:7], dim=1)                  # cosine from its definition
    pairs = [(genuine[i] @ genuine[j]).item() for i in range(7) for j in range(7) if i != j]
    everyone = torch.nn.functional.normalize(u, dim=1)
    pairs_free = [(everyone[i] @ everyone[j]).item() for i in range(11) for j in range(11) if i != j]
    assert m["cosine"] == pytest.approx((sum(pairs) / len(pairs) + sum(pairs_free) / len(pairs_free)) / 2)
    assert m["uniform"] == int(replay(rec).uniform)
