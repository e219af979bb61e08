"""FedREDefense: the unrolled simulation, the error, Algorithm 2 on real updates, and Algorithm 1's decisions."""
import dataclasses

import pytest
import torch

import attacks
import bench
import data
import fedredefense as fr
import fl

HP = fr.HYPER["digits"]


def initial(n, generator_seed=0):
    k = fr.initial_knowledge((1, 8, 8), 10, HP, torch.Generator().manual_seed(generator_seed), "cpu")
    return fr.Knowledge.stack([k] * n)


# (LR of images, LR of labels, initial alpha, LR of alpha, first cap, later cap) of each dataset: the FedREDefense
# paper's Table 7, and the authors' scripts/{FashionMNIST,cifar10,cinic}/ours.sh at commit 6c80ea1 (lr_img,
# lr_label, lr_teacher, lr_lr, Iteration, Max_Iter).
TABLE_7 = {"fmnist": (0.1, 0.05, 0.1, 5e-5, 5000, 5000), "cifar10": (0.1, 0.05, 0.05, 5e-5, 500, 1500),
           "cinic10": (0.1, 0.05, 0.05, 5e-5, 2000, 4000)}
SCRIPTS = {"fmnist": (0.5, 0.2, 0.1, 5e-6, 800, 2000), "cifar10": (0.1, 0.05, 0.05, 5e-5, 500, 1500),
           "cinic10": (0.1, 0.05, 0.05, 5e-5, 2000, 4000)}


def test_the_settings_are_table_7s_and_the_authors_scripts():
    row = lambda hp: (hp.lr_images, hp.lr_labels, hp.alpha_init, hp.lr_alpha, hp.first_iters, hp.max_iters)
    assert {d: row(fr.SETTINGS["paper"][d]) for d in TABLE_7} == TABLE_7
    assert fr.SETTINGS["paper"]["mnist"] == fr.SETTINGS["paper"]["fmnist"]
    assert {d: row(hp) for d, hp in fr.SETTINGS["official"].items()} == SCRIPTS  # these three datasets only
    # N = syn_steps 5, gamma 0.6, 10 images (--ipc 1), outer momentum 0.5: the paper's and the code's everywhere
    for hp in [*fr.SETTINGS["paper"].values(), *fr.SETTINGS["official"].values()]:
        assert (hp.inner_steps, hp.gamma, hp.n_images, hp.momentum) == (5, 0.6, 10, 0.5)


def test_reconstruction_error():
    g = torch.tensor([[3.0, 4.0]])
    assert fr.reconstruction_error(g, g).item() == pytest.approx(0.0, abs=1e-9)
    assert fr.reconstruction_error(torch.zeros(1, 2), g).item() == pytest.approx(1.0)  # the empty reconstruction
    zero = fr.reconstruction_error(torch.ones(1, 2), torch.zeros(1, 2))  # a zero update: no division by zero
    assert torch.isfinite(zero).all() and zero.item() > 1e8


def test_simulate_training_is_gradient_descent_and_differentiable(digits_round):
    model, w, _, _ = digits_round
    k = fr.initial_knowledge((1, 8, 8), 10, HP, torch.Generator().manual_seed(0), "cpu")
    images, labels = k.images.requires_grad_(True), k.label_logits.requires_grad_(True)
    alpha = k.alpha.requires_grad_(True)
    layers = fl.unflatten(model, w)
    w1 = torch.cat([p.reshape(-1) for p in fr.simulate_training(model, layers, images, labels, alpha, steps=1)])
    # one step by hand, on the flat vector: w - alpha * grad f(K, w)
    v = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fr.soft_cross_entropy(fl.functional_forward(model, v, images), labels), v)
    assert torch.allclose(w1, w - alpha.detach() * grad, atol=1e-6)
    w5 = fr.simulate_training(model, layers, images, labels, alpha, steps=5)
    sum(p.pow(2).sum() for p in w5).backward()
    assert images.grad.abs().sum() > 0 and labels.grad.abs().sum() > 0 and alpha.grad != 0


