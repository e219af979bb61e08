"""The robust-aggregation baselines (Krum, Multi-Krum, Median, Trimmed mean, Norm bound, RFA).

Expected values come from hand computations (in the comments) or from independent float64 numpy re-implementations
of the textbook definitions written below, never from the code under test.
"""
import math

import numpy as np
import pytest
import torch

import baselines


pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def perm(n, seed=1):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def selected(decision):
    """Indices of the accepted rows."""
    assert decision.accepted.dtype == torch.bool and decision.accepted.device.type == "cpu"
    return decision.accepted.nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------------------
# Independent definitions (numpy, float64, loops)
# ---------------------------------------------------------------------------------------------------------------

def ref_krum_scores(x, f, squared=True):
    """score_i = sum of the n - f - 2 smallest (squared) distances from row i to the other rows."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sqrt(np.sum((x[i] - x[j]) ** 2))) for j in range(n) if j != i)
        if squared:
            dists = sorted(dd ** 2 for dd in dists)
        scores.append(sum(dists[:n - f - 2]))
    return scores


def ref_krum_index(x, f, squared=True):
    scores = ref_krum_scores(x, f, squared)
    return min(range(len(scores)), key=lambda i: (scores[i], i))


def ref_multikrum(x, f, m):
    scores = ref_krum_scores(x, f)
    chosen = sorted(range(len(x)), key=lambda i: (scores[i], i))[:m]
    return sorted(chosen), np.asarray(x, dtype=np.float64)[chosen].mean(0)


def ref_median(x):
    return np.median(np.asarray(x, dtype=np.float64), axis=0)


def ref_trmean(x, b):
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    return np.array([np.mean(sorted(x[:, j])[b:n - b]) for j in range(x.shape[1])])


def ref_weiszfeld(x, weights=None, nu=1e-5, iters=4, ftol=1e-6):
    """RFA's smoothed Weiszfeld (Pillutla, Kakade, Harchaoui, IEEE TSP 2022), with its objective history."""
    x = np.asarray(x, dtype=np.float64)
    a = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    a = a / a.sum()

    def obj(v):
        return sum(a[i] * np.linalg.norm(v - x[i]) for i in range(len(x)))

    v = sum(a[i] * x[i] for i in range(len(x)))
    history = [obj(v)]
    for _ in range(iters):
        beta = np.array([a[i] / max(nu, np.linalg.norm(v - x[i])) for i in range(len(x))])
        v = sum(beta[i] * x[i] for i in range(len(x))) / beta.sum()
        history.append(obj(v))
        if abs(history[-2] - history[-1]) < ftol * history[-1]:
            break
    return v, history


# Random shapes for the agreement tests: n from 5 to 30, d up to 10^4.
SHAPES = [(5, 3), (8, 50), (13, 1000), (30, 10_000)]


# ---------------------------------------------------------------------------------------------------------------
# Krum and Multi-Krum
# ---------------------------------------------------------------------------------------------------------------

# Points (x, 0) at x = 0, 0, 3, 5, 7; n = 5, f = 1: n - f - 2 = 2 neighbours.
#   row  distances to the others   2 nearest  squared score  plain score
#   0    0, 3, 5, 7                 0, 3       0 + 9 = 9      3
#   1    0, 3, 5, 7                 0, 3       9              3
#   2    3, 3, 2, 4                 2, 3       4 + 9 = 13     5
#   3    5, 5, 2, 2                 2, 2       4 + 4 = 8      4
#   4    7, 7, 4, 2                 2, 4       4 + 16 = 20    6
# Squared: Krum picks row 3 (score 8). Plain (FedREDefense code): rows 0 and 1 tie at 3 -> the lowest, row 0.
LINE = t([[0, 0], [0, 0], [3, 0], [5, 0], [7, 0]])


def test_krum_hand_computed():
    assert baselines.krum_scores(LINE, 1).tolist() == [9, 9, 13, 8, 20]
    assert baselines.krum_scores(LINE, 1, squared=False).tolist() == [3, 3, 5, 4, 6]
    d = baselines.krum(LINE, 1)
    assert selected(d) == [3] and d.update.tolist() == [5, 0]
    d = baselines.krum(LINE, 1, squared=False)
    assert selected(d) == [0] and d.update.tolist() == [0, 0]


