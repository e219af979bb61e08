"""The detection baselines of baselines.py: the invariants each method's paper or official code implies.

Expected values come from hand-built cases or from float64 numpy re-implementations of the docstring formulas written
below, never from the code under test.
"""
import collections
import math
import warnings

import numpy as np
import pytest
import scipy.fft
import torch

import baselines
import fl


pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_round(updates, clients=None, w_global=None, t=0):
    n = len(updates)
    clients = list(range(n)) if clients is None else clients
    w_global = torch.zeros(updates.shape[1], dtype=updates.dtype) if w_global is None else w_global
    return fl.Round(t, clients, w_global, torch.ones(n), torch.zeros(n, dtype=torch.bool))


def blobs(sizes, d, spread, centres_seed=0, seed=1):
    """Gaussian blobs of the given sizes around far-apart random centres (scale 10), rows in blob order."""
    centres = 10 * randn(len(sizes), d, seed=centres_seed)
    return torch.cat([centres[k] + spread * randn(m, d, seed=seed + k) for k, m in enumerate(sizes)])


# ---------------------------------------------------------------------------------------------------------------
# Independent definitions (numpy, float64, loops), written from the docstrings and the papers
# ---------------------------------------------------------------------------------------------------------------

def ref_cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def ref_fltrust(U, g0):
    """g = sum_i TS_i (||g0|| / ||D_i||) D_i / sum_i TS_i, TS_i = ReLU(cos(D_i, g0)); all TS 0 -> 0."""
    U, g0 = np.asarray(U, dtype=np.float64), np.asarray(g0, dtype=np.float64)
    ts = np.array([max(ref_cos(u, g0), 0.0) for u in U])
    if ts.sum() == 0:
        return np.zeros(U.shape[1]), ts
    g = sum(ts[i] * U[i] * np.linalg.norm(g0) / np.linalg.norm(U[i]) for i in range(len(U)) if ts[i] > 0)
    return g / ts.sum(), ts


def ref_flame_aggregate(U, admitted):
    """FLAME steps 3-4 with lam = 0: S = median of all norms; mean of the admitted rows clipped to norm S."""
    U = np.asarray(U, dtype=np.float64)
    norms = np.linalg.norm(U, axis=1)
    S = float(np.median(norms))
    rows = [U[i] * min(1.0, S / norms[i]) if norms[i] > 0 else U[i] for i in np.flatnonzero(admitted)]
    return np.mean(rows, axis=0), S


def ref_foolsgold(H, eps=1e-5):
    """FoolsGold's official steps (DistributedML/FoolsGold model_aggregator.foolsgold, with its epsilon)."""
    H = np.asarray(H, dtype=np.float64)
    n = len(H)
    if n < 2:
        return np.ones(n)
    cs = np.array([[ref_cos(H[i], H[j]) if i != j else 0.0 for j in range(n)] for i in range(n)])
    v = cs.max(axis=1) + eps
    pardoned = cs.copy()
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                pardoned[i, j] = cs[i, j] * v[i] / v[j]
    wv = np.clip(1 - pardoned.max(axis=1), 0, 1)
    if wv.max() == 0:
        return np.zeros(n)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv) + eps) + 0.5
    wv[np.isinf(wv) & (wv > 0)] = 1
    return np.clip(wv, 0, 1)


def ref_two_means(column):
    """Brute force 1-D 2-means: every split of the sorted values, the first one with the least SSE."""
    column = np.asarray(column, dtype=np.float64)
    order = np.argsort(column, kind="stable")
    x = column[order]
    best = None
    for k in range(1, len(x)):
        left, right = x[:k], x[k:]
        sse = ((left - left.mean()) ** 2).sum() + ((right - right.mean()) ** 2).sum()
        if best is None or sse < best[0]:
            best = (sse, k, right.mean() - left.mean())
    upper = np.zeros(len(x), dtype=bool)
    upper[order[best[1]:]] = True
    return upper, best[2]


def ref_pearson(a, b):
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def ref_sets(I, k):
    """Index sets of the k largest and the k smallest entries."""
    order = np.argsort(I)
    return set(order[-k:].tolist()), set(order[:k].tolist())


def ref_similarity(Ia, Ib, k):
    """FedCPA step 4: (rho_T + rho_L) / 2 + (J_T + J_L) / 2, rho = (Pearson on the common indices + 1) / 2."""
    Ia, Ib = np.asarray(Ia, dtype=np.float64), np.asarray(Ib, dtype=np.float64)
    (Ta, La), (Tb, Lb) = ref_sets(Ia, k), ref_sets(Ib, k)
    rhos, jaccards = [], []
    for A, B in ((Ta, Tb), (La, Lb)):
        common = sorted(A & B)
        rhos.append((ref_pearson(Ia[common], Ib[common]) + 1) / 2)
        jaccards.append(len(A & B) / len(A | B))
    return sum(rhos) / 2 + sum(jaccards) / 2


def ref_fedcpa_weights(I_local, I_global, share):
    """FedCPA steps 5-6: score_i = mean_j sim_ij (sim_ii = 1) + sim(i, G); min-max; 1 -> .99, 0 -> .01; logit."""
    I_local, I_global = np.asarray(I_local, dtype=np.float64), np.asarray(I_global, dtype=np.float64)
    n, d = I_local.shape
    k = max(1, int(d * share))
    sim = np.array([[1.0 if i == j else ref_similarity(I_local[i], I_local[j], k) for j in range(n)]
                    for i in range(n)])
    score = sim.mean(axis=1) + np.array([ref_similarity(I_local[i], I_global, k) for i in range(n)])
    if score.max() == score.min():
        return np.ones(n)
    wv = (score - score.min()) / (score.max() - score.min())
    wv[wv == 1], wv[wv == 0] = 0.99, 0.01
    return np.clip(np.log(wv / (1 - wv)) + 0.5, 0, 1)