@pytest.fixture(scope="module")
def first_reconstruction(digits_round):
    """Algorithm 2 from K^0 for two genuine updates, Fang and Gaussian, capped at 400 iterations (the genuine
    ones need 204 and 227): (batch, errors, learned K, iterations)."""
    model, w, updates, _ = digits_round
    fang = attacks.fang(updates, 1, torch.Generator().manual_seed(1))
    gaussian = attacks.gaussian(updates[2:3], w, fl.param_sizes(model), torch.Generator().manual_seed(2))
    batch = torch.cat([updates[:2], fang, gaussian])
    return (batch, *fr.reconstruct(model, w, batch, initial(4), torch.full((4,), 400), HP))


@pytest.mark.xdist_group("first_reconstruction")  # one worker computes the fixture once
def test_genuine_update_reconstructs_under_gamma_and_crafted_does_not(first_reconstruction):
    """The paper's key finding (sec. 1) on real local training."""
    _, errors, _, iterations = first_reconstruction
    assert (errors[:2] < HP.gamma).all(), errors
    assert (errors[2:] > HP.gamma).all(), errors
    assert (iterations[:2] <= 400).all() and (iterations[2:] == 401).all()


def test_batched_reconstruction_equals_one_client_at_a_time(digits_round):
    """Clients are reconstructed together but must not influence each other (different early stops, caps)."""
    model, w, updates, _ = digits_round
    caps = torch.tensor([40, 5, 60])
    together, k_together, it_together = fr.reconstruct(model, w, updates[:3], initial(3), caps, HP)
    for i in range(3):
        alone, k_alone, it_alone = fr.reconstruct(model, w, updates[i:i + 1], initial(1), caps[i:i + 1], HP)
        assert alone.item() == pytest.approx(together[i].item(), rel=1e-4)
        assert it_alone.item() == it_together[i].item()
        assert torch.allclose(k_alone.images[0], k_together.images[i], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_reconstruct_equals_the_plain_flat_vector_loop_whatever_the_batching(digits_round, monkeypatch, batch):
    """The fast path (layers instead of one flat vector, clients vmapped ``batch`` at a time) computes what the
    benchmark's reference computes, the official code's plain loop on a flat vector, one client at a time, through
    the CNN as Table 5 writes it (ReLU before pooling): the same errors (1e-4 relative) and, after 6 outer steps,
    the same K (so the same outer gradients at every step). The batches run on two worker threads."""
    model, w, updates, _ = digits_round
    monkeypatch.setattr(fr, "clients_per_batch", lambda model, device: batch)
    monkeypatch.setattr(fl, "cores", lambda device: 2)
    hp = dataclasses.replace(HP, gamma=0.0)  # no early stop: every client takes all its steps
    gen = torch.Generator().manual_seed(5)
    k = fr.Knowledge(torch.randn(3, HP.n_images, 1, 8, 8, generator=gen),
                     torch.randn(3, HP.n_images, 10, generator=gen), HP.alpha_init * torch.tensor([1.0, 1.5, 0.5]))
    errors, learned, iterations = fr.reconstruct(model, w, updates[:3], k, torch.full((3,), 6), hp)
    assert iterations.tolist() == [7, 7, 7]
    for i, k_i in enumerate(k.unstack()):
        e_plain, k_plain = bench.plain_reconstruction(bench.TextbookCNN(1, 8), w, updates[i], k_i, 6, hp)
        assert errors[i].item() == pytest.approx(e_plain.item(), rel=1e-4)
        for fast, plain in zip((learned.images[i], learned.label_logits[i], learned.alpha[i]),
                               (k_plain.images, k_plain.label_logits, k_plain.alpha)):
            assert not torch.equal(plain, k_i.images) and torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("clients, most, cores, sizes", [
    (25, 32, 2, [25]), (10, 16, 2, [10]), (1, 16, 2, [1]),                  # they fit in one batch
    (25, 16, 2, [13, 12]), (100, 32, 2, [25, 25, 25, 25]), (100, 16, 2, [13, 13, 13, 13, 12, 12, 12, 12]),
    (3, 1, 2, [1, 1, 1]), (40, 16, 1, [14, 13, 13])])
def test_core_batches_are_one_or_even_at_most_most_and_a_multiple_of_the_cores(clients, most, cores, sizes):
    batches = fr.core_batches(torch.arange(clients) + 100, most, cores)
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches), torch.arange(clients) + 100)


