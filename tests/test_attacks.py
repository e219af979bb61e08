"""Invariants of the attacks (those each attack's paper implies), on tiny tensors and a tiny CNN."""
import math

import pytest
import torch

import attacks
import data
import fl


pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Fang, partial knowledge
# ---------------------------------------------------------------------------------------------------------------

def fang_inputs():
    honest = randn(6, 40)
    honest[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=torch.float64)  # mean exactly 0
    return honest


def test_fang_standardised_deviation_in_band():
    honest = fang_inputs()
    out = attacks.fang(honest, 5, gen(1))
    assert out.shape == (5, 40)
    mu, sigma = honest.mean(0), honest.std(0)
    z = (out - mu) / sigma
    neg, pos = mu < 0, mu > 0
    assert neg.any() and pos.any()
    assert ((z[:, neg] >= 3) & (z[:, neg] <= 4)).all()
    assert ((z[:, pos] >= -4) & (z[:, pos] <= -3)).all()
    assert mu[0] == 0 and (out[:, 0] == 0).all()  # mu == 0 -> 0


def test_fang_independent_draws_and_determinism():
    honest = fang_inputs()
    out = attacks.fang(honest, 3, gen(7))
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(out, attacks.fang(honest, 3, gen(7)))
    assert not torch.allclose(out, attacks.fang(honest, 3, gen(8)))


def test_fang_fewer_than_two_known_updates_gives_zero():
    assert torch.equal(attacks.fang(randn(1, 10), 4, gen()), torch.zeros(4, 10, dtype=torch.float64))
    assert attacks.fang(randn(0, 10), 2, gen()).abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Fang, full knowledge
# ---------------------------------------------------------------------------------------------------------------

def fang_full_inputs():
    """Benign updates whose columns cover every case of Fang's rule: s_j = -1 with w_max,j > 0 and <= 0, s_j = +1
    with w_min,j > 0 and <= 0, and s_j = 0."""
    return torch.tensor([[-1.0, -3.0, 3.0, 1.0, 1.0],
                         [-2.0, -2.0, 2.0, 2.0, -1.0],
                         [0.5, -1.0, 1.0, -0.5, 0.0]], dtype=torch.float64)


def fang_full_interval(column):
    """Fang et al. 2020, Sec. 4, full knowledge, written out per coordinate: the interval each crafted value is
    drawn from, or None where s_j = 0 (the value is then 0)."""
    s = math.copysign(1, sum(column)) if sum(column) != 0 else 0
    w_max, w_min, b = max(column), min(column), 2.0
    if s < 0:
        return (w_max, b * w_max) if w_max > 0 else (w_max, w_max / b)
    if s > 0:
        return (w_min / b, w_min) if w_min > 0 else (b * w_min, w_min)
    return None


def test_fang_full_draws_uniformly_from_the_interval_beyond_the_benign_range():
    benign = fang_full_inputs()
    out = attacks.fang_full(benign, 4000, gen(3))
    assert out.shape == (4000, 5)
    for j in range(5):
        interval = fang_full_interval(benign[:, j].tolist())
        if interval is None:
            assert (out[:, j] == 0).all()
            continue
        lo, hi = interval
        values = out[:, j]
        assert ((values >= lo - 1e-12) & (values <= hi + 1e-12)).all(), j
        # uniform over the whole interval: the draws reach both ends and average to its midpoint
        assert values.min() < lo + 0.01 * (hi - lo) and values.max() > hi - 0.01 * (hi - lo)
        assert abs(values.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo)


def test_fang_full_rows_differ_one_known_update_suffices_and_none_gives_zero():
    benign = fang_full_inputs()
    out = attacks.fang_full(benign, 3, gen(5))
    assert not torch.equal(out[0], out[1]) and torch.equal(out, attacks.fang_full(benign, 3, gen(5)))
    single = torch.tensor([[2.0, -4.0]], dtype=torch.float64)  # s = (+1, -1); w_max = w_min = the update
    out = attacks.fang_full(single, 50, gen())
    assert ((out[:, 0] >= 1.0) & (out[:, 0] <= 2.0)).all() and ((out[:, 1] >= -4.0) & (out[:, 1] <= -2.0)).all()
    assert torch.equal(attacks.fang_full(randn(0, 6), 2, gen()), torch.zeros(2, 6, dtype=torch.float64))