def test_krum_second_hand_computed_example():
    # Rows (4,0), (0,0), (1,0), (0,2), (9,9); f = 1, 2 neighbours; squared distances:
    #   0-1 16, 0-2 9, 0-3 20, 0-4 106, 1-2 1, 1-3 4, 1-4 162, 2-3 5, 2-4 145, 3-4 130
    #   scores: 9+16 = 25, 1+4 = 5, 1+5 = 6, 4+5 = 9, 106+130 = 236 -> row 1.
    x = t([[4, 0], [0, 0], [1, 0], [0, 2], [9, 9]])
    assert baselines.krum_scores(x, 1).tolist() == pytest.approx([25, 5, 6, 9, 236])  # sqrt(5)^2: 1 ulp off
    assert selected(baselines.krum(x, 1)) == [1]


def test_multikrum_hand_computed():
    # LINE's squared scores 9, 9, 13, 8, 20: order 3, 0, 1 (tie with 0 -> after it), 2, 4.
    d = baselines.multikrum(LINE, 1)  # m = n - f = 4: rows 0, 1, 2, 3 -> x = (0 + 0 + 3 + 5) / 4 = 2
    assert selected(d) == [0, 1, 2, 3] and d.update.tolist() == [2, 0]
    d = baselines.multikrum(LINE, 1, 2)  # rows 3 and 0 -> 2.5
    assert selected(d) == [0, 3] and d.update.tolist() == [2.5, 0]
    d = baselines.multikrum(LINE, 1, 3)  # rows 3, 0, 1 -> 5/3
    assert selected(d) == [0, 1, 3] and d.update[0].item() == pytest.approx(5 / 3)


def test_krum_ties_go_to_the_lowest_index():
    # Unit square plus a far point, f = 1: the four corners all score 1 + 1 = 2.
    x = t([[0, 0], [1, 0], [0, 1], [1, 1], [10, 10]])
    assert selected(baselines.krum(x, 1)) == [0]
    assert selected(baselines.krum(x[[3, 2, 1, 0, 4]], 1)) == [0]