@pytest.mark.xdist_group("first_reconstruction")  # one worker computes the fixture once
def test_early_stop_when_knowledge_already_reconstructs(digits_round, first_reconstruction):
    model, w, _, _ = digits_round
    batch, errors, learned, _ = first_reconstruction
    again, _, its_again = fr.reconstruct(model, w, batch[:1], fr.Knowledge.stack(learned.unstack()[:1]),
                                         torch.tensor([HP.max_iters]), HP)
    assert its_again.item() == 1 and again.item() == pytest.approx(errors[0].item(), rel=1e-4)  # an evaluation


def test_algorithm_1_flags_expels_and_keeps_knowledge(digits_round):
    model, w, updates, _ = digits_round
    hp = dataclasses.replace(HP, first_iters=300)  # twice what these two clients need (143, 147); keeps it quick
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    batch = torch.cat([updates[2:4], attacks.mpaf(w + 1.0, w)[None]])
    rnd = fl.Round(0, [5, 6, 7], w, torch.tensor([50, 50, 50]), torch.tensor([False, False, True]))
    decision = defense(batch, rnd)
    assert decision.accepted.tolist() == [True, True, False]
    assert decision.expel.tolist() == [False, False, True]
    assert torch.allclose(decision.update, batch[:2].mean(0))
    assert set(defense.knowledge) == {5, 6, 7}
    assert not torch.equal(defense.knowledge[5].images, defense.initial.images)


def test_copies_are_reconstructed_once_and_get_the_result_of_their_separate_reconstruction(digits_round,
                                                                                           monkeypatch, single_thread):
    """Issue 30, item 1: rows that are equal, start from the same K (the same object or equal tensors) and have
    the same cap share one reconstruction; each row's error, learned K and iterations equal, bit for bit, those
    of reconstructing every row separately (all rows in one ``reconstruct``, no sharing). A different K, or the
    same K under another cap, is not shared."""
    model, w, updates, _ = digits_round
    hp = dataclasses.replace(HP, first_iters=3, max_iters=4)
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    gen = torch.Generator().manual_seed(7)
    k_a = fr.Knowledge(torch.randn(HP.n_images, 1, 8, 8, generator=gen), torch.randn(HP.n_images, 10, generator=gen),
                       torch.tensor(HP.alpha_init))
    k_b = fr.Knowledge(k_a.images + 0.5, k_a.label_logits, k_a.alpha)
    knowledge = {3: k_a, 4: fr.Knowledge(*(t.clone() for t in k_a.tensors())), 5: k_b, 6: defense.initial}
    u0, u1 = updates[0], updates[1]
    batch = torch.stack([u0, u1, u0.clone(), u0, u0, u0, u0])
    clients = [0, 1, 2, 3, 4, 5, 6]  # 0-2 new (K^0, first cap); 3, 4 equal K; 5 another K; 6 K^0, later cap
    computed = []
    reconstruct = fr.reconstruct
    monkeypatch.setattr(fr, "reconstruct", lambda *a: computed.append(len(a[2])) or reconstruct(*a))
    flagged, errors, learned, iterations = defense.test(batch, clients, w, knowledge)
    assert computed == [5]  # {0, 2}, {1}, {3, 4}, {5}, {6}

    starts = fr.Knowledge.stack([knowledge.get(c, defense.initial) for c in clients])
    caps = torch.tensor([3, 3, 3, 4, 4, 4, 4])
    e_sep, k_sep, it_sep = reconstruct(model, w, batch, starts, caps, hp)
    assert torch.equal(errors, e_sep) and torch.equal(iterations, it_sep)
    assert all(torch.equal(a, b) for a, b in zip(learned.tensors(), k_sep.tensors()))
    assert torch.equal(flagged, ~(e_sep <= hp.gamma))
    assert len(set(errors.tolist())) == 5  # the five computations do differ
    learned.images[0] += 1  # the copies' learned K are their own tensors
    assert not torch.equal(learned.images[0], learned.images[2])


def test_zero_update_is_flagged_even_when_its_optimisation_overflows(digits_round):
    """MPAF at round 0 sends exactly 0 (w^0 = w^{t-1}): its error is huge and the outer step can overflow. The
    official code then returns NaN, which `> gamma` lets through; here the client keeps a finite error and is
    flagged."""
    model, w, updates, _ = digits_round
    defense = fr.FedREDefense(model, (1, 8, 8), 10, HP, torch.Generator().manual_seed(0), "cpu")
    batch = torch.cat([updates[:1], attacks.mpaf(w, w)[None]])
    decision = defense(batch, fl.Round(0, [0, 1], w, torch.tensor([50, 50]), torch.tensor([False, True])))
    assert decision.accepted.tolist() == [True, False]
    assert decision.errors[1] > 1e3 and not torch.isnan(decision.errors).any()