def test_craft_runs_fangs_full_knowledge_attack_only_under_full_knowledge():
    honest, kw = craft_inputs(q=3)
    known = randn(8, honest.shape[1], seed=9)
    full = attacks.craft("fang", honest, known, generator=gen(2), knowledge="full", **kw)
    assert torch.equal(full, attacks.fang_full(known, 3, gen(2)))
    partial = attacks.craft("fang", honest, known, generator=gen(2), **kw)
    assert torch.equal(partial, attacks.fang(known, 3, gen(2)))
    assert torch.equal(attacks.craft("fang", honest, known, generator=gen(2), knowledge="partial", **kw), partial)
    # against Krum, Fang's Krum attack whatever the knowledge
    krum = attacks.craft("fang", honest, known, generator=gen(2), knowledge="full", krum_f=3, **kw)
    assert torch.equal(krum, attacks.fang_krum(known, 3, 3, gen(2), n_participants=kw["n_participants"]))
    with pytest.raises(ValueError):
        attacks.craft("fang", honest, known, generator=gen(2), knowledge="oracle", **kw)


# ---------------------------------------------------------------------------------------------------------------
# LIE
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,q,z", [(100, 28, 0.46925), (50, 10, 0.25335), (100, 8, 0.0818), (100, 48, 1.5744)])
def test_lie_z_worked_values(n, q, z):
    assert attacks.lie_z(n, q) == pytest.approx(z, abs=1e-4)


@pytest.mark.parametrize("n,q", [(100, 51), (100, 72), (10, 6), (2, 0)])
def test_lie_undefined_z_raises(n, q):
    with pytest.raises(ValueError, match="LIE"):
        attacks.lie(randn(4, 5), n, q)


def test_lie_formula_identical_rows():
    honest = randn(7, 30)
    out = attacks.lie(honest, 100, 28)
    assert out.shape == (28, 30)
    expected = honest.mean(0) - attacks.lie_z(100, 28) * honest.std(0, unbiased=False)
    assert torch.allclose(out, expected.expand(28, 30))
    assert (out == out[0]).all()


def test_lie_equal_updates_and_edge_cases():
    same = randn(1, 12).repeat(5, 1)
    assert torch.allclose(attacks.lie(same, 20, 5), same)  # sigma = 0
    assert torch.equal(attacks.lie(randn(1, 12), 20, 3), torch.zeros(3, 12, dtype=torch.float64))
    honest = randn(4, 6)
    out = attacks.lie(honest, 100, 72, z=1.0)  # explicit z bypasses the majority check
    assert torch.allclose(out[0], honest.mean(0) - honest.std(0, unbiased=False))


# ---------------------------------------------------------------------------------------------------------------
# Min-Max, Min-Sum
# ---------------------------------------------------------------------------------------------------------------

def sq(a, b):
    return (a - b).pow(2).sum(-1)


def gamma_of(out, honest):
    """Recover gamma from out = mu - gamma * std."""
    p = honest.std(0)
    return float((honest.mean(0) - out) @ p / (p @ p))


def minmax_feasible(honest, gamma):
    v = honest.mean(0) - gamma * honest.std(0)
    bound = max(float(sq(honest, h).max()) for h in honest)
    return float(sq(honest, v).max()) <= bound


def test_min_max_feasible_and_at_the_boundary():
    honest = randn(6, 25)
    out = attacks.min_max(honest)
    assert out.shape == (25,)
    gamma = gamma_of(out, honest)
    assert 0 < gamma < 2 * 30.0
    assert torch.allclose(out, honest.mean(0) - gamma * honest.std(0))
    assert minmax_feasible(honest, 0.0)  # mu lies in the convex hull
    assert minmax_feasible(honest, gamma)
    assert not minmax_feasible(honest, gamma + 10 * 1e-5)
    # Exact boundary: smallest positive root over i of ||mu - g_i - gamma p||^2 = D_max.
    mu, p = honest.mean(0), honest.std(0)
    d_max = max(float(sq(honest, h).max()) for h in honest)
    roots = []
    for h in honest:
        a = mu - h
        A, B, C = float(p @ p), -2 * float(a @ p), float(a @ a) - d_max
        roots.append((-B + math.sqrt(B * B - 4 * A * C)) / (2 * A))
    assert gamma == pytest.approx(min(roots), abs=1e-4)