def ref_dct_matrix(N):
    """Orthonormal DCT-II matrix: C[k, m] = sqrt(2/N) c_k cos(pi (2m + 1) k / (2N)), c_0 = 1/sqrt(2), else 1."""
    C = np.array([[np.sqrt(2 / N) * np.cos(np.pi * (2 * m + 1) * k / (2 * N)) for m in range(N)]
                  for k in range(N)])
    C[0] /= np.sqrt(2)
    return C


def ref_vote(column):
    """The mode of a list of labels, ties to the smallest label."""
    counts = collections.Counter(column)
    return min(counts, key=lambda label: (-counts[label], label))


# ---------------------------------------------------------------------------------------------------------------
# FLTrust
# ---------------------------------------------------------------------------------------------------------------

def fltrust_case(seed=0):
    """Six updates around g0 (positive cosine) plus one reversed update (cosine -1)."""
    g0 = randn(12, seed=seed)
    U = torch.cat([g0 + 1.5 * randn(6, 12, seed=seed + 1), -3 * g0[None]])
    return U, g0


def test_fltrust_matches_formula_and_differs_from_fedavg():
    """FLTrust equals the docstring formula and, with one reversed update, differs from FedAvg."""
    U, g0 = fltrust_case()
    d = baselines.fltrust(U, g0)
    expected, ts = ref_fltrust(U.numpy(), g0.numpy())
    np.testing.assert_allclose(d.update.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.details["trust"], ts, atol=1e-12)
    assert d.accepted.tolist() == (ts > 0).tolist() and not d.accepted[-1]
    assert np.linalg.norm(d.update.numpy() - U.mean(0).numpy()) > 0.1 * np.linalg.norm(expected)


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e3])
def test_fltrust_is_scale_invariant_per_update(c):
    """Scaling any one Delta_i by c > 0 leaves g unchanged."""
    U, g0 = fltrust_case(seed=3)
    for i in (0, 4, 6):
        scaled = U.clone()
        scaled[i] *= c
        torch.testing.assert_close(baselines.fltrust(scaled, g0).update, baselines.fltrust(U, g0).update,
                                   rtol=1e-10, atol=1e-12)


def test_fltrust_client_with_nonpositive_cosine_has_no_influence():
    """Replacing the reversed client by anything of cosine <= 0 changes nothing."""
    U, g0 = fltrust_case(seed=5)
    reference = baselines.fltrust(U, g0).update
    orthogonal = randn(12, seed=9)
    orthogonal -= (orthogonal @ g0) / (g0 @ g0) * g0
    for other in (-100 * g0 + orthogonal, orthogonal, torch.zeros(12, dtype=torch.float64)):
        replaced = U.clone()
        replaced[-1] = other
        d = baselines.fltrust(replaced, g0)
        torch.testing.assert_close(d.update, reference, rtol=1e-10, atol=1e-12)
        assert not d.accepted[-1]


@pytest.mark.parametrize("seed", range(5))
def test_fltrust_norm_never_exceeds_server_norm(seed):
    """||g|| <= ||g0|| on random updates."""
    g0 = randn(30, seed=seed)
    U = randn(9, 30, seed=seed + 100) * torch.linspace(0.1, 50, 9, dtype=torch.float64)[:, None] + g0
    g = baselines.fltrust(U, g0).update
    assert torch.linalg.vector_norm(g) <= torch.linalg.vector_norm(g0) * (1 + 1e-12)


def test_fltrust_all_equal_to_server_update_gives_it():
    """Every Delta_i = g0 (or a positive multiple of it) gives g = g0."""
    g0 = randn(10, seed=2)
    for U in (g0.repeat(5, 1), g0[None] * torch.tensor([[0.1], [1.0], [3.0], [40.0]], dtype=torch.float64)):
        torch.testing.assert_close(baselines.fltrust(U, g0).update, g0, rtol=1e-12, atol=1e-12)


def test_fltrust_all_trust_zero_gives_zero_update_not_fedavg():
    """All trust scores 0 skips the round: the zero update, nobody accepted (FLTrust docstring)."""
    g0 = randn(6, seed=4)
    U = torch.stack([-g0, -2 * g0, torch.zeros(6, dtype=torch.float64)])
    d = baselines.fltrust(U, g0)
    assert torch.equal(d.update, torch.zeros(6, dtype=torch.float64))
    assert d.accepted.tolist() == [False, False, False]


# ---------------------------------------------------------------------------------------------------------------
# FLAME
# ---------------------------------------------------------------------------------------------------------------

def flame_case(n_good=7, n_bad=3, d=20, seed=0):
    """n_good updates around a direction, n_bad around its opposite, norms spread over a factor ~4."""
    base = randn(d, seed=seed)
    U = torch.cat([base + 0.3 * randn(n_good, d, seed=seed + 1), -base + 0.3 * randn(n_bad, d, seed=seed + 2)])
    return U * (1 + torch.arange(n_good + n_bad, dtype=torch.float64)[:, None] / 3), 0.1 * randn(d, seed=seed + 3)