def _reference_error(model, images, label_logits, alpha, g, steps):
    """Alg. 2 lines 5-11 written out for one client, independently of the code under test: the parameters are a
    dict of per-layer tensors run through ``model`` with torch.func.functional_call, each inner gradient comes
    from torch.autograd.grad(..., create_graph=True), and the soft-label loss is spelled out (CE / classes)."""
    names = [name for name, _ in model.named_parameters()]
    w0 = [p.detach().clone().requires_grad_(True) for _, p in model.named_parameters()]
    classes = label_logits.shape[-1]
    w = w0
    for _ in range(steps):
        logits = torch.func.functional_call(model, dict(zip(names, w)), (images,))
        loss = -(label_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean() / classes
        grads = torch.autograd.grad(loss, w, create_graph=True)
        w = [p - alpha * d for p, d in zip(w, grads)]
    update = torch.cat([(p - p0).reshape(-1) for p, p0 in zip(w, w0)])  # named_parameters order (fl.py)
    return ((update - g).pow(2).sum() + 1e-9) / (g.pow(2).sum() + 1e-9)


def _reference_gradients(model, k, updates, steps):
    """Per client: (e, d e / d images, d e / d label logits, d e / d alpha) by a plain backward through the
    reference unrolled loop."""
    out = []
    for x, y, a, g in zip(k.images, k.label_logits, k.alpha, updates):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, a)]
        e = _reference_error(model, *leaves, g, steps)
        out.append((e.detach(), *torch.autograd.grad(e, leaves)))
    return out


def _problem(digits_round, dtype, n=3):
    """The digits CNN in ``dtype``, w^0, n real genuine updates and a distinct random K per client (so that a
    batching mix-up between clients would show), with distinct alphas."""
    import copy
    model, w, updates, _ = digits_round
    model = copy.deepcopy(model).to(dtype)
    gen = torch.Generator().manual_seed(123)
    k = fr.Knowledge(torch.randn(n, HP.n_images, 1, 8, 8, generator=gen),
                     torch.randn(n, HP.n_images, 10, generator=gen),
                     HP.alpha_init * (1 + 0.25 * torch.arange(n, dtype=torch.float32)))
    k = fr.Knowledge(k.images.to(dtype), k.label_logits.to(dtype), k.alpha.to(dtype))
    return model, fl.flatten_params(model), updates[:n].to(dtype), k


def test_outer_gradient_matches_plain_unrolled_reference(digits_round):
    """The outer gradient of e through the N unrolled inner steps (Alg. 2 lines 5-12), taken through
    simulated_updates (the CNN's hand-written inner gradient) + reconstruction_error for 3 clients at once,
    equals a per-client reference written directly from Algorithm 2 with torch.autograd (float64, so the
    agreement is to rounding). A detached inner gradient, a wrong step count, a wrong loss scale or clients
    leaking into each other's rows would all break it."""
    model, w, updates, k = _problem(digits_round, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (k.images, k.label_logits, k.alpha)]
    e = fr.reconstruction_error(fr.simulated_updates(model, w, *leaves, HP.inner_steps), updates)
    e.sum().backward()
    reference = _reference_gradients(model, k, updates, HP.inner_steps)
    for i, (e_ref, *grads_ref) in enumerate(reference):
        torch.testing.assert_close(e[i].detach(), e_ref, rtol=1e-12, atol=0)
        for leaf, grad_ref in zip(leaves, grads_ref):
            assert grad_ref.abs().max() > 0 and leaf.grad is not None  # not vacuous; the graph reaches K
            torch.testing.assert_close(leaf.grad[i], grad_ref, rtol=1e-10, atol=1e-12 * grad_ref.abs().max().item())


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32), (1, 8), (1, 7)])
def test_hand_written_cnn_simulation_equals_the_autograd_reference(channels, side):
    """cnn_simulated_updates (the fast path simulated_updates takes for fl.CNN) on the FashionMNIST CNN (Table 5:
    conv2's odd 11x11 output, whose last row and column pooling drops), the CIFAR CNN (Table 6, 3 channels), the
    digits CNN (padding 1) and an odd 7-px image: e and its gradient in K and alpha equal the per-client
    torch.autograd reference, float64, for 3 clients with their own K and alpha (so a client mix-up shows)."""
    torch.manual_seed(0)
    model = fl.CNN(channels, side).double()
    w = fl.flatten_params(model)
    gen = torch.Generator().manual_seed(5)
    k = fr.Knowledge(torch.randn(3, 10, channels, side, side, generator=gen, dtype=torch.float64),
                     torch.randn(3, 10, 10, generator=gen, dtype=torch.float64),
                     torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))
    updates = 1e-2 * torch.randn(3, len(w), generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (k.images, k.label_logits, k.alpha)]
    e = fr.reconstruction_error(fr.cnn_simulated_updates(model, w, *leaves, HP.inner_steps), updates)
    e.sum().backward()
    for i, (e_ref, *grads_ref) in enumerate(_reference_gradients(model, k, updates, HP.inner_steps)):
        torch.testing.assert_close(e[i].detach(), e_ref, rtol=1e-12, atol=0)
        for leaf, grad_ref in zip(leaves, grads_ref):
            assert grad_ref.abs().max() > 0
            torch.testing.assert_close(leaf.grad[i], grad_ref, rtol=1e-10, atol=1e-12 * grad_ref.abs().max().item())