def test_min_max_saturates_below_twice_gamma_init():
    honest = randn(6, 25)
    gamma = gamma_of(attacks.min_max(honest, gamma_init=0.01), honest)
    assert 0.01 < gamma < 0.02 and gamma == pytest.approx(0.02, abs=1e-4)


def test_min_sum_matches_closed_form_and_is_feasible():
    honest = randn(8, 30, seed=3)
    out = attacks.min_sum(honest)
    mu, p, m = honest.mean(0), honest.std(0), len(honest)
    bound = min(float(sq(honest, h).sum()) for h in honest)
    assert float(sq(honest, out).sum()) <= bound
    # cross term vanishes: sum_i ||mu - gamma p - g_i||^2 = sum_i ||mu - g_i||^2 + m gamma^2 ||p||^2
    gamma_star = math.sqrt((bound - float(sq(honest, mu).sum())) / (m * float(p @ p)))
    assert gamma_of(out, honest) == pytest.approx(min(gamma_star, 2 * 30.0), abs=1e-4)
    gamma_small = gamma_of(attacks.min_sum(honest, gamma_init=gamma_star / 4), honest)
    assert gamma_small == pytest.approx(gamma_star / 2, abs=1e-4)  # saturated at ~2 gamma_init


@pytest.mark.parametrize("fn", [attacks.min_max, attacks.min_sum])
def test_optimisation_attacks_edge_cases(fn):
    same = randn(1, 9).repeat(4, 1)
    assert torch.allclose(fn(same), same[0])  # p = 0 -> mu
    assert torch.equal(fn(randn(1, 9)), torch.zeros(9, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# MPAF, sign flip
# ---------------------------------------------------------------------------------------------------------------

def test_mpaf():
    w_base, w_global = randn(50, seed=1), randn(50, seed=2)
    delta = attacks.mpaf(w_base, w_global)
    assert torch.allclose(delta / 3.0, w_base - w_global)
    assert torch.allclose(w_global + attacks.mpaf(w_base, w_global, scale=1.0), w_base)
    assert torch.equal(attacks.mpaf(w_base, w_base.clone()), torch.zeros(50, dtype=torch.float64))


def test_sign_flip():
    honest = randn(3, 20)
    out = attacks.sign_flip(honest)
    assert torch.allclose(torch.cosine_similarity(out, honest, dim=1), -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(attacks.sign_flip(honest, k=4.0).norm(dim=1), 4 * honest.norm(dim=1))
    assert attacks.sign_flip(honest, k=0.0).abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Gaussian
# ---------------------------------------------------------------------------------------------------------------

SIZES = [4000, 3000, 1]


def gaussian_inputs():
    w_global = randn(sum(SIZES), seed=1)
    honest = randn(2, sum(SIZES), seed=2) * 0.1
    honest[:, 4000:7000] += 0.5  # a different mean in the second tensor
    return honest, w_global


def test_gaussian_per_tensor_statistics():
    honest, w_global = gaussian_inputs()
    out = attacks.gaussian(honest, w_global, SIZES, gen(5))
    assert out.shape == honest.shape
    theta, theta_tilde = w_global + honest, w_global + out
    start = 0
    for size in SIZES[:2]:
        block, new = theta[:, start:start + size], theta_tilde[:, start:start + size]
        mean, std = block.mean(1), block.std(1)
        se = std / math.sqrt(size)
        assert ((new.mean(1) - mean).abs() < 3 * se).all()
        assert ((new.std(1) - std).abs() < 3 * std / math.sqrt(2 * size)).all()
        start += size
    assert torch.allclose(out[:, -1], honest[:, -1])  # a 1-entry tensor keeps its value (sigma = 0)


def test_gaussian_depends_only_on_per_tensor_mean_and_std():
    honest, w_global = gaussian_inputs()
    theta = w_global + honest
    permuted = theta.clone()
    start = 0
    for size in SIZES:
        perm = torch.randperm(size, generator=gen(size))
        permuted[:, start:start + size] = theta[:, start + perm]
        start += size
    a = attacks.gaussian(honest, w_global, SIZES, gen(9))
    b = attacks.gaussian(permuted - w_global, w_global, SIZES, gen(9))
    assert torch.allclose(a, b, atol=1e-9)
    assert torch.equal(a, attacks.gaussian(honest, w_global, SIZES, gen(9)))
    assert not torch.allclose(a, attacks.gaussian(honest, w_global, SIZES, gen(10)))


def test_gaussian_rejects_wrong_sizes():
    honest, w_global = gaussian_inputs()
    with pytest.raises(ValueError):
        attacks.gaussian(honest, w_global, SIZES[:2], gen())


# ---------------------------------------------------------------------------------------------------------------
# Backdoors (Scaling, DBA)
# ---------------------------------------------------------------------------------------------------------------

def tiny_setup():
    torch.manual_seed(0)
    model = fl.CNN(1, 8, 10)
    w_global = fl.flatten_params(model).clone()
    x = torch.randn(40, 1, 8, 8, generator=gen(11))
    y = torch.randint(0, 10, (40,), generator=gen(12))
    x_poisoned = x.clone()
    x_poisoned[:, 0, 6, 6] = 1.0  # stand-in for data.add_trigger
    return model, w_global, x, y, x_poisoned


def replay(model, w_global, passes, lr, seed):
    """Train from w_global over the (x, y) passes in order with one generator; return w_local - w_global.

    Loads a copy: fl.load_params (vector_to_parameters) makes the parameters views of the vector it is given.
    """
    fl.load_params(model, w_global.clone())
    g = gen(seed)
    for x, y in passes:
        fl.sgd_epoch(model, x, y, lr, g)
    return fl.flatten_params(model) - w_global


def test_backdoor_scaling_identity_and_replay():
    model, w_global, x, y, xp = tiny_setup()
    w_before = w_global.clone()
    lr = 0.05
    target = torch.zeros(len(xp), dtype=torch.long)
    for epochs in (1, 2):
        update = attacks.backdoor_update(model, w_global, x, y, xp, 0, lr, gen(3), scale=3.0, epochs=epochs)
        assert torch.equal(w_global, w_before)  # not modified in place
        expected = replay(model, w_global, [(xp, target), (x, y)] * epochs, lr, 3)  # poisoned pass, clean pass
        assert torch.allclose(update, 3.0 * expected, rtol=1e-6, atol=1e-8)
    unscaled = attacks.backdoor_update(model, w_global, x, y, xp, 0, lr, gen(3), scale=1.0)
    scaled = attacks.backdoor_update(model, w_global, x, y, xp, 0, lr, gen(3))
    assert torch.allclose(scaled, 3.0 * unscaled, rtol=1e-6, atol=1e-8)
    assert unscaled.abs().sum() > 0


def test_backdoor_differs_from_honest_update_and_is_deterministic():
    model, w_global, x, y, xp = tiny_setup()
    honest = replay(model, w_global, [(x, y)], 0.05, 3)
    poisoned = attacks.backdoor_update(model, w_global, x, y, xp, 0, 0.05, gen(3), scale=1.0)
    assert not torch.allclose(poisoned, honest, atol=1e-4)
    again = attacks.backdoor_update(model, w_global, x, y, xp, 0, 0.05, gen(3), scale=1.0)
    assert torch.equal(poisoned, again)


def output_changes(model, shape, pixel):
    """Whether the model's outputs change when channel 0 of ``pixel`` changes, on 4 random images."""
    x = torch.randn(4, *shape, generator=gen(5))
    x2 = x.clone()
    x2[:, 0, pixel[0], pixel[1]] += 3.0
    with torch.no_grad():
        return not torch.equal(model(x), model(x2))


def test_the_papers_cnn_on_28_pixels_never_reads_the_last_two_rows_and_columns():
    # Valid 3x3 conv: 28 -> 26 rows; 2x2 pool: 13; conv: 11; pool floors to 5, using conv rows 0-9 only, which read
    # pool rows 0-11, conv rows 0-23, input rows 0-25. So rows and columns 26-27 never reach the output.
    torch.manual_seed(0)
    model = fl.CNN(1, 28)
    for pixel in [(26, 26), (24, 26), (26, 24), (27, 0), (0, 27)]:
        assert not output_changes(model, (1, 28, 28), pixel)
    for pixel in [(25, 25), (23, 25), (25, 23), (24, 24), (0, 0)]:
        assert output_changes(model, (1, 28, 28), pixel)


@pytest.mark.parametrize("name, shape, moved", [
    ("cnn", (1, 28, 28), True), ("cnn", (3, 32, 32), False), ("cnn", (1, 8, 8), False),
    ("mlp", (1, 28, 28), False), ("convnet", (1, 28, 28), False)])
def test_the_trigger_moves_only_where_the_model_cannot_read_it(name, shape, moved):
    torch.manual_seed(0)
    model = fl.MODELS[name](shape[0], shape[1])
    code = data.trigger_pixels(shape[1])
    pixels = attacks.visible_trigger(model, code, shape)
    if moved:  # one pixel up and left of the code's (26,26), (24,26), (26,24), (25,25)
        assert pixels == [(25, 25), (23, 25), (25, 23), (24, 24)]
    else:
        assert pixels == code
    assert all(output_changes(model, shape, p) for p in pixels)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------

def craft_inputs(q=4):
    model = fl.CNN(1, 8, 10)
    sizes = fl.param_sizes(model)
    d = sum(sizes)
    w_init = torch.randn(d, generator=gen(1))
    w_global = w_init + 0.1 * torch.randn(d, generator=gen(2))
    honest = 0.01 * torch.randn(q, d, generator=gen(3))
    return honest, dict(n_participants=20, w_global=w_global, w_init=w_init, sizes=sizes)


def test_attack_lists():
    assert attacks.ATTACKS == ("none", "fang", "lie", "minmax", "minsum", "mpaf", "scaling", "dba", "signflip",
                               "gaussian", "labelflip", "targeted-labelflip", "adaptive-labelflip",
                               "adaptive-targeted-labelflip")
    honest, kw = craft_inputs()
    for name in attacks.ATTACKS:  # each name is crafted by `craft` or trains on poisoned data, never both
        if name in attacks.CRAFTED:
            assert attacks.craft(name, honest, honest, generator=gen(), **kw).shape == honest.shape
        else:
            with pytest.raises(ValueError):
                attacks.craft(name, honest, honest, generator=gen(), **kw)
    assert set(attacks.BACKDOOR) == {"scaling", "dba"}


@pytest.mark.parametrize("name", attacks.CRAFTED)
def test_craft_shape_finite_and_deterministic(name):
    honest, kw = craft_inputs()
    out = attacks.craft(name, honest, honest, generator=gen(4), **kw)
    assert out.shape == honest.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out, attacks.craft(name, honest, honest, generator=gen(4), **kw))
    if name in ("lie", "minmax", "minsum", "mpaf"):
        assert (out == out[0]).all()
    if name == "mpaf":
        assert torch.allclose(out[0], 3.0 * (kw["w_init"] - kw["w_global"]))
    if name == "signflip":
        assert torch.equal(out, -honest)
        assert torch.equal(attacks.craft(name, honest, honest, generator=gen(), signflip_k=4.0, **kw), -4 * honest)


def test_lie_in_a_round_of_attackers_only_sends_the_centre_of_what_they_know():
    """A defense that expels benign clients can leave a round of attackers only; LIE's z_max is then undefined
    (lie_z raises) and every attacker sends the coordinate-wise mean of the known updates (z = 0)."""
    honest, kw = craft_inputs(q=4)
    with pytest.raises(ValueError):
        attacks.lie_z(4, 4)
    out = attacks.craft("lie", honest, honest, generator=gen(), **{**kw, "n_participants": 4})
    assert torch.allclose(out, honest.mean(0).expand(4, -1))
    # a minority still uses z_max: the rows move away from the mean by z * sigma
    out = attacks.craft("lie", honest, honest, generator=gen(), **kw)
    z = attacks.lie_z(20, 4)
    assert torch.allclose(out[0], honest.mean(0) - z * honest.std(0, unbiased=False), atol=1e-7)


def test_craft_takes_its_statistics_from_the_known_set_and_its_own_rows_from_honest():
    """Knowledge: Fang's mu and sigma come from ``known`` (e.g. every participant's genuine update, full
    knowledge), not from the attackers' own rows; sign-flip transforms the attackers' own rows only."""
    honest, kw = craft_inputs(q=2)
    known = 1.0 + 0.5 * torch.randn(6, honest.shape[1], generator=gen(7))  # far from `honest`, mean ~ +1
    mu, sigma = known.mean(0), known.std(0)
    z = (attacks.craft("fang", honest, known, generator=gen(8), **kw) - mu) / sigma
    down = mu > 0
    assert z.shape == honest.shape and (z[:, down] <= -3 + 1e-4).all() and (z[:, down] >= -4 - 1e-4).all()
    assert torch.equal(attacks.craft("signflip", honest, known, generator=gen(), **kw), -honest)
    lie = attacks.craft("lie", honest, known, generator=gen(), **kw)[0]
    assert torch.allclose(lie, mu - attacks.lie_z(20, 2) * known.std(0, unbiased=False))


@pytest.mark.parametrize("name", ["scaling", "dba", "none", "krum"])
def test_craft_unknown_name_raises(name):
    honest, kw = craft_inputs()
    with pytest.raises(ValueError):
        attacks.craft(name, honest, honest, generator=gen(), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Fang attack on Krum
# ---------------------------------------------------------------------------------------------------------------

def ref_krum_index(x, f):
    """Krum from its definition (squared distances, n - f - 2 nearest others, ties to the lowest index)."""
    x = x.double().numpy()
    n = len(x)
    scores = [sum(sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)[:n - f - 2])
              for i in range(n)]
    return min(range(n), key=lambda i: (scores[i], i))


def ref_fang_krum_bound(known, c, n):
    """Fang's lambda_0 (Fang et al., USENIX Security 2020, sec. 4), neighbours clamped to the known set."""
    x = known.double().numpy()
    m, d = x.shape
    sums = [sum(sorted(math.dist(x[i], x[l]) for l in range(m) if l != i)[:min(n - c - 2, m - 1)])
            for i in range(m)]
    return min(sums) / ((n - 2 * c - 1) * math.sqrt(d)) + max(math.hypot(*row) for row in x) / math.sqrt(d)


def fang_krum_cases():
    """(known, c, f, n_participants): full knowledge, a case that needs halving, and partial knowledge."""
    return [
        (0.3 * randn(16, 50, seed=1) + 0.1, 6, 6, None),
        (randn(20, 50, seed=2) + 0.1, 4, 4, None),
        (0.5 * randn(10, 50, seed=3) + 0.1, 3, 3, None),
        (randn(7, 50, seed=4) + 0.1, 7, 7, 25),       # 7 attackers knowing only their own 7 updates, n = 25
    ]


def is_power_of_two(r):
    return r >= 1 and r == 2.0 ** round(math.log2(r))


def test_fang_krum_wins_krum_with_minus_lambda_sign_and_small_noise():
    halved = False
    for known, c, f, n in fang_krum_cases():
        lam, lam0 = attacks.fang_krum_lambda(known, c, f, n_participants=n)
        out = attacks.fang_krum(known, c, f, gen(5), n_participants=n)
        assert out.shape == (c, known.shape[1]) and out.dtype == known.dtype
        assert lam >= 1e-5
        assert ref_krum_index(torch.cat([known, out]), f) >= len(known)  # Krum selects a crafted update
        s = torch.sign(known.mean(0))
        assert torch.equal(out[0], -lam * s)
        assert (out[0].abs()[s != 0] == lam).all()
        assert lam <= lam0 and is_power_of_two(lam0 / lam)
        halved |= lam < lam0
        noise = (out[1:] - out[0]).norm(dim=1)
        assert (noise <= 0.01 + 1e-12).all() and (noise > 0).all()
    assert halved  # at least one case exercises the halving


def test_fang_krum_bound_formula_and_fallbacks():
    for known, c, f, n in fang_krum_cases():
        n_round = len(known) + c if n is None else n
        assert attacks.fang_krum_bound(known, c, n) == pytest.approx(ref_fang_krum_bound(known, c, n_round),
                                                                     rel=1e-9)
    known = randn(7, 20)
    assert attacks.fang_krum_bound(known, 7) == 1.0                      # n = 14, c = 7: n - 2c - 1 < 0
    assert attacks.fang_krum_bound(known, 3, n_participants=7) == 1.0   # n - 2c - 1 = 0
    assert attacks.fang_krum_bound(torch.zeros(5, 20, dtype=torch.float64), 1) == 1.0  # bound 0
    assert attacks.fang_krum_bound(randn(0, 20), 2, n_participants=10) == 1.0
    one = randn(1, 20)  # a single known update: no neighbours, only the norm term
    assert attacks.fang_krum_bound(one, 1, n_participants=10) == pytest.approx(one.norm().item() / math.sqrt(20))


def test_fang_krum_zero_direction_coordinates_stay_zero():
    known = randn(12, 30, seed=6) + 0.2
    known[:, 0] = torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)  # mean exactly 0
    out = attacks.fang_krum(known, 3, 3, gen(1), eps=0.0)
    assert (out[:, 0] == 0).all() and (out == out[0]).all()


def test_fang_krum_search_that_never_succeeds_keeps_the_last_lambda():
    # One attacker against a tight cluster around +5: -lambda s is near the origin for every lambda, so Krum never
    # picks it and lambda is halved until it first drops under lambda_min.
    known = 5 + 0.01 * randn(8, 10, seed=7)
    lam, lam0 = attacks.fang_krum_lambda(known, 1, 1)
    assert lam < 1e-5 <= 2 * lam and is_power_of_two(lam0 / lam)
    out = attacks.fang_krum(known, 1, 1, gen())
    assert out.shape == (1, 10) and torch.equal(out[0], -lam * torch.ones(10, dtype=torch.float64))
    lam, _ = attacks.fang_krum_lambda(known, 1, 1, lambda_min=1e-2)
    assert 0.5e-2 <= lam < 1e-2


def test_fang_krum_edge_cases():
    known = randn(3, 10, seed=8)
    lam0 = attacks.fang_krum_bound(known, 1)
    assert attacks.fang_krum_lambda(known, 1, 3) == (lam0, lam0)  # 4 - 3 - 2 < 1: Krum cannot be simulated
    assert torch.equal(attacks.fang_krum(randn(0, 10), 4, 1, gen()), torch.zeros(4, 10, dtype=torch.float64))
    assert attacks.fang_krum(known, 0, 1, gen()).shape == (0, 10)


def test_fang_krum_deterministic_under_a_seed():
    known, c, f, n = fang_krum_cases()[0]
    a = attacks.fang_krum(known, c, f, gen(3), n_participants=n)
    assert torch.equal(a, attacks.fang_krum(known, c, f, gen(3), n_participants=n))
    b = attacks.fang_krum(known, c, f, gen(4), n_participants=n)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])


