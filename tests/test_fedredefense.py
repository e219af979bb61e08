"""FedREDefense: the unrolled simulation, the error, Algorithm 2 on real updates, and Algorithm 1's decisions."""
import dataclasses

import pytest
import torch

import attacks
import fedredefense as fr
import fl

HP = fr.HYPER["digits"]


def initial(n, generator_seed=0):
    k = fr.initial_knowledge((1, 8, 8), 10, HP, torch.Generator().manual_seed(generator_seed), "cpu")
    return fr.Knowledge.stack([k] * n)


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
    w1 = fr.simulate_training(model, w, images, labels, alpha, steps=1)
    # one step by hand: w - alpha * grad f(K, w)
    v = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fr.soft_cross_entropy(fl.functional_forward(model, v, images), labels), v)
    assert torch.allclose(w1, w - alpha.detach() * grad, atol=1e-6)
    w5 = fr.simulate_training(model, w, images, labels, alpha, steps=5)
    w5.pow(2).sum().backward()
    assert images.grad.abs().sum() > 0 and labels.grad.abs().sum() > 0 and alpha.grad != 0


def test_genuine_update_reconstructs_under_gamma_and_crafted_does_not(digits_round):
    """The paper's key finding (sec. 1) on real local training: Algorithm 2 from K^0 (400 iterations, which these
    genuine clients need less than half of, keep the test quick)."""
    model, w, updates, _ = digits_round
    fang = attacks.fang(updates, 1, torch.Generator().manual_seed(1))
    gaussian = attacks.gaussian(updates[2:3], w, fl.param_sizes(model), torch.Generator().manual_seed(2))
    batch = torch.cat([updates[:2], fang, gaussian])
    errors, _, iterations = fr.reconstruct(model, w, batch, initial(4), torch.full((4,), 400), HP)
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


def test_early_stop_when_knowledge_already_reconstructs(digits_round):
    model, w, updates, _ = digits_round
    errors, learned, its = fr.reconstruct(model, w, updates[:1], initial(1), torch.tensor([HP.first_iters]), HP)
    assert errors.item() < HP.gamma
    again, _, its_again = fr.reconstruct(model, w, updates[:1], learned, torch.tensor([HP.max_iters]), HP)
    assert its_again.item() == 1 and again.item() == pytest.approx(errors.item(), rel=1e-4)  # a pure evaluation


def test_algorithm_1_flags_expels_and_keeps_knowledge(digits_round):
    model, w, updates, _ = digits_round
    hp = dataclasses.replace(HP, first_iters=400)  # plenty for these clients; keeps the test quick
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), "cpu")
    batch = torch.cat([updates[:2], attacks.mpaf(w + 1.0, w)[None]])
    rnd = fl.Round(0, [5, 6, 7], w, torch.tensor([50, 50, 50]), torch.tensor([False, False, True]))
    decision = defense(batch, rnd)
    assert decision.accepted.tolist() == [True, True, False]
    assert decision.expel.tolist() == [False, False, True]
    assert torch.allclose(decision.update, batch[:2].mean(0))
    assert set(defense.knowledge) == {5, 6, 7}
    assert not torch.equal(defense.knowledge[5].images, defense.initial.images)


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