@pytest.mark.parametrize("kind", [fr.Factored, fr.Dense])
def test_a_fully_connected_weight_is_the_explicit_weight_after_its_steps(kind):
    """Factored and Dense after three gradient steps: x W^T, d W and W - W0 equal those of the weight written
    out, W0 - sum of alpha_i d_out^T x per client (float64)."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    w0, lrs = rand(4, 6), torch.tensor([0.1, 0.3], dtype=torch.float64)
    factored, explicit = kind.start(w0, 2), w0.expand(2, 4, 6)
    for _ in range(3):
        d_out, x = rand(2, 5, 4), rand(2, 5, 6)
        factored = factored.step(lrs, d_out, x)
        explicit = explicit - lrs.view(2, 1, 1) * d_out.transpose(1, 2) @ x
    x, d = rand(2, 5, 6), rand(2, 5, 4)
    torch.testing.assert_close(factored.forward(x), x @ explicit.transpose(1, 2))
    torch.testing.assert_close(factored.backward(d), d @ explicit)
    torch.testing.assert_close(factored.delta(), explicit - w0)


@pytest.mark.parametrize("d_from_z", [False, True])
def test_conv_and_its_weight_gradient_have_autograds_gradients(d_from_z):
    """Conv and ConvWeightGradient, one sharing its patches' gradient with the other through their link, give the
    gradients autograd gives the plain products, float64, with d computed from z (as in cnn_gradient) and with d
    an independent leaf: either way the weight gradient's backward runs first and Conv stacks its term."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    patches, w, b, leaf = rand(2, 7, 12), rand(2, 5, 12), rand(2, 5), rand(2, 7, 5)
    r_z, r_w = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64), torch.randn(2, 5, 12, generator=gen,
                                                                                  dtype=torch.float64)

    def loss(conv, weight_gradient):
        z = conv(patches, w, b)
        d = z.tanh() * leaf if d_from_z else leaf
        return (z * r_z).sum() + (weight_gradient(d, patches) * r_w).sum()

    link = {}
    fast = torch.autograd.grad(loss(lambda p, w, b: fr.Conv.apply(p, w, b, link),
                                    lambda d, p: fr.ConvWeightGradient.apply(d, p, link)), (patches, w, b, leaf))
    plain = torch.autograd.grad(loss(lambda p, w, b: torch.baddbmm(b.unsqueeze(1), p, w.transpose(1, 2)),
                                     lambda d, p: d.transpose(1, 2) @ p), (patches, w, b, leaf))
    assert link == {}  # the term was taken
    for got, expected in zip(fast, plain):
        torch.testing.assert_close(got, expected)