# ---------------------------------------------------------------------------------------------------------------
# Label flips and the adaptive scaling attack
# ---------------------------------------------------------------------------------------------------------------

GRID = [1 + 0.125 * k for k in range(32)]  # every lambda Algorithm 3 can reach from 1 with delta 2 .. 0.125


THRESHOLDS = [0.5, 1.0, 1.1, 1.125, 1.9, 2.0, 3.0, 3.3, 4.8, 4.875, 10.0]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_adaptive_scale_finds_the_largest_grid_lambda_that_passes_in_five_calls(threshold):
    """FedREDefense Algorithm 3 (sec. 6.1): on a monotone pass/fail (lambda passes iff lambda <= threshold) the binary
    search returns the largest grid point that passes (1 if none above 1 does, 4.875 at most), in 5 calls."""
    g = torch.tensor([[1.0, -2.0]])
    calls = []
    def passes(trials):
        calls.append(trials[0, 0].item())  # the trial lambda, since g[0] = 1
        return trials[:, 0] <= threshold
    lams, scaled = attacks.adaptive_scale(g, passes)
    assert lams == [max([x for x in GRID if x <= threshold], default=1.0)]
    assert torch.equal(scaled, lams[0] * g) and len(calls) == 5 and calls[0] == 3.0


def test_adaptive_scale_searches_for_all_attackers_at_once_as_for_each_alone():
    """Issue 30, item 2: k attackers search together, one call per step with every attacker's trial, and each
    gets the lambdas (every trial and the result) of its own search alone, here against a threshold per row."""
    thresholds = torch.tensor(THRESHOLDS)
    g = torch.stack([torch.tensor([1.0, -2.0]) * (1 + i) for i in range(len(THRESHOLDS))])
    def search(rows):
        calls = []
        def passes(trials):
            calls.append((trials[:, 0] / g[rows, 0]).tolist())  # each row's trial lambda
            return trials[:, 0] / g[rows, 0] <= thresholds[rows]
        return (*attacks.adaptive_scale(g[rows], passes), calls)
    lams, scaled, calls = search(list(range(len(g))))
    assert len(calls) == 5 and all(len(c) == len(g) for c in calls)
    for i in range(len(g)):
        lam_i, scaled_i, calls_i = search([i])
        assert [lams[i]] == lam_i and torch.equal(scaled[i:i + 1], scaled_i)
        assert [c[i] for c in calls] == [c[0] for c in calls_i]
    assert len(set(lams)) > 5  # the rows do take different paths