@pytest.mark.parametrize("on", ["models", "updates"])
@pytest.mark.parametrize("n_good, n_bad", [(7, 3), (4, 3), (16, 10)])
def test_flame_cluster_admits_a_majority_and_clips_to_median_norm(on, n_good, n_bad):
    """A cluster admits >= n//2+1, no reversed update; lam=0: admitted clipped to S_t, averaged."""
    U, w = flame_case(n_good, n_bad)
    n = len(U)
    d = baselines.flame(U, w, lam=0, generator=None, on=on)
    assert d.details["cluster"] is True
    assert d.accepted.dtype == torch.bool and int(d.accepted.sum()) >= n // 2 + 1
    assert not d.accepted[n_good:].any()  # the reversed updates are never admitted
    expected, S = ref_flame_aggregate(U.numpy(), d.accepted.numpy())
    assert d.details["clip"] == pytest.approx(S, rel=1e-12)
    np.testing.assert_allclose(d.update.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.linalg.vector_norm(d.update) <= S * (1 + 1e-12)


@pytest.mark.parametrize("on", ["models", "updates"])
def test_flame_identical_updates_give_that_update(on):
    """lam=0 and all updates identical: the output is that update."""
    u = randn(15, seed=7)
    d = baselines.flame(u.repeat(6, 1), 0.1 * randn(15, seed=8), lam=0, on=on)
    torch.testing.assert_close(d.update, u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("on", ["models", "updates"])
def test_flame_is_permutation_invariant(on):
    """lam=0: permuting the clients permutes the admitted mask and leaves the aggregate."""
    U, w = flame_case(seed=11)
    p = torch.randperm(len(U), generator=torch.Generator().manual_seed(1))
    d, dp = baselines.flame(U, w, lam=0, on=on), baselines.flame(U[p], w, lam=0, on=on)
    torch.testing.assert_close(dp.update, d.update, rtol=1e-10, atol=1e-12)
    assert dp.accepted.tolist() == d.accepted[p].tolist()


def test_flame_noise_has_std_lambda_times_clip():
    """With a generator and lam > 0, the aggregate moves by N(0, (lam S_t)^2 I) noise (FLAME docstring step 4)."""
    U, w = flame_case(d=4000, seed=2)
    clean = baselines.flame(U, w, lam=0)
    noisy = baselines.flame(U, w, lam=0.01, generator=torch.Generator().manual_seed(0))
    noise = (noisy.update - clean.update).numpy()
    sigma = 0.01 * clean.details["clip"]
    assert noise.std() == pytest.approx(sigma, rel=0.05) and abs(noise.mean()) < 5 * sigma / np.sqrt(4000)
    assert noisy.accepted.tolist() == clean.accepted.tolist()


# ---------------------------------------------------------------------------------------------------------------
# FLDetector
# ---------------------------------------------------------------------------------------------------------------

def spd(d, seed):
    Q, _ = torch.linalg.qr(randn(d, d, seed=seed))
    return Q @ torch.diag(torch.linspace(0.5, 3.0, d, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("N", [1, 3, 5])
def test_lbfgs_secant_condition(N):
    """y_k = A s_k with A SPD: H~ s_N = y_N."""
    A = spd(6, seed=N)
    S = randn(N, 6, seed=10 + N)
    Y = S @ A
    torch.testing.assert_close(baselines.lbfgs_hvp(S, Y, S[-1]), Y[-1], rtol=1e-8, atol=1e-10)


def test_lbfgs_with_conjugate_directions_is_exact():
    """N = d A-conjugate directions (A's eigenvectors): H~ v = A v for every v."""
    A = spd(5, seed=4)
    eigenvectors = torch.linalg.eigh(A).eigenvectors.T
    S = eigenvectors[torch.randperm(5, generator=torch.Generator().manual_seed(0))] * 2.0
    for seed in range(4):
        v = randn(5, seed=seed)
        torch.testing.assert_close(baselines.lbfgs_hvp(S, S @ A, v), A @ v, rtol=1e-6, atol=1e-6)


def test_lbfgs_off_the_pairs_is_sigma_of_the_newest_pair():
    """Off the span of the pairs H~ v = sigma v, sigma = y_N.s_N / s_N.s_N of the newest pair (lbfgs_hvp docstring)."""
    S, Y = torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, 7, dtype=torch.float64)
    S[:, :4] = randn(3, 4, seed=1)
    Y[:, :4] = S[:, :4] @ spd(4, seed=2)
    v = torch.cat([torch.zeros(4, dtype=torch.float64), randn(3, seed=3)])
    sigma = float(Y[-1] @ S[-1] / (S[-1] @ S[-1]))
    torch.testing.assert_close(baselines.lbfgs_hvp(S, Y, v), sigma * v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_gap_statistic_uniform_scores_give_one_cluster(seed):
    """Scores uniform on [0, 1]: k^ = 1."""
    scores = np.random.default_rng(seed).uniform(0, 1, 20)
    assert baselines.gap_statistic(scores, np.random.default_rng(0)) == 1


@pytest.mark.parametrize("sizes", [(7, 3), (10, 10)])
def test_gap_statistic_separated_groups_give_several_clusters(sizes):
    """Two well-separated groups of scores: k^ >= 2."""
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.1, 0.005, sizes[0]), rng.normal(0.9, 0.005, sizes[1])])
    assert baselines.gap_statistic(scores, np.random.default_rng(0)) >= 2


@pytest.mark.parametrize("n, d", [(2, 3), (3, 5), (10, 20), (30, 40)])
def test_two_means_1d_is_the_best_split(n, d):
    """Exact 1-D 2-means equals the brute-force best split; the upper cluster has the larger mean."""
    values = randn(n, d, seed=n) * torch.rand(1, d, generator=torch.Generator().manual_seed(n),
                                              dtype=torch.float64) * 5
    upper, gap = baselines.two_means_1d(values)
    for j in range(d):
        ref_upper, ref_gap = ref_two_means(values[:, j].numpy())
        assert upper[:, j].tolist() == ref_upper.tolist()
        assert gap[j].item() == pytest.approx(ref_gap, rel=1e-9)
        column = values[:, j].numpy()
        assert column[ref_upper].mean() > column[~ref_upper].mean()


def fldetector_rounds(n=10, d=20, bad=(2, 5, 7), rounds=8, window=3, cold_start=2):
    """Run FLDetector on a linear world: benign g_i^t = g_i^{t-1} + J (w^{t-1} - w^{t-2}), J negative definite;
    the `bad` clients send fresh random updates whose sum equals that of their linear trajectory, so the aggregate
    (hence every L-BFGS pair) still obeys y = J s exactly. The model follows FedAvg: w^t = w^{t-1} + update."""
    J = -0.1 * spd(d, seed=3) / 3.0
    w_init = randn(d, seed=1)
    detector = baselines.FLDetector(w_init.clone(), window=window, cold_start=cold_start)
    malicious = torch.zeros(n, dtype=torch.bool)
    malicious[list(bad)] = True
    w, w_prev, trajectory = w_init.clone(), None, randn(n, d, seed=2)
    decisions = []
    for t in range(rounds):
        if w_prev is not None:
            trajectory = trajectory + J @ (w - w_prev)
        noise = randn(len(bad), d, seed=100 + t)
        updates = trajectory.clone()
        updates[list(bad)] = noise - noise.mean(0) + trajectory[list(bad)].mean(0)
        decision = detector(updates, fl.Round(t, list(range(n)), w.clone(), torch.ones(n), malicious))
        decisions.append((updates, w.clone(), decision))
        if decision.expel.any():
            break
        w_prev, w = w, w + decision.update
    return decisions, malicious, w_init, detector


def test_fldetector_expels_inconsistent_clients_and_restarts():
    """After cold start + window the off-trajectory clients are expelled and w reset to w_init."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn: fewer distinct scores than clusters tried
        decisions, malicious, w_init, detector = fldetector_rounds(window=3, cold_start=2)
    assert len(decisions) == 2 + 3 + 1  # rounds 0..5: detection in round cold_start + window
    for updates, _, decision in decisions[:-1]:
        assert not decision.expel.any() and decision.accepted.all()
        torch.testing.assert_close(decision.update, updates.mean(0))
    _, w, decision = decisions[-1]
    assert decision.expel.tolist() == malicious.tolist()
    assert decision.accepted.tolist() == (~malicious).tolist()
    torch.testing.assert_close(w + decision.update, w_init, rtol=1e-12, atol=1e-12)
    scores = np.array(decision.details["scores"])
    assert scores.sum() == pytest.approx(1.0)
    # The L-BFGS prediction tracks the benign trajectory: here ~5e-5 against ~0.3 (without H~ v it is ~4e-3).
    assert scores[~malicious.numpy()].max() < 1e-3 * scores[malicious.numpy()].min()
    # Its Algorithm 1 ends at the detection: every later round is plain FedAvg over the clients kept.
    kept = [c for c in range(10) if not malicious[c]]
    for t in range(6, 20):
        U = randn(len(kept), 20, seed=t) * (1 + 100 * (t % 2))
        later = detector(U, fl.Round(t, kept, w_init, torch.ones(len(kept)), torch.zeros(len(kept), dtype=torch.bool)))
        assert not later.expel.any() and later.accepted.all()
        torch.testing.assert_close(later.update, U.mean(0))


# ---------------------------------------------------------------------------------------------------------------
# FLCert
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_clients, n_groups", [(1, 1), (10, 3), (25, 5), (7, 7)])
def test_flcert_groups_cover_every_client_once(n_clients, n_groups):
    """The partition covers every client exactly once, in N non-empty groups."""
    groups = baselines.flcert_groups(n_clients, n_groups)
    members = [[c for c in range(n_clients) if groups[c] == g] for g in range(n_groups)]
    assert len(groups) == n_clients and set(groups) <= set(range(n_groups))
    assert sorted(c for group in members for c in group) == list(range(n_clients))
    assert all(members) and max(map(len, members)) - min(map(len, members)) <= 1


@pytest.mark.parametrize("predictions", [
    [[2, 1], [1, 2]],                                    # a tie in each column: the smaller label
    [[0, 3, 3], [3, 3, 1], [3, 0, 1]],                  # plain majorities
    np.random.default_rng(0).integers(0, 4, (4, 300)).tolist(),
    np.random.default_rng(1).integers(0, 6, (5, 300)).tolist(),
])
def test_plurality_vote_is_the_mode_ties_to_smallest(predictions):
    """The vote equals the Counter mode of each column, ties to the smaller label."""
    expected = [ref_vote(column) for column in zip(*predictions)]
    assert fl.plurality_vote(torch.tensor(predictions)).tolist() == expected


def test_flcert_update_is_per_group_median():
    """Row g of FLCert's update is the numpy median of its group's participants, 0 for an absent group."""
    clients = [7, 0, 9, 3, 1, 6, 4]  # groups c mod 3: group 0 has 4 members (even), group 1 three, group 2 none
    U = randn(len(clients), 5, seed=3)
    d = baselines.FLCert(10, 3)(U, make_round(U, clients, torch.zeros(3, 5, dtype=torch.float64)))
    assert d.accepted is None and d.update.shape == (3, 5)
    for g in range(3):
        rows = [i for i, c in enumerate(clients) if c % 3 == g]
        expected = np.median(U[rows].numpy(), axis=0) if rows else np.zeros(5)
        np.testing.assert_allclose(d.update[g].numpy(), expected, rtol=1e-12, atol=0)


def test_predict_with_model_stack_is_the_vote_of_the_models():
    """fl.predict on a [G, d] stack equals the plurality vote of the G models' own predictions."""
    torch.manual_seed(0)
    model = fl.MLP(1, 4, 3)
    w = fl.flatten_params(model)
    stack = w + 0.5 * torch.randn(4, len(w), generator=torch.Generator().manual_seed(1))
    x = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        each = [fl.functional_forward(model, w_g, x).argmax(1).tolist() for w_g in stack]
    expected = [ref_vote(column) for column in zip(*each)]
    ties = [column for column in zip(*each) if [n for _, n in collections.Counter(column).most_common(2)] == [2, 2]]
    assert ties, "the case should contain 2-2 ties"
    assert fl.predict(model, stack, x).tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# Auror
# ---------------------------------------------------------------------------------------------------------------

def test_auror_flags_the_small_blob():
    """Two well-separated Gaussian blobs (7 and 3): the 3 are flagged, the 7 averaged."""
    U = blobs((7, 3), 20, spread=0.1)
    features = baselines.indicative_features(U, 0.5)
    d = baselines.auror(U, features)
    assert d.accepted.tolist() == [True] * 7 + [False] * 3
    np.testing.assert_allclose(d.update.numpy(), U[:7].numpy().mean(0), rtol=1e-12)


def exact_two_means(points):
    """The optimal 2-means partition of a few points by enumeration: the split minimising the within-cluster sum
    of squared distances to the two centroids. Returns the bool mask of the smaller part."""
    n = len(points)
    best, best_sse = None, math.inf
    for bits in range(1, 2 ** (n - 1)):  # client n-1 always in part 0: each split once
        part = np.array([(bits >> i) & 1 for i in range(n)], dtype=bool)
        sse = sum(((points[p] - points[p].mean(0)) ** 2).sum() for p in (part, ~part))
        if sse < best_sse:
            best, best_sse = part, sse
    return best if best.sum() < n - best.sum() else ~best


def test_auror_clusters_the_indicative_features_jointly():
    """Three groups of 3 on two features: A = (6, 0), B = (0, 5), C = (0, 0). Each feature alone has a different
    minority (A on the first, B on the second), so a per-feature vote flags nobody; 2-means on both features
    jointly splits A off (its SSE 37.5 against 54 for B and 91.5 for C), and A is flagged."""
    centres = np.array([[6.0, 0.0]] * 3 + [[0.0, 5.0]] * 3 + [[0.0, 0.0]] * 3)
    points = centres + 0.05 * randn(9, 2, seed=4).numpy()
    minority = exact_two_means(points)
    assert minority.tolist() == [True] * 3 + [False] * 6
    U = torch.cat([torch.tensor(points), randn(9, 3, seed=5)], 1)  # two indicative features, three others
    d = baselines.auror(U, torch.tensor([0, 1]))
    assert d.accepted.tolist() == (~minority).tolist()
    np.testing.assert_allclose(d.update.numpy(), U[3:].numpy().mean(0), rtol=1e-12)


def test_auror_equal_clusters_or_no_features_flag_nobody():
    U = torch.tensor([[0.0], [0.1], [5.0], [5.1]], dtype=torch.float64)
    assert baselines.auror(U, torch.tensor([0])).accepted.all()
    assert baselines.auror(randn(5, 4), torch.zeros(0, dtype=torch.long)).accepted.all()


def test_auror_features_with_identical_clusters_are_not_indicative():
    """Only columns whose 2-means centroids are more than alpha apart are indicative."""
    split = [0.0] * 5 + [1.0] * 5                         # centroids 1 apart: indicative
    constant = [0.3] * 10                                  # both clusters identical: not
    small = (0.01 * randn(10, seed=1)).tolist()            # centroids < 0.5 apart: not
    far = [0.0] * 8 + [-2.0] * 2                           # centroids 2 apart: indicative
    U = torch.tensor([split, constant, small, far], dtype=torch.float64).T
    assert baselines.indicative_features(U, 0.5).tolist() == [0, 3]


# ---------------------------------------------------------------------------------------------------------------
# FoolsGold
# ---------------------------------------------------------------------------------------------------------------

def test_foolsgold_sybils_get_zero_honest_keep_weight():
    """Two identical sybil histories both get weight 0; distinct honest clients keep positive weight."""
    sybil = randn(40, seed=1)
    H = torch.cat([randn(5, 40, seed=2), sybil[None], sybil[None]])
    weights = baselines.foolsgold_weights(H)
    assert weights[5:].tolist() == [0.0, 0.0]
    assert (weights[:5] > 0).all()


def test_foolsgold_orthogonal_client_gets_one():
    """A client orthogonal to all others gets weight 1."""
    others = randn(5, 30, seed=3) + 2 * randn(30, seed=4)   # mutually correlated
    others[:, 0] = 0
    orthogonal = torch.zeros(30, dtype=torch.float64)
    orthogonal[0] = 5.0
    weights = baselines.foolsgold_weights(torch.cat([orthogonal[None], others]))
    assert weights[0].item() == 1.0


def foolsgold_inputs(seed):
    """Random histories with a few correlated pairs, so pardoning and clipping both matter."""
    H = randn(8, 25, seed=seed)
    H[1] = H[0] + 0.3 * randn(25, seed=seed + 50)
    H[2] = H[0] + 0.6 * randn(25, seed=seed + 51)
    H[5] = -H[4] + 0.2 * randn(25, seed=seed + 52)
    return H


@pytest.mark.parametrize("seed", range(4))
def test_foolsgold_weights_match_official_steps_and_lie_in_unit_interval(seed):
    """foolsgold_weights equals a numpy re-implementation of the official steps; weights in [0, 1]."""
    H = foolsgold_inputs(seed)
    weights = baselines.foolsgold_weights(H)
    np.testing.assert_allclose(weights.numpy(), ref_foolsgold(H.numpy()), rtol=1e-9, atol=1e-12)
    assert ((weights >= 0) & (weights <= 1)).all()


def test_foolsgold_is_permutation_equivariant():
    """Permuting the clients permutes their weights."""
    H = foolsgold_inputs(7)
    p = torch.randperm(len(H), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(baselines.foolsgold_weights(H[p]), baselines.foolsgold_weights(H)[p])


def test_foolsgold_server_accumulates_histories_by_client():
    """The server sums each client's updates over rounds and aggregates (1/n) sum alpha_i Delta_i."""
    server = baselines.FoolsGold()
    first, second = foolsgold_inputs(1), foolsgold_inputs(2)[:5]
    server(first, make_round(first))
    clients = [4, 0, 7, 2, 5]
    d = server(second, make_round(second, clients))
    histories = np.stack([first[c].numpy() + second[i].numpy() for i, c in enumerate(clients)])
    alpha = ref_foolsgold(histories)
    np.testing.assert_allclose(d.update.numpy(), alpha @ second.numpy() / 5, rtol=1e-9, atol=1e-12)
    assert d.accepted.tolist() == (alpha > 0).tolist()


# ---------------------------------------------------------------------------------------------------------------
# FedDMC
# ---------------------------------------------------------------------------------------------------------------

def test_btbcn_flags_singleton_noise_and_small_blob():
    """Tight blobs of 8 and 4 plus a far singleton: the singleton and the 4 are flagged, the 8 not."""
    points = torch.cat([blobs((8, 4), 10, spread=0.1), 200 + randn(1, 10, seed=9)])
    assert baselines.btbcn(points, 3).tolist() == [False] * 8 + [True] * 5


def test_btbcn_discards_the_small_branch_not_the_majority():
    """A 9-client branch (sub-blobs of 5 and 4) beside a 3-client branch: the 3 are the noise (the loop's rule),
    where the official code's ``>=`` boundary discards the 9 whenever the 3 are the right child."""
    for seed in range(5):
        points = torch.cat([0.05 * randn(5, 10, seed=seed), 1 + 0.05 * randn(4, 10, seed=seed + 10),
                            10 + 0.05 * randn(3, 10, seed=seed + 20)])
        assert baselines.btbcn(points, 3).tolist() == [False] * 9 + [True] * 3


def test_btbcn_two_small_children_are_both_noise():
    """Both children of the node reached small (3 and 3 leaves): everything left is noise, so all 9 are flagged.
    The Ward tree in 1-D: the root splits off a far pair, then a singleton, leaving two triples. The official
    code's ``>=`` test would take one triple for the large child, reach 6 noise leaves (> 9 // 2) and keep the
    other triple as benign."""
    points = torch.tensor([[60.0], [60.5], [20.0], [0.0], [0.1], [0.2], [5.0], [5.1], [5.2]], dtype=torch.float64)
    assert baselines.btbcn(points, 3).tolist() == [True] * 9


@pytest.mark.parametrize("flags, expected", [
    ([True] * 6 + [False] * 4, True),                 # 6 of 10
    ([False] * 4 + [True] * 6, True),
    ([True] * 5 + [False] * 5, False),                # 5 of 10
    ([True, False] * 5, False),
    ([True] * 10 + [False] * 6, False),               # only the last 10 count: 4 of 10
    ([True, True, False], True),                       # fewer than 10 remembered: 2 of 3
])
def test_window_majority(flags, expected):
    """Flagged iff flagged in more than half of the last 10 rounds."""
    history = {}
    for flag in flags[:-1]:
        baselines.window_majority(history, "c", flag)
    assert baselines.window_majority(history, "c", flags[-1]) is expected


def test_feddmc_averages_the_unflagged_clients():
    """FedDMC on updates forming blobs 8 + 4 + far singleton accepts and averages the 8."""
    U = torch.cat([blobs((8, 4), 30, spread=0.1, seed=4), 200 + randn(1, 30, seed=5)])
    d = baselines.FedDMC()(U, make_round(U))
    assert d.accepted.tolist() == [True] * 8 + [False] * 5
    np.testing.assert_allclose(d.update.numpy(), U[:8].numpy().mean(0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# FedCPA
# ---------------------------------------------------------------------------------------------------------------

def importances(n, d, seed):
    """Correlated non-negative importances, so that top and bottom sets overlap across clients."""
    return (randn(d, seed=seed) + 0.4 * randn(n, d, seed=seed + 1)).abs()


@pytest.mark.parametrize("seed", range(3))
def test_fedcpa_weights_match_formula_in_unit_interval_with_a_one(seed):
    """Weights equal the formula in numpy, lie in [0, 1], and at least one is 1."""
    I = importances(7, 300, seed)
    I_global = (randn(300, seed=seed + 7) + 0.5 * I[0]).abs()
    weights = baselines.fedcpa_weights(I, I_global, share=0.05)
    np.testing.assert_allclose(weights.numpy(), ref_fedcpa_weights(I.numpy(), I_global.numpy(), 0.05),
                               rtol=1e-9, atol=1e-12)
    assert ((weights >= 0) & (weights <= 1)).all() and weights.max().item() == 1.0


def critical_sets(I, k):
    top, bottom = torch.zeros_like(I, dtype=torch.bool), torch.zeros_like(I, dtype=torch.bool)
    order = np.argsort(I.numpy())
    top[order[-k:].tolist()] = True
    bottom[order[:k].tolist()] = True
    return I, top, bottom


def test_critical_similarity_matches_formula_and_is_symmetric():
    """critical_similarity equals FedCPA's similarity formula in numpy and is symmetric."""
    I = importances(4, 200, seed=5)
    for i in range(4):
        for j in range(4):
            a, b = critical_sets(I[i], 10), critical_sets(I[j], 10)
            s_ab, s_ba = baselines.critical_similarity(*a, *b), baselines.critical_similarity(*b, *a)
            assert s_ab == pytest.approx(ref_similarity(I[i].numpy(), I[j].numpy(), 10), abs=1e-12)
            assert s_ab == pytest.approx(s_ba, abs=1e-12)


def test_critical_similarity_identical_clients():
    """Identical clients: Jaccard 1 on both sets, Pearson 1, so similarity 2."""
    a = critical_sets(importances(1, 100, seed=2)[0], 5)
    assert baselines.critical_similarity(*a, *a) == pytest.approx(2.0, abs=1e-12)


def test_fedcpa_server_weights_and_aggregate_over_three_rounds():
    """FedCPA's server over rounds 0-2 equals its algorithm (Han et al., ICCV 2023) in numpy: I_i against the
    current global model every round, I_G from the last two global models, and only round 0's I_G from the code's
    stand-ins (the round's plain FedAvg bar w and w^0); round 1's w^{t-2} is w^0, not round 0's bar w as in the
    code."""
    weights = [slice(0, 150), slice(160, 400)]
    server = baselines.FedCPA(weights, share=0.05)

    def importance(delta, w):
        return np.abs(np.concatenate([delta[..., s] * w[..., s] for s in weights], -1))

    globals_ = [randn(420, seed=1).numpy()]  # w^0, w^1, ...
    for t in range(3):
        w = globals_[-1]
        U = (randn(420, seed=10 + t) + 0.5 * randn(6, 420, seed=20 + t)).numpy()
        if t == 0:
            reference = importance(w + U.mean(0) - w, w + U.mean(0))
        else:
            reference = importance(w - globals_[-2], w)
        wv = ref_fedcpa_weights(importance(U, w + U), reference, 0.05)
        d = server(torch.from_numpy(U), make_round(torch.from_numpy(U), w_global=torch.from_numpy(w), t=t))
        kept = wv > 0
        np.testing.assert_allclose(d.update.numpy(), wv[kept] @ U[kept] / kept.sum(), rtol=1e-9, atol=1e-12)
        assert d.accepted.tolist() == kept.tolist()
        globals_.append(w + d.update.numpy())


# ---------------------------------------------------------------------------------------------------------------
# FreqFed
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 200), (7, 5), (10, 10)])
def test_dct2_is_orthonormal_dct_and_inverted_by_idctn(shape):
    """dct2 = C_H X C_W^T (orthonormal DCT-II), keeps the Frobenius norm, scipy's idctn inverts it."""
    X = randn(*shape, seed=1).numpy()
    V = baselines.dct2(X)
    np.testing.assert_allclose(V, ref_dct_matrix(shape[0]) @ X @ ref_dct_matrix(shape[1]).T, atol=1e-10)
    assert np.linalg.norm(V) == pytest.approx(np.linalg.norm(X), rel=1e-12)
    np.testing.assert_allclose(scipy.fft.idctn(V, type=2, norm="ortho"), X, atol=1e-12)


@pytest.mark.parametrize("H, W", [(2, 2), (3, 200), (10, 84), (7, 5), (1, 9), (16, 16)])
def test_low_frequency_mask_is_the_top_left_triangle(H, W):
    """Keeps V[0,0], never V[H-1,W-1], and equals a < H/2, b < W/2, a + b <= floor((H+W)/4)."""
    mask = baselines.low_frequency_mask(H, W)
    expected = [[a < H / 2 and b < W / 2 and a + b <= math.floor((H + W) / 4) for b in range(W)] for a in range(H)]
    assert mask.tolist() == expected
    assert mask[0, 0] and not mask[H - 1, W - 1]


def freqfed_case():
    """9 clients, output layer 3 x 40 at columns 10..129: 6 around one matrix, 3 around another."""
    return blobs((6, 3), 140, spread=0.5, seed=3), slice(10, 130), (3, 40)


def test_freqfed_admits_largest_cluster_and_is_scale_invariant():
    """The largest cluster is admitted and averaged; scaling an update by c > 0 keeps the admitted set."""
    U, layer, shape = freqfed_case()
    d = baselines.freqfed(U, torch.zeros(U.shape[1], dtype=U.dtype), shape, layer)  # w^{t-1} = 0: W_i = Delta_i
    assert d.accepted.tolist() == [True] * 6 + [False] * 3
    np.testing.assert_allclose(d.update.numpy(), U[:6].numpy().mean(0), rtol=1e-12)
    for i, c in [(0, 10.0), (2, 0.05), (7, 3.0), (8, 1e-3)]:
        scaled = U.clone()
        scaled[i] *= c
        assert baselines.freqfed(scaled, torch.zeros(U.shape[1], dtype=U.dtype), shape, layer).accepted.tolist() \
            == d.accepted.tolist()


def test_freqfed_clusters_on_low_frequencies_only():
    """Clustering uses only the low-frequency DCT coefficients, not the high-frequency ones."""
    shape, mask = (4, 30), baselines.low_frequency_mask(4, 30)
    low = [randn(*shape, seed=1).numpy() * mask, randn(*shape, seed=2).numpy() * mask]
    rows = []
    for i, k in enumerate([0] * 6 + [1] * 3):
        V = low[k] + 20 * randn(*shape, seed=10 + i).numpy() * ~mask
        rows.append(scipy.fft.idctn(V, type=2, norm="ortho").ravel())
    U = torch.tensor(np.stack(rows))
    cos = 1 - baselines.cosine_distances(U).numpy()
    assert np.abs(cos[np.triu_indices(9, 1)]).max() < 0.3  # in the raw space nobody is close to anybody
    assert baselines.freqfed(U, torch.zeros(120, dtype=U.dtype), shape, slice(0, 120)).accepted.tolist() \
        == [True] * 6 + [False] * 3


def ref_freqfed_admitted(matrices):
    """FreqFed's admitted set written from its description: orthonormal 2-D DCT-II of each client's matrix, the
    entries with a < H/2, b < W/2, a + b <= floor((H+W)/4), 1 - cosine distances, HDBSCAN (min_cluster_size 2,
    min_samples 1, no single cluster), the cluster with the most members."""
    from sklearn.cluster import HDBSCAN

    H, W = matrices[0].shape
    keep = [(a, b) for a in range(H) for b in range(W) if a < H / 2 and b < W / 2 and a + b <= (H + W) // 4]
    F = np.array([[scipy.fft.dctn(m, type=2, norm="ortho")[a, b] for a, b in keep] for m in matrices])
    unit = F / np.linalg.norm(F, axis=1, keepdims=True)
    dist = np.clip(1 - unit @ unit.T, 0, 2)
    np.fill_diagonal(dist, 0)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=2, min_samples=1, copy=True).fit_predict(dist)
    sizes = collections.Counter(labels[labels >= 0].tolist())
    if not sizes:
        return [True] * len(matrices)  # no cluster: everyone
    largest = max(sizes, key=lambda label: (sizes[label], -label))  # ties: the lowest label
    return (labels == largest).tolist()


def test_freqfed_analyses_the_local_weights_not_the_updates():
    """FreqFed's DCT is of the local models' output-layer weights w^{t-1} + Delta_i. Built on low frequencies
    e_0..e_8 of the DCT, with w^{t-1} = 10 e_8 on the layer: the local weights of clients 0-5 are e_0, e_0, e_1,
    e_1, e_2, e_2 (three pairs, cosine distance 1 apart), those of 6-8 are 10 e_8 + e_5, e_6, e_7 (distance 0.01):
    four clusters, 6-8 the largest. Their updates, e_p - 10 e_8 for 0-5 and e_5, e_6, e_7 for 6-8, cluster
    otherwise, so an analysis of the updates would not admit 6-8."""
    shape, layer = (4, 12), slice(3, 51)
    keep = [(a, b) for a in range(4) for b in range(12) if a < 2 and b < 6 and a + b <= 4]

    def matrix(coefficients):
        V = np.zeros(shape)
        for (a, b), c in zip(keep, coefficients):
            V[a, b] = c
        return scipy.fft.idctn(V, type=2, norm="ortho")

    e = np.eye(len(keep))
    local = [matrix(e[p]) for p in (0, 0, 1, 1, 2, 2)] + [matrix(10 * e[8] + e[k]) for k in (5, 6, 7)]
    w_global = torch.zeros(53, dtype=torch.float64)
    w_global[layer] = torch.from_numpy(matrix(10 * e[8]).ravel())
    updates = randn(9, 53, seed=3)
    updates[:, layer] = torch.from_numpy(np.stack([m.ravel() for m in local])) - w_global[layer]
    expected = ref_freqfed_admitted(local)
    assert expected == [False] * 6 + [True] * 3
    assert ref_freqfed_admitted([u[layer].reshape(shape).numpy() for u in updates]) != expected
    d = baselines.freqfed(updates, w_global, shape, layer)
    assert d.accepted.tolist() == expected
    np.testing.assert_allclose(d.update.numpy(), updates[6:].numpy().mean(0), rtol=1e-12)
    rnd = make_round(updates, w_global=w_global)
    assert baselines.FreqFed(layer, shape)(updates, rnd).accepted.tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# Every defense on degenerate rounds: no crash, no NaN, the right shapes
# ---------------------------------------------------------------------------------------------------------------

N_CLIENTS = 6


@pytest.fixture(scope="module")
def tiny():
    """A tiny MLP (d = 4003), its w^0, random training data, and where its parameters live."""
    torch.manual_seed(0)
    model = fl.MLP(1, 4, 3)
    slices = {name: (s, shape) for name, s, shape in fl.param_slices(model)}
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    return model, fl.flatten_params(model), x, y, slices


DEFENSES = {
    "flame": lambda m, w, x, y, sl: baselines.FLAME(seed=0),
    "fltrust": lambda m, w, x, y, sl: baselines.FLTrust(m, x, y, 0.05, 32, 0),
    "fldetector": lambda m, w, x, y, sl: baselines.FLDetector(w.clone(), window=2, cold_start=1),
    "flcert": lambda m, w, x, y, sl: baselines.FLCert(N_CLIENTS, 2),
    "auror": lambda m, w, x, y, sl: baselines.Auror(sl["out.weight"][0], 0.01, warmup=2),
    "foolsgold": lambda m, w, x, y, sl: baselines.FoolsGold(),
    "feddmc": lambda m, w, x, y, sl: baselines.FedDMC(),
    "fedcpa": lambda m, w, x, y, sl: baselines.FedCPA([s for s, shape in sl.values() if len(shape) in (2, 4)]),
    "freqfed": lambda m, w, x, y, sl: baselines.FreqFed(*sl["out.weight"]),
}


def degenerate_updates(case, d, t):
    """Round t's updates (and participants) for each degenerate case."""
    noise = 0.01 * torch.randn(N_CLIENTS, d, generator=torch.Generator().manual_seed(t))
    if case == "one_zero_row":
        noise[2] = 0
        return noise, list(range(N_CLIENTS))
    if case == "all_zero":
        return torch.zeros(N_CLIENTS, d), list(range(N_CLIENTS))
    if case == "single_participant":
        return noise[:1], [3]
    return noise[:1].repeat(5, 1), [5, 0, 1, 2, 3]  # identical


DEGENERATE = [(name, case) for case in ("one_zero_row", "all_zero", "single_participant", "identical")
              for name in DEFENSES]


@pytest.mark.parametrize("name, case", DEGENERATE)
def test_defense_survives_degenerate_rounds(tiny, name, case):
    """Degenerate rounds: no crash, a finite update of the model's shape, accepted None or bool [n] (issue, item 2)."""
    model, w0, x, y, slices = tiny
    defense = DEFENSES[name](model, w0, x, y, slices)
    w = w0.repeat(2, 1) if name == "flcert" else w0.clone()
    for t in range(5):
        updates, clients = degenerate_updates(case, len(w0), t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's clustering warnings on degenerate inputs
            decision = defense(updates, fl.Round(t, clients, w.clone(), torch.ones(len(clients)),
                                                 torch.zeros(len(clients), dtype=torch.bool)))
        assert decision.update.shape == w.shape
        assert torch.isfinite(decision.update).all()
        for mask in (decision.accepted, decision.expel):
            assert mask is None or (mask.dtype == torch.bool and mask.shape == (len(clients),))
        w = w + decision.update