def test_patches_and_col2im_are_adjoint_and_their_backwards_are_each_other():
    """<patches(x), y> = <x, col2im(y)>, and the autograd Functions' backwards are autograd's own."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3 * 5 * 4, 9 * 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close((fr.patches(x) * y).sum(), (x * fr.col2im(y, x.shape)).sum())
    for fast, plain, arg in ((fr.Patches.apply, fr.patches, x), (lambda t: fr.Col2im.apply(t, x.shape),
                                                                  lambda t: fr.col2im(t, x.shape), y)):
        out = fast(arg)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(out, arg, grad)[0],
                                   torch.autograd.grad(plain(arg), arg, grad)[0])


def test_one_outer_iteration_is_one_sgd_step_on_the_reference_gradient(digits_round):
    """reconstruct with a cap of 1: one evaluation, one outer update, one final evaluation. The velocity starts at
    zero, so the momentum-SGD step is K <- K - lr * grad with each part's own learning rate (Table 7), and the
    returned error is that of the updated K. gamma = 0 rules out an early stop. reconstruct keeps its errors in
    float32, so it runs in float32 here against the float64 reference; the allowance is 2 float32 ulps of K's
    largest entry, well under the steps themselves (images: a few 1e-3 of the step, alpha: 4e-5)."""
    model, w, updates, k = _problem(digits_round, torch.float32)
    model64, _, updates64, k64 = _problem(digits_round, torch.float64)
    hp = dataclasses.replace(HP, gamma=0.0)
    errors, learned, iterations = fr.reconstruct(model, w, updates, k, torch.ones(len(updates), dtype=torch.long), hp)
    assert iterations.tolist() == [2] * len(updates)
    lrs = (hp.lr_images, hp.lr_labels, hp.lr_alpha)
    eps = torch.finfo(torch.float32).eps
    stepped = []
    for i, (_, *grads_ref) in enumerate(_reference_gradients(model64, k64, updates64, hp.inner_steps)):
        start = (k64.images[i], k64.label_logits[i], k64.alpha[i])
        want = [t - lr * d for t, lr, d in zip(start, lrs, grads_ref)]
        for got, t, w_ in zip((learned.images[i], learned.label_logits[i], learned.alpha[i]), start, want):
            assert not torch.equal(got.double(), t)  # the step did move this part of K
            torch.testing.assert_close(got.double(), w_, rtol=0, atol=2 * eps * t.abs().max().item())
        stepped.append(fr.Knowledge(*want))
    after = _reference_gradients(model64, fr.Knowledge.stack(stepped), updates64, hp.inner_steps)
    for i, (e_ref, *_) in enumerate(after):
        assert errors[i].item() == pytest.approx(e_ref.item(), rel=1e-5)


def test_the_adaptive_attackers_test_is_the_servers_verdict_and_leaves_its_state_alone(digits_round):
    """Algorithm 3's ``passes``: FedREDefense's own test of one update from the attacker's copy of K_i, equal to
    the verdict the server reaches on it, while the server's K_i stays as it was."""
    model, w, updates, sizes = digits_round
    hp = dataclasses.replace(HP, first_iters=200, max_iters=30)  # genuine K_i learned in round 0, short trials
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    rnd = fl.Round(0, [0, 2], w, sizes[[0, 2]], torch.zeros(2, dtype=torch.bool))
    defense(updates[[0, 2]], rnd)  # both clients now have a K_i
    before = {c: dataclasses.astuple(k) for c, k in defense.knowledge.items()}
    rnd = dataclasses.replace(rnd, t=1)
    trials = [updates[2], 3 * updates[2], -updates[2]]
    verdicts = [bool(defense.attacker_test([2], rnd)(u[None])) for u in trials]
    for c, k in defense.knowledge.items():
        assert all(torch.equal(a, b) for a, b in zip(dataclasses.astuple(k), before[c]))
    for u, verdict in zip(trials, verdicts):
        flagged = defense(torch.stack([updates[0], u]), dataclasses.replace(rnd, clients=[0, 2]))
        defense.knowledge = {c: fr.Knowledge(*k) for c, k in before.items()}  # undo the server's round
        assert verdict == bool(flagged.accepted[1])
    assert len(set(verdicts)) == 2  # the case tells passing and failing updates apart