def test_adaptive_attackers_against_a_whole_round_rule_search_in_turn():
    """A defense without its own ``attacker_test`` decides on the whole round, so each attacker searches on the
    round as the earlier attackers left it: here a rule that accepts everyone while the round's summed update stays
    under a norm of 10, so the first attacker takes most of the room and the later ones what is left. Written out
    as Algorithm 3's loop, one attacker after the other, on deep copies of the rule (whose state must not move)."""
    class SumBound:
        calls = 0

        def __call__(self, updates, rnd):
            self.calls += 1
            ok = bool(updates.sum(0).norm() <= 10)
            return fl.Decision(update=updates.mean(0), accepted=torch.full((len(updates),), ok))
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    rnd = fl.Round(0, [0, 1, 2, 3], torch.zeros(2), torch.ones(4), torch.tensor([True, True, True, False]))
    defense, scaled = SumBound(), g.clone()
    lambdas = attacks.adaptive_attack(defense, scaled, [0, 1, 2], rnd)
    assert defense.calls == 0
    expected = g.clone()
    for i in range(3):
        lam, delta = 1.0, 2.0
        while delta >= 0.125:
            lam += delta
            trial = expected.clone()
            trial[i] = lam * g[i]
            if not trial.sum(0).norm() <= 10:
                lam -= delta
            delta /= 2
        expected[i] = lam * g[i]
        assert lambdas[i] == lam
    assert torch.equal(scaled, expected) and len(set(lambdas.values())) > 1, lambdas


def test_label_flip_maps():
    """Label flip: y -> (y + 1) mod C is a bijection without fixed points; targeted: only class 0 changes, to 2."""
    y = torch.arange(10).repeat(3)
    for name in ("labelflip", "adaptive-labelflip"):
        flipped = attacks.flip_labels(name, y, 10)
        assert sorted(flipped[:10].tolist()) == list(range(10)) and not (flipped == y).any()
        assert flipped[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    for name in ("targeted-labelflip", "adaptive-targeted-labelflip"):
        flipped = attacks.flip_labels(name, y, 10)
        assert flipped[y == 0].tolist() == [2, 2, 2] and torch.equal(flipped[y != 0], y[y != 0])


def test_targeted_success_rate_counts_source_images_sent_to_the_target(monkeypatch):
    """Targeted label flip's ASR on a hand-built case: of the four class-0 images, two are predicted 2; the
    class-1/2 images predicted 2 do not count."""
    y = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    predictions = torch.tensor([2, 2, 1, 0, 2, 2, 0])
    monkeypatch.setattr(fl, "predict", lambda model, w, x: predictions[x])  # x holds indices here
    assert fl.targeted_success_rate(None, None, torch.arange(7), y, source=0, target=2) == 0.5