@pytest.mark.parametrize("n,d", SHAPES)
def test_krum_and_multikrum_agree_with_definition(n, d):
    x = randn(n, d, seed=n)
    for f in sorted({0, (n - 3) // 2, n - 3}):
        np.testing.assert_allclose(baselines.krum_scores(x, f).numpy(), ref_krum_scores(x.numpy(), f), rtol=1e-5)
        np.testing.assert_allclose(baselines.krum_scores(x, f, squared=False).numpy(),
                                   ref_krum_scores(x.numpy(), f, squared=False), rtol=1e-5)
        i = ref_krum_index(x.numpy(), f)
        dec = baselines.krum(x, f)
        assert selected(dec) == [i] and torch.equal(dec.update, x[i])
        assert selected(baselines.krum(x, f, squared=False)) == [ref_krum_index(x.numpy(), f, squared=False)]
        for m in sorted({1, n - f, n}):
            chosen, mean = ref_multikrum(x.numpy(), f, m)
            dec = baselines.multikrum(x, f, m)
            assert selected(dec) == chosen
            np.testing.assert_allclose(dec.update.numpy(), mean, rtol=1e-5, atol=1e-12)


def test_krum_returns_an_input_row_and_is_permutation_equivariant():
    x = randn(12, 30, seed=3)
    p = perm(12)
    i = selected(baselines.krum(x, 3))[0]
    dec = baselines.krum(x[p], 3)
    assert (p[selected(dec)[0]] == i) and torch.equal(dec.update, x[i])
    assert any(torch.equal(dec.update, row) for row in x)


def test_multikrum_is_permutation_invariant():
    x, p = randn(12, 30, seed=4), perm(12)
    a, b = baselines.multikrum(x, 3), baselines.multikrum(x[p], 3)
    torch.testing.assert_close(a.update, b.update)
    assert sorted(p[selected(b)].tolist()) == selected(a)


@pytest.mark.parametrize("n", [4, 7, 12])
def test_krum_never_selects_a_far_away_update(n):
    for f in range(0, n - 2):  # every f with n - f - 2 >= 1
        for far in range(n):
            x = randn(n, 6, seed=10 * n + f)
            x[far] = 1e6
            assert far not in selected(baselines.krum(x, f))
            assert far not in selected(baselines.multikrum(x, f, n - 1))  # the far row has the worst score


def test_multikrum_m1_is_krum_and_mn_is_the_mean():
    x = randn(9, 20, seed=5)
    for f in range(0, 7):
        k = baselines.krum(x, f)
        one = baselines.multikrum(x, f, 1)
        assert selected(one) == selected(k) and torch.equal(one.update, k.update)
        everyone = baselines.multikrum(x, f, 9)
        assert everyone.accepted.all()
        torch.testing.assert_close(everyone.update, x.mean(0))


@pytest.mark.parametrize("n,f", [(2, 0), (5, 3), (5, 4), (0, 0), (6, -1), (6, 1.5)])
def test_krum_precondition_raises(n, f):
    with pytest.raises(ValueError, match="Krum"):
        baselines.krum(randn(n, 3), f)
    with pytest.raises(ValueError, match="Krum"):
        baselines.multikrum(randn(n, 3), f)


def test_multikrum_bad_m_raises():
    for m in (0, 6):
        with pytest.raises(ValueError, match="Multi-Krum"):
            baselines.multikrum(randn(5, 3), 1, m)


def test_krum_keeps_dtype():
    x = randn(6, 4).float()
    assert baselines.krum(x, 1).update.dtype == torch.float32
    assert baselines.multikrum(x, 1).update.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Median and Trimmed mean
# ---------------------------------------------------------------------------------------------------------------

EVEN = t([[1, 5, -2], [3, 0, 4], [2, 7, 8], [10, -1, 0]])
# sorted columns: (1, 2, 3, 10), (-1, 0, 5, 7), (-2, 0, 4, 8)
#   median (mean of the middles): 2.5, 2.5, 2      lower middle: 2, 0, 0
ODD = torch.cat([EVEN, t([[0, 100, 1]])])
# sorted columns: (0, 1, 2, 3, 10), (-1, 0, 5, 7, 100), (-2, 0, 1, 4, 8)
#   median: 2, 5, 1
#   trimmed mean b = 1: (1+2+3)/3 = 2, (0+5+7)/3 = 4, (0+1+4)/3 = 5/3;   b = 2: the median


def test_median_hand_computed():
    d = baselines.median(EVEN)
    assert d.update.tolist() == [2.5, 2.5, 2] and d.accepted is None
    assert baselines.median(EVEN, lower=True).update.tolist() == [2, 0, 0]
    assert baselines.median(ODD).update.tolist() == [2, 5, 1]
    assert baselines.median(ODD, lower=True).update.tolist() == [2, 5, 1]
    assert torch.equal(baselines.median(EVEN, lower=True).update, EVEN.median(0).values)  # torch's lower median


def test_trmean_hand_computed():
    d = baselines.trmean(ODD, 1)
    torch.testing.assert_close(d.update, t([2, 4, 5 / 3]))
    assert d.accepted is None
    assert baselines.trmean(ODD, 2).update.tolist() == [2, 5, 1]
    assert baselines.trmean(EVEN, 1).update.tolist() == [2.5, 2.5, 2]  # n = 4, b = 1: the two middles


@pytest.mark.parametrize("n,d", SHAPES)
def test_median_and_trmean_agree_with_definition(n, d):
    x = randn(n, d, seed=100 + n)
    np.testing.assert_allclose(baselines.median(x).update.numpy(), ref_median(x.numpy()), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(baselines.median(x, lower=True).update.numpy(),
                               np.sort(x.numpy(), axis=0)[(n - 1) // 2], rtol=1e-5, atol=1e-12)
    for b in sorted({0, 1, (n - 1) // 2}):
        np.testing.assert_allclose(baselines.trmean(x, b).update.numpy(), ref_trmean(x.numpy(), b),
                                   rtol=1e-5, atol=1e-12)


def test_trmean_b0_is_the_mean_and_odd_half_is_the_median():
    for n in (5, 8, 11):
        x = randn(n, 40, seed=n)
        torch.testing.assert_close(baselines.trmean(x, 0).update, x.mean(0))
        if n % 2:
            assert torch.equal(baselines.trmean(x, (n - 1) // 2).update, baselines.median(x).update)
            np.testing.assert_array_equal(baselines.trmean(x, (n - 1) // 2).update.numpy(), ref_median(x.numpy()))


@pytest.mark.parametrize("n,b", [(4, 2), (5, 3), (0, 0), (5, -1), (5, 1.5)])
def test_trmean_precondition_raises(n, b):
    with pytest.raises(ValueError, match="Trimmed mean"):
        baselines.trmean(randn(n, 3), b)


def test_median_and_trmean_are_permutation_invariant_and_within_range():
    x, p = randn(10, 25, seed=7), perm(10)
    for rule in (baselines.median, lambda u: baselines.median(u, lower=True), lambda u: baselines.trmean(u, 3)):
        out = rule(x).update
        assert torch.equal(out, rule(x[p]).update)
        assert ((out >= x.min(0).values) & (out <= x.max(0).values)).all()


def outliers(n, k, d=8, seed=0):
    """n rows of which the last k are set to +1e9 or -1e9 (alternating by row, mixed within some rows)."""
    x = randn(n, d, seed=seed)
    for r in range(n - k, n):
        x[r] = 1e9 if r % 2 else -1e9
        if r % 3 == 0:
            x[r, ::2] = 1e9
    return x


@pytest.mark.parametrize("n,k", [(5, 2), (9, 4), (10, 4), (20, 9)])
def test_median_and_trmean_stay_in_the_benign_range(n, k):
    for sign_layout in range(3):
        x = outliers(n, k, seed=sign_layout)
        if sign_layout == 2:
            x[n - k:] = 1e9  # all outliers on one side
        lo, hi = x[:n - k].min(0).values, x[:n - k].max(0).values
        for out in (baselines.median(x).update, baselines.median(x, lower=True).update,
                    baselines.trmean(x, k).update):
            assert ((out >= lo) & (out <= hi)).all()


def test_median_of_nothing_is_the_zero_update():
    assert torch.equal(baselines.median(randn(0, 4)).update, torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Norm bound
# ---------------------------------------------------------------------------------------------------------------

# Rows (3,4), (0,1), (6,8), (0,0): norms 5, 1, 10, 0. M = 5: rows 0, 1, 3 kept, row 2 -> (3,4);
# mean = ((3 + 0 + 3 + 0)/4, (4 + 1 + 4 + 0)/4) = (1.5, 2.25).
NB = t([[3, 4], [0, 1], [6, 8], [0, 0]])


def test_normbound_hand_computed():
    d = baselines.normbound(NB, 5)
    assert d.update.tolist() == [1.5, 2.25] and d.accepted is None
    assert baselines.normbound(NB, 0).update.tolist() == [0, 0]         # M = 0: everything to zero, no NaN
    assert baselines.normbound(NB, 100).update.tolist() == [2.25, 3.25]  # nothing clipped: the mean
    # M = 2.5: (3,4) -> (1.5,2), (6,8) -> (1.5,2); mean ((1.5 + 0 + 1.5 + 0)/4, (2 + 1 + 2 + 0)/4) = (0.75, 1.25)
    torch.testing.assert_close(baselines.normbound(NB, 2.5).update, t([0.75, 1.25]))


def test_norm_bound_thresholds_hand_computed():
    assert baselines.oracle_norm_bound(NB, torch.tensor([True, True, False, True])) == 2.0  # (5 + 1 + 0) / 3
    assert baselines.oracle_norm_bound(NB, torch.zeros(4, dtype=torch.bool)) == 4.0         # none benign: all
    assert baselines.median_norm(NB) == 3.0                                                 # (1 + 5) / 2
    assert baselines.median_norm(NB[:3]) == 5.0


def test_normbound_clips_preserves_direction_and_keeps_short_rows():
    x = randn(12, 30, seed=8) * torch.linspace(0.1, 3, 12, dtype=torch.float64)[:, None]
    norms = x.norm(dim=1)
    M = baselines.median_norm(x)
    out = baselines.normbound(x, M).update
    # Recover the clipped rows from the definition and check the rule's mean against them.
    clipped = torch.stack([row * min(1.0, M / row.norm().item()) for row in x])
    torch.testing.assert_close(out, clipped.mean(0))
    assert (clipped.norm(dim=1) <= M + 1e-6).all()
    short = norms <= M
    assert short.any() and (~short).any()
    assert torch.equal(clipped[short], x[short])
    cos = torch.nn.functional.cosine_similarity(clipped, x, dim=1)
    torch.testing.assert_close(cos, torch.ones(12, dtype=torch.float64))
    # Each row alone: the rule's output *is* the clipped row.
    for row in x:
        alone = baselines.normbound(row[None], M).update
        assert alone.norm() <= M + 1e-6
        assert torch.nn.functional.cosine_similarity(alone, row, dim=0) > 1 - 1e-12
        if row.norm() <= M:
            assert torch.equal(alone, row)


def test_normbound_is_permutation_invariant():
    x, p = randn(10, 20, seed=9), perm(10)
    torch.testing.assert_close(baselines.normbound(x, 3.0).update, baselines.normbound(x[p], 3.0).update)


def test_normbound_bad_threshold_raises():
    for M in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="Norm bound"):
            baselines.normbound(NB, M)


# ---------------------------------------------------------------------------------------------------------------
# RFA
# ---------------------------------------------------------------------------------------------------------------

# Points (x, 0) at x = 0, 0, 3, uniform weights:
#   v0 = 1; distances 1, 1, 2 -> beta ~ (1, 1, 1/2) -> v1 = 1.5 / 2.5 = 0.6
#   distances 0.6, 0.6, 2.4 -> beta ~ (5/3, 5/3, 5/12) = (4, 4, 1)/9 of the sum -> v2 = 3/9 = 1/3
#   objective (1/3) sum |v - x_i|: v0 4/3, v1 (0.6 + 0.6 + 2.4)/3 = 1.2, v2 (1/3 + 1/3 + 8/3)/3 = 10/9
TRI = t([[0, 0], [0, 0], [3, 0]])


def test_rfa_hand_computed():
    v, history = baselines.smoothed_weiszfeld(TRI, iters=2)
    torch.testing.assert_close(v, t([1 / 3, 0]))
    assert history == pytest.approx([4 / 3, 1.2, 10 / 9])
    d = baselines.rfa(TRI, iters=1)
    torch.testing.assert_close(d.update, t([0.6, 0]))
    assert d.accepted is None and d.details["objective"] == pytest.approx([4 / 3, 1.2])


def test_rfa_weighted_and_stop_rule_hand_computed():
    # Weights (1, 1, 2): alpha = (1/4, 1/4, 1/2), v0 = 1.5, every distance 1.5 -> v1 = 1.5 again: the objective
    # (1/4)(1.5) * 2 + (1/2)(1.5) = 1.5 does not change, so the ftol rule stops after one iteration of four.
    v, history = baselines.smoothed_weiszfeld(TRI, torch.tensor([1, 1, 2]))
    torch.testing.assert_close(v, t([1.5, 0]))
    assert history == pytest.approx([1.5, 1.5])


@pytest.mark.parametrize("n,d", SHAPES)
def test_rfa_agrees_with_definition(n, d):
    x = randn(n, d, seed=200 + n)
    w = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) + 0.5
    for weights, iters in ((None, 4), (w, 4), (None, 50)):
        ref_v, ref_h = ref_weiszfeld(x.numpy(), None if weights is None else weights.numpy(), iters=iters)
        v, h = baselines.smoothed_weiszfeld(x, weights, iters=iters)
        np.testing.assert_allclose(v.numpy(), ref_v, rtol=1e-5, atol=1e-9)
        assert len(h) == len(ref_h)
        np.testing.assert_allclose(h, ref_h, rtol=1e-5)
        np.testing.assert_allclose(baselines.rfa(x, weights, iters=iters).update.numpy(), ref_v, rtol=1e-5,
                                   atol=1e-9)


def test_rfa_objective_never_increases():
    for seed in range(5):
        x = randn(15, 40, seed=seed) * (1 + 10 * (torch.arange(15) < 3)[:, None])  # three spread-out rows
        _, history = baselines.smoothed_weiszfeld(x, iters=100, ftol=0)
        assert len(history) == 101
        assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:]))


def test_rfa_converges_to_a_geometric_median():
    # Optimality of the exact minimiser: sum_i (v - x_i) / ||v - x_i|| = 0 (no point coincides with v).
    x = randn(11, 20, seed=11)
    v, _ = baselines.smoothed_weiszfeld(x, iters=2000, ftol=0)
    units = [(v - row) / (v - row).norm() for row in x]
    assert torch.stack(units).sum(0).norm() < 1e-6
    # In one dimension with odd n the geometric median is the median.
    line = randn(9, 1, seed=12)
    v, _ = baselines.smoothed_weiszfeld(line, iters=1000)
    assert v.item() == pytest.approx(line.median().item(), abs=1e-4)


def test_rfa_is_permutation_invariant_and_fixes_identical_points():
    x, p = randn(10, 20, seed=13), perm(10)
    torch.testing.assert_close(baselines.rfa(x).update, baselines.rfa(x[p]).update)
    same = t([[1.5, -2.0, 3.0]]).expand(6, 3)
    torch.testing.assert_close(baselines.rfa(same).update, t([1.5, -2.0, 3.0]))


@pytest.mark.parametrize("n,k", [(5, 2), (9, 4), (20, 9)])
def test_rfa_with_outliers_stays_near_the_benign_updates(n, k):
    # Minsker (2015), Lemma 2.1: if at most a share alpha < 1/2 of the points lie farther than r from z, the
    # geometric median lies within C_alpha r of z, C_alpha = (1 - alpha) / sqrt(1 - 2 alpha). Here z is the
    # benign mean and r the largest benign distance to it; the converged RFA must obey the bound.
    for layout in range(3):
        x = outliers(n, k, seed=layout)
        if layout == 2:
            x[n - k:] = 1e9
        benign = x[:n - k]
        z = benign.mean(0)
        r = (benign - z).norm(dim=1).max().item()
        alpha = k / n
        v, _ = baselines.smoothed_weiszfeld(x, iters=1000, ftol=0)
        assert (v - z).norm().item() <= (1 - alpha) / math.sqrt(1 - 2 * alpha) * r * (1 + 1e-6)


def test_rfa_defaults_stop_far_from_the_benign_updates_under_huge_outliers():
    # A documented limitation of RFA's defaults, not a goal: started at the mean, each Weiszfeld step shrinks the
    # pull of a 4-of-9 cluster at 1e9 only by a factor of about 4/5, and the objective is dominated by the
    # outliers' distances, so its relative change drops under ftol = 1e-6 long before v reaches the benign rows.
    x = outliers(9, 4)
    x[5:] = 1e9
    assert baselines.rfa(x).update.abs().max() > 1e6                          # 4 iterations
    assert baselines.rfa(x, iters=1000).update.abs().max() > 1e3              # ftol stops it early
    assert baselines.rfa(x, iters=1000, ftol=0).update.abs().max() < 10       # converged: near the benign rows


def test_rfa_bad_weights_raise():
    with pytest.raises(ValueError, match="RFA"):
        baselines.rfa(TRI, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="RFA"):
        baselines.rfa(TRI, torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# The FedREDefense code's f / b
# ---------------------------------------------------------------------------------------------------------------

def test_fedredefense_code_f():
    assert 0.28 * 100 == 28.000000000000004
    assert baselines.fedredefense_code_f(100, 0.28) == 30
    assert baselines.fedredefense_code_f(25, 0.28) == 9   # 0.28 * 25 = 7.000000000000001 -> 8, + 1
    assert baselines.fedredefense_code_f(100, 0.2) == 21  # 0.2 * 100 == 20.0 exactly: 20 + 1