def test_adaptive_attackers_searching_together_get_the_lambdas_of_their_searches_alone(digits_round,
                                                                                      single_thread):
    """Issue 30, item 2: against FedREDefense the attackers of a round search together, each step of Algorithm 3
    one batched test of all their trials; each attacker ends with the lambda (and the scaled update) of its own
    search written out alone: Algorithm 3's loop around FedREDefense's test of that one update from the
    attacker's copy of K. Two attackers have a K (the server's cap), two are new (the first-participation cap);
    gamma sits among the errors that five-iteration reconstructions reach, so the searches end apart."""
    model, w, updates, sizes = digits_round
    hp = dataclasses.replace(HP, first_iters=5, max_iters=4, gamma=0.997)
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    defense.knowledge = {c: fr.Knowledge(defense.initial.images * 0.9, defense.initial.label_logits,
                                         defense.initial.alpha * c) for c in (1, 3)}
    clients = [0, 1, 2, 3, 4]
    batch = torch.cat([updates, updates[:1]])  # client 4: a genuine client, not attacking
    rnd = fl.Round(1, clients, w, torch.ones(5), torch.tensor([True, True, True, True, False]))
    scaled = batch.clone()
    lambdas = attacks.adaptive_attack(defense, scaled, [0, 1, 2, 3], rnd)
    for i in range(4):
        copy = {clients[i]: defense.knowledge[clients[i]]} if clients[i] in defense.knowledge else {}
        lam, delta = 1.0, 2.0
        while delta >= 0.125:
            lam += delta
            if defense.test((lam * batch[i])[None], [clients[i]], w, copy)[0][0]:
                lam -= delta
            delta /= 2
        assert lambdas[i] == lam and torch.equal(scaled[i], lam * batch[i])
    assert torch.equal(scaled[4], batch[4])
    assert len(set(lambdas.values())) >= 3, lambdas
    assert attacks.adaptive_attack(defense, scaled, [], rnd) == {}  # a round without attackers tests nothing


def test_an_aggregation_rule_after_filtering_aggregates_the_accepted_updates(digits_round):
    """Sec. 6.1 / Table 3: FedREDefense followed by Norm bound gives Norm bound's aggregate of what it accepted."""
    import baselines
    model, w, updates, sizes = digits_round
    hp = dataclasses.replace(HP, first_iters=5, max_iters=5, gamma=1e9)  # accept everyone
    after = baselines.RobustDefense("normbound", 0, 0.05)
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu", aggregate=after)
    decision = defense(updates, fl.Round(0, [0, 1, 2, 3], w, sizes, torch.zeros(4, dtype=torch.bool)))
    assert decision.accepted.all()
    assert torch.equal(decision.update, baselines.normbound(updates, 0.05).update)
    assert not torch.allclose(decision.update, updates.mean(0))


def test_reconstruct_on_the_authors_convnet_equals_the_plain_loop(monkeypatch, single_thread):
    """With the authors' ConvNet (instance norm, average pooling) in its channels-last format, clients vmapped two at
    a time on two worker threads: the errors and the K after 4 outer steps of the plain flat-vector loop on the NCHW
    model, one client at a time (genuine digits updates of the ConvNet; 1e-4 relative)."""
    monkeypatch.setattr(fr, "clients_per_batch", lambda model, device: 2)
    monkeypatch.setattr(fl, "cores", lambda device: 2)
    torch.manual_seed(0)
    ds = data.load_dataset("digits")
    parts = data.dirichlet_partition(ds.y_train, 25, 0.1, 0)
    plain_model = fl.ConvNet(1, 8)
    w = fl.flatten_params(plain_model)
    updates = torch.stack([fl.local_update(plain_model, w, ds.x_train[parts[c]], ds.y_train[parts[c]],
                                           fl.LOCAL_LR["digits"], torch.Generator().manual_seed(c)) for c in range(3)])
    model, = fl.in_fast_format(fl.ConvNet(1, 8))
    hp = dataclasses.replace(HP, gamma=0.0)  # no early stop: every client takes all its steps
    errors, learned, iterations = fr.reconstruct(model, w, updates, initial(3), torch.full((3,), 4), hp)
    assert iterations.tolist() == [5, 5, 5]
    for i, k_i in enumerate(initial(3).unstack()):
        e_plain, k_plain = bench.plain_reconstruction(plain_model, w, updates[i], k_i, 4, hp)
        assert errors[i].item() == pytest.approx(e_plain.item(), rel=1e-4)
        assert not torch.equal(k_plain.images, k_i.images)
        assert torch.allclose(learned.images[i], k_plain.images, rtol=1e-4, atol=1e-5)
        assert torch.allclose(learned.alpha[i], k_plain.alpha, rtol=1e-4)
