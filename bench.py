"""Benchmark: the project against the plain per-client loops, side by side, on a CPU or a GPU.

    python bench.py [cpu|cuda]      # needs FashionMNIST (README, "Install")

It prints the machine's matmul speed, then the time of a FedAvg round, the rate of FedREDefense's ``reconstruct``
and of FedDefuse's ``recoverability``, each beside the obvious code that computes the same numbers, the default
demo's seconds (``python run.py``), one adaptive attacker's trial, and the projected times of a paper-scale
FashionMNIST FedREDefense run under both settings and of a laptop-scale cell (RESULTS.md, "Performance"). The obvious
code lives here too: the tests check that the project computes what it computes. Nothing in the project imports
this file.
"""
import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import time

try:  # Ctrl-C while torch loads: one line, as everywhere else
    import torch
    import torch.nn.functional as F

    import data
    import feddefuse
    import fedredefense as fr
    import fl
    import run
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported: the importer says it
        raise
    sys.stderr.write("bench.py: interrupted\n")
    sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# The plain loops: the code the project is measured against
# ---------------------------------------------------------------------------------------------------------------

class TextbookCNN(fl.CNN):
    """``fl.CNN`` as Table 5 writes it, ReLU before each pooling: the plain loop's model (same parameters)."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def plain_fedavg_round(model, w, parts, x, y, x_test, y_test, lr):
    """A FedAvg round written the obvious way: NCHW, one client after another, ``torch.optim.SGD`` (App. A.5),
    then the test accuracy in batches of 500. Returns (the new global model, TACC)."""
    updates = []
    for i, idx in enumerate(parts):
        fl.load_params(model, w)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for batch in torch.randperm(len(idx), generator=torch.Generator().manual_seed(i)).split(fl.BATCH_SIZE):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx[batch]]), y[idx[batch]]).backward()
            optimizer.step()
        updates.append(fl.flatten_params(model) - w)
    w = w + torch.stack(updates).mean(0)
    fl.load_params(model, w)
    with torch.no_grad():
        tacc = torch.cat([model(xb).argmax(1) for xb in x_test.split(500)]).eq(y_test).float().mean().item()
    return w, tacc


def plain_reconstruction(model, w0, g, knowledge, iters, hp):
    """The reference ``reconstruct`` is measured against: Algorithm 2 for one client, written the plain
    way the official code writes it (one flat parameter vector, as its ReparamModule; N unrolled steps of
    torch.autograd.grad(create_graph=True); one backward of e), for ``iters`` outer SGD steps without early stop.
    Returns (e of the final K, the final K)."""
    params = [t.clone().requires_grad_(True) for t in (knowledge.images, knowledge.label_logits, knowledge.alpha)]
    velocity = [torch.zeros_like(p) for p in params]
    for m in range(iters + 1):
        images, label_logits, alpha = params
        w_hat = w_hat_0 = w0.clone().requires_grad_(True)
        for _ in range(hp.inner_steps):
            loss = fr.soft_cross_entropy(fl.functional_forward(model, w_hat, images), label_logits)
            (grad,) = torch.autograd.grad(loss, w_hat, create_graph=True)
            w_hat = w_hat - alpha * grad
        e = fr.reconstruction_error(w_hat - w_hat_0, g)
        if m == iters:
            return e.detach(), fr.Knowledge(*(p.detach() for p in params))
        grads = torch.autograd.grad(e, params)
        with torch.no_grad():
            for p, v, grad, lr in zip(params, velocity, grads, (hp.lr_images, hp.lr_labels, hp.lr_alpha)):
                v.mul_(hp.momentum).add_(grad)
                p -= lr * v


# ---------------------------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------------------------

def fedavg_round(model, w, parts, x, y, x_test, y_test, lr):
    """The same round as ``run.py`` computes it (``fl.on_cores``, ``fl.in_fast_format``'s layout, ``fl.predict``)."""
    updates = fl.on_cores(lambda m, i: fl.local_update(m, w, x[parts[i]], y[parts[i]], lr,
                                                       torch.Generator().manual_seed(i)),
                          list(range(len(parts))), model)
    w = w + fl.fedavg(torch.stack(updates))
    return w, fl.accuracy(model, w, x_test, y_test)


def seconds(fn, device, repeat=1):
    """Wall-clock seconds of ``fn()``, the mean of ``repeat`` calls (after the GPU has finished)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


# Outer iterations per client that a FashionMNIST FedREDefense run takes (measured on the small-scale runs,
# RESULTS.md: 600 images a client, beta = 0.1, gamma = 0.6): a genuine client's first reconstruction, a crafted
# update's (the cap, 5000 + 1), and a genuine client's in a later round.
FMNIST_ITERATIONS = {"first": 95, "crafted": 5001, "later": 5.1}


def matmul_gflops(device, size=1024, repeat=10):
    """The machine's float32 matrix-product speed in GFLOP/s, on torch's threads: 2 size^3 floating-point
    operations over the median time of ``repeat`` products of two size x size matrices, after one untimed product
    (the warm-up). Printed first, so that absolute times compare across machines."""
    a, b = torch.randn(2, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    torch.mm(a, b)
    return 2 * size ** 3 / statistics.median(seconds(lambda: torch.mm(a, b), device) for _ in range(repeat)) / 1e9


def demo_seconds(device, argv=()):
    """The default demo, ``python run.py`` (FedREDefense against Fang on digits: 25 clients, 40 rounds), run in
    this process on ``device`` with the flags ``argv`` added, into a temporary folder removed afterwards. Its
    per-round lines are not shown. Returns (wall seconds of ``run.run``, the run's final metrics: results.json's
    "final")."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        args = run.parse_args(["--device", device, "--out", out, *argv])
        results = []
        took = seconds(lambda: results.append(run.run(args)), device)
    return took, results[0]["final"]


def adaptive_trial_seconds(device, hp=fr.HYPER["digits"]):
    """One trial of an adaptive attacker (Algorithm 3) on digits: ``FedREDefense.test`` of one update of a new
    client, from K^0 under the first-participation cap, the early stop at gamma in force. The update is random,
    of norm 1, so no K reproduces it: it fails, and only at the cap, as a failing trial does. A real trial can pass
    late: the largest, 4.875 times client 24's label-flipped update at a seed-0 w^0 (norm 0.71), passed at outer
    iteration 993 of 1001 (measured once). Returns (wall seconds, the outer iterations it took)."""
    model = fl.CNN(1, 8).to(device)
    w = fl.flatten_params(model)
    defense = fr.FedREDefense(model, (1, 8, 8), 10, hp, torch.Generator().manual_seed(0), device)
    update = torch.randn(1, len(w), generator=torch.Generator().manual_seed(1)).to(device)
    tested = []
    took = seconds(lambda: tested.append(defense.test(update / update.norm(), [0], w, {})), device)
    return took, int(tested[0][3][0])


def projected_run(fedavg_seconds, rate, iterations, clients, malicious, rounds):
    """The projected time of a FedREDefense run with every client in every round: round 1 trains (a FedAvg round,
    ``fedavg_seconds``) and reconstructs ``clients - malicious`` genuine updates from K^0 and ``malicious``
    crafted ones, which it expels; every later round trains and reconstructs the genuine updates, at ``rate``
    client outer iterations per second, ``iterations`` each (``FMNIST_ITERATIONS``' keys). Returns (round 1's
    seconds, a later round's, the run's)."""
    genuine = clients - malicious
    first = fedavg_seconds + (genuine * iterations["first"] + malicious * iterations["crafted"]) / rate
    later = fedavg_seconds + genuine * iterations["later"] / rate
    return first, later, first + (rounds - 1) * later


def benchmark(device="cpu"):
    """Prints, for the plain per-client loop and for the project on ``device``, with their ratio: a FedAvg round on
    FashionMNIST at 100 clients; ``reconstruct`` on the CNNs of Tables 5 and 6 and the digits CNN at 1, 10 and 25
    clients (client outer iterations per second, the early stop disabled); FedDefuse's recoverability for 20
    clients on its MLP. First of all the machine's matmul speed (``matmul_gflops``); after the comparisons the
    default demo's seconds and final DACC/FPR (``demo_seconds``), the seconds of one adaptive attacker's failing
    trial (``adaptive_trial_seconds``), and, from the measured FedAvg round and reconstruction rate at 25 clients
    (``projected_run``), the projected time of a paper-scale FashionMNIST FedREDefense run (100 clients of which 28
    malicious, 500 rounds) under each ``--fedredefense-settings`` and of a laptop-scale cell (25 clients)."""
    print(f"{device}, {fl.cores(device)} core(s) for the project; the plain loop on torch's "
          f"{torch.get_num_threads()} threads")
    print(f"1024x1024 float32 matmul: {matmul_gflops(device):.0f} GFLOP/s (median of 10, torch's "
          f"{torch.get_num_threads()} threads)", flush=True)
    ds = data.load_dataset("fmnist", "data")  # one line and exit 2 if FashionMNIST is not installed
    parts = [torch.as_tensor(p) for p in data.dirichlet_partition(ds.y_train, 100, 0.1, seed=0)]
    x, y, x_test, y_test = (t.to(device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    plain_model = TextbookCNN(1, 28).to(device)
    model, x_fast, x_test_fast = fl.in_fast_format(fl.CNN(1, 28).to(device), x, x_test)
    w = fl.flatten_params(model)
    plain = seconds(lambda: plain_fedavg_round(plain_model, w, parts, x, y, x_test, y_test, fl.LOCAL_LR["fmnist"]),
                    device)
    fast = seconds(lambda: fedavg_round(model, w, parts, x_fast, y, x_test_fast, y_test, fl.LOCAL_LR["fmnist"]),
                   device)
    print(f"FedAvg round, FashionMNIST, 100 clients: project {fast:5.1f} s, plain loop {plain:5.1f} s, "
          f"ratio {plain / fast:4.2f}", flush=True)
    fedavg_seconds = fast

    print("reconstruct (client outer iterations/s):")
    iters, rate = 4, {}
    for channels, side, dataset in ((1, 28, "fmnist"), (3, 32, "cifar10"), (1, 8, "digits")):
        hp = dataclasses.replace(fr.HYPER[dataset], first_iters=iters, max_iters=iters, gamma=0.0)
        model, plain_model = fl.CNN(channels, side).to(device), TextbookCNN(channels, side).to(device)
        w = fl.flatten_params(model)
        k0 = fr.initial_knowledge((channels, side, side), 10, hp, torch.Generator().manual_seed(0), device)
        for n in (1, 10, 25):
            g = 1e-3 * torch.randn(n, len(w), generator=torch.Generator().manual_seed(1)).to(device)
            k = fr.Knowledge.stack([k0] * n)
            fr.reconstruct(model, w, g, k, torch.full((n,), 1), hp)  # warm-up
            fast = n * (iters + 1) / seconds(lambda: fr.reconstruct(model, w, g, k, torch.full((n,), iters), hp),
                                             device)
            plain = n * (iters + 1) / seconds(lambda: [plain_reconstruction(plain_model, w, g[i], k0, iters, hp)
                                                       for i in range(n)], device)
            rate[dataset, n] = fast
            print(f"  {channels}x{side:>2}x{side:<2} CNN ({len(w):>9,} parameters), {n:>2} clients: project "
                  f"{fast:6.1f}, plain loop {plain:6.1f}, ratio {fast / plain:4.2f}", flush=True)

    hp, n = feddefuse.HYPER["fmnist"], 20
    model = fl.MLP(1, 28).to(device)
    w = fl.flatten_params(model)
    g = 1e-3 * torch.randn(n, len(w), generator=torch.Generator().manual_seed(1)).to(device)
    images = torch.randn(n, hp.n_samples, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    start = fr.Knowledge(images, torch.zeros(n, hp.n_samples, 10, device=device),
                         torch.full((n,), hp.lr_init, device=device))
    one = lambda i: fr.Knowledge(*(t[i:i + 1] for t in (start.images, start.label_logits, start.alpha)))
    fast = seconds(lambda: feddefuse.recoverability(model, w, g, start, start, hp), device)
    plain = seconds(lambda: [feddefuse.recoverability(model, w, g[i:i + 1], one(i), one(i), hp) for i in range(n)],
                    device)
    print(f"FedDefuse recoverability, MLP, {n} clients (K = {hp.outer_iters}): project {fast:5.2f} s, per-client "
          f"loop {plain:5.2f} s, ratio {plain / fast:4.2f}", flush=True)

    took, final = demo_seconds(device)
    expected = "" if (final["dacc"], final["fpr"]) == (1, 0) else " (the demo's must be DACC 100%, FPR 0%)"
    print(f"Default demo, python run.py (FedREDefense vs Fang, digits, 25 clients, 40 rounds): {took:5.1f} s, target "
          f"<= 120 s on a ~100 GFLOP/s 2-core machine; final DACC {100 * final['dacc']:.1f}%, FPR "
          f"{100 * final['fpr']:.1f}%{expected}", flush=True)
    took, iterations = adaptive_trial_seconds(device)
    print(f"Adaptive attacker's trial (Algorithm 3), digits: FedREDefense.test of one random update from K^0, "
          f"{iterations} outer iterations (the first-participation cap {fr.HYPER['digits'].first_iters} + 1): "
          f"{took:5.1f} s", flush=True)

    # Paper scale under attack: round 1 reconstructs 72 genuine and 28 crafted updates from K^0, and expels the 28;
    # every later round trains and reconstructs the 72 (a 100-client FedAvg round is an upper bound on the first).
    # Under the official settings a crafted update runs to their first-participation cap; no FashionMNIST run under
    # them is measured, so the genuine updates' iterations are Table 7's.
    r = rate["fmnist", 25]
    for settings, note in (("paper", ""), ("official", "; the genuine iterations are Table 7's, none measured under "
                                                       "these settings: an upper bound if they converge no slower")):
        cap = fr.SETTINGS[settings]["fmnist"].first_iters
        it = {**FMNIST_ITERATIONS, "crafted": cap + 1}
        first, later, total = projected_run(fedavg_seconds, r, it, clients=100, malicious=28, rounds=500)
        print(f"Projected paper-scale FashionMNIST FedREDefense run (100 clients, 28 malicious, 500 rounds), "
              f"--fedredefense-settings {settings}: round 1 {first / 60:.0f} min, later rounds {later:.0f} s, "
              f"{total / 3600:.1f} h in all (from the FedAvg round above, reconstruct at {r:.1f} client "
              f"iterations/s, and {it}{note})")
    # Laptop scale (run.py --scale laptop): 25 clients of 600 images; their FedAvg round is a quarter of the
    # 100-client one.
    clients, rounds, _ = run.SCALE["laptop", "fedredefense"]
    malicious = round(run.MALICIOUS_SHARE * clients)
    first, later, total = projected_run(fedavg_seconds * clients / 100, r, FMNIST_ITERATIONS, clients=clients,
                                        malicious=malicious, rounds=rounds)
    print(f"Projected laptop-scale FashionMNIST FedREDefense cell ({clients} clients of 600 images, {malicious} "
          f"malicious, {rounds} rounds): round 1 {first / 60:.1f} min, later rounds {later:.1f} s, "
          f"{total / 60:.0f} min in all")


def main(argv=None):
    """``python bench.py [cpu|cuda]``: ``benchmark`` on the device."""
    p = fl.Parser(prog="bench.py", description="The project against plain per-client loops, and a projected "
                                               "paper-scale FashionMNIST FedREDefense run (needs FashionMNIST).")
    p.add_argument("device", nargs="?", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    with fl.command_line("bench.py"):
        args = p.parse_args(argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise fl.UserError("argument device: there is no CUDA device here (give cpu)")
        benchmark(args.device)


if __name__ == "__main__":
    main()
