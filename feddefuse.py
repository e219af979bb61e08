"""FedDefuse (anonymous 2025 submission, "FedDefuse: Mitigating Strategic Model Poisoning for Federated Learning
via Divide-and-Compute Driven Composite Behavioral Analysis"): recoverability + frequency-domain similarity.

The server runs a divide-and-compute pipeline on every round's updates ``[n_clients, n_params]``
(``Delta_i = w_i - w_global``, fl.py conventions):

1. Algorithm 1, recoverability (sec. 3.1, eqs. 4-5). Every I rounds a small surrogate dataset D_i^s is fitted to
   each update by gradient inversion (DLG, eq. 5c). The server then simulates tau~ SGD steps from the global model
   on a candidate dataset near D_i^s and refines it and the learning rate with K Adam steps (eq. 5a-b). The
   objective reached (relative reconstruction error plus the KL penalty) is the recoverability score R(Delta_i):
   low R means the update looks like genuine local training. The simulation and the error are FedREDefense's.
   Clustering {R} in two splits the round into Delta_b (the lower-R group, provisionally benign) and Delta_m
   (the rest, provisionally malicious).
2. Algorithm 2, normality score (sec. 3.2, eqs. 6-10). Take the low-frequency DWT of every update. The benign
   prototype is the geometric median of DWT(Delta_b) (eq. 8). The malicious representatives are the K members of
   Delta_m with the highest R (eq. 9). Each update gets a benign distance d_b (eq. 6) and a malicious distance d_m
   (eq. 7), and from them Phi = alpha*minmax(d_m) - (1-alpha)*minmax(d_b) (eq. 10).
3. Filtering (sec. 3.3, Alg. 2 lines 6-10). DBSCAN on d_b asks whether the round is uniformly benign; if so,
   everyone is kept. Otherwise KMeans(2) on Phi keeps the cluster with the higher average score.
4. Aggregation (eq. 11): the data-size-weighted average of the kept updates.
5. On the record: every Decision carries ``details`` (R, the split, the representatives, d_b, d_m, Phi, the DBSCAN
   labels and verdict, what KMeans kept). With ``record=True`` the defense also keeps each round's Algorithm 2
   inputs, and ``replay`` reruns Algorithm 2 on them offline under other knobs, in milliseconds:
   ``python feddefuse.py replay RUN/replay.pt --n-representatives 1 5 10`` (RUN from ``run.py --save-replay``).
"""
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from typing import NamedTuple

try:  # Ctrl-C while torch loads, under ``python feddefuse.py``: one line, as everywhere else
    import numpy as np
    import pywt
    import threadpoolctl
    import torch
    from sklearn.cluster import DBSCAN, KMeans

    import fl
    from fedredefense import Knowledge, reconstruction_error, simulated_updates, soft_cross_entropy
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported: the importer says it
        raise
    sys.stderr.write("feddefuse.py: interrupted\n")
    sys.exit(130)


@dataclass(frozen=True)
class Hyper:
    """FedDefuse's hyper-parameters for one dataset (App. B.1 where it gives them; each other choice explained)."""
    surrogate_iters: int = 300     # DLG iterations for D_i^s (App. B.1: "IDLG ... with 300 iterations")
    surrogate_lr: float = 0.1      # Adam step for D_i^s (not given)
    surrogate_every: int = 100     # I: D_i^s is recomputed when r mod I = 0 (App. B.1)
    n_samples: int = 10            # |D_i^s| = |D~_i| (sec. 3.1: "e.g. 10")
    lr_init: float = 0.1           # eta_l's start; App. B.1's 0.01 on plain CE = 0.1 on our soft-CE/C scale
    kl_weight: float = 0.01        # lambda (App. B.1)
    outer_iters: int = 5           # K of Algorithm 1: Adam steps per round (App. B.1: K = 5)
    sim_steps: int = 16            # tau~: simulated local steps (App. B.1)
    candidate_lr: float = 0.05     # Adam step for D~_i (not given)
    lr_lr: float = 0.01            # Adam step for eta_l (not given)
    wavelet: str = "haar"          # DWT (sec. 3.2 names neither wavelet nor level; see dwt_lowpass)
    level: int = 3
    n_representatives: int = 5     # K of eq. 9 (see normality_filter)
    alpha: float = 0.5             # eq. 10 (not given)
    dbscan_eps: float = 0.5        # Alg. 2 line 6 (see is_uniformly_benign)
    dbscan_min_samples: int = 2
    rule: str = "mean"             # "higher average" (sec. 3.3) vs "highest sum" (Alg. 2 line 9)


# One set per dataset, the same for every attack and pattern. App. B.1 gives one set for CIFAR-10 and FMNIST; the
# real datasets use it, with alpha = 0.5 (untested there). For `digits` two values change, once:
# - tau~ = 2: App. B.1's 16 simulated steps match its clients' own 16-19 steps an epoch (500-600 samples, batch
#   32); a digits client takes 2;
# - alpha = 0.3: Gaussian attackers are scattered, so one that is not a representative is *far* from all of them
#   and, at alpha = 0.5, lands between the clusters of Phi. Chosen on 8 recorded rounds per attack (RESULTS.md).
HYPER = {name: Hyper() for name in ("mnist", "fmnist", "cifar10", "cinic10")}
HYPER["digits"] = Hyper(sim_steps=2, alpha=0.3)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1: recoverability analysis
# ---------------------------------------------------------------------------------------------------------------

def client_gradient(model, w, images, label_logits):
    """grad_theta F_i(theta; D): the gradient of the batch-mean soft-label cross-entropy a client descends."""
    loss = lambda v: soft_cross_entropy(fl.functional_forward(model, v, images), label_logits) * label_logits.shape[-1]
    return torch.func.grad(loss)(w)


def dlg_surrogate(model, w_global, updates, sample_shape, num_classes, local_lr, local_steps, hp, generator):
    """Eq. 5c (eq. 4): D_i^s = argmin_D || grad_theta F_i(theta^r; D) - target_i ||^2, by DLG (Zhu et al. 2019).

    - Sign and scale of the target: eq. 4 writes Delta_i / tau, but Delta_i = -eta * (sum of tau gradients), so
      the mean gradient the client followed is target_i = -Delta_i / (eta * tau_i). We match that (the server sets
      eta and knows |D_i|, hence tau_i, as eq. 11 shows). The loss is divided by ||target_i||^2 so that one step
      size serves every client and round.
    - D = 10 images from N(0, 1) plus learned soft-label logits from 0; Adam (``surrogate_lr``) for
      ``surrogate_iters`` steps, all clients at once. DLG's L-BFGS is replaced by Adam, which needs no line search
      through a double-backward. App. B.1 names iDLG, whose label trick needs a single-sample batch; with 10
      samples the labels are learned, as in DLG. Returns the stacked D_i^s as a ``Knowledge`` (alpha unused: 0).
    """
    n = len(updates)
    shape = (n, hp.n_samples)
    target = -updates / (local_lr * local_steps.to(updates)[:, None])
    images = torch.randn(*shape, *sample_shape, generator=generator).to(updates.device)
    labels = torch.zeros(*shape, num_classes, device=updates.device)
    images.requires_grad_(True)
    labels.requires_grad_(True)
    opt = torch.optim.Adam([images, labels], lr=hp.surrogate_lr)
    grads = torch.func.vmap(lambda x, y: client_gradient(model, w_global, x, y))
    for _ in range(hp.surrogate_iters):
        loss = ((grads(images, labels) - target).pow(2).sum(1) / target.pow(2).sum(1).clamp_min(1e-12)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Knowledge(images.detach(), labels.detach(), torch.zeros(n, device=updates.device))


def kl_to_surrogate(candidate_logits, surrogate_logits):
    """KL(D~_i, D_i^s) of eq. 5a, summed over the paired samples.

    The paper does not say what the KL compares. Images are not distributions, the labels are: we compare each
    candidate sample's soft label with its surrogate counterpart's, KL(softmax(y~_j) || softmax(y^s_j)) in the
    order the paper writes. The images stay near D_i^s because they start there.
    """
    p, q = candidate_logits.log_softmax(-1), surrogate_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum((-1, -2))


def recoverability(model, w_global, updates, candidate, surrogate, hp):
    """Algorithm 1 lines 6-10 (eq. 5a-b): R(Delta_i), refining D~_i and eta_l with K Adam steps, all clients at once.

    objective_i = ||theta~ - theta^r - Delta_i||^2 / ||Delta_i||^2 + lambda * KL(D~_i, D_i^s), with theta~ the
    result of tau~ simulated SGD steps on D~_i at rate eta_l (the simulation FedREDefense uses). R(Delta_i) is the
    lowest objective evaluated ("the optimal objective value"): K + 1 evaluations around K Adam steps; R stays inf
    for a client whose every evaluation overflowed (NaN), and the clients are independent, so one client's
    overflow leaves the others' R as it was. Returns (R [n], refined stacked candidates).
    eta_l is kept >= 0 (the paper does not constrain it): the candidates persist across rounds, and a client that
    always sends -Delta would otherwise drift to a negative learning rate that recovers its flipped update exactly.
    """
    params = [t.clone().requires_grad_(True) for t in (candidate.images, candidate.label_logits, candidate.alpha)]
    opt = torch.optim.Adam([{"params": params[:2], "lr": hp.candidate_lr}, {"params": params[2:], "lr": hp.lr_lr}])
    best = torch.full((len(updates),), float("inf"))
    for k in range(hp.outer_iters + 1):
        objective = (reconstruction_error(simulated_updates(model, w_global, *params, hp.sim_steps), updates)
                     + hp.kl_weight * kl_to_surrogate(params[1], surrogate.label_logits))
        best = torch.fmin(best, objective.detach().cpu())  # a NaN (overflowed) evaluation does not count
        if k == hp.outer_iters:
            break
        opt.zero_grad()
        objective.sum().backward()  # clients are independent: each candidate gets only its own gradient
        opt.step()
        with torch.no_grad():
            params[2].clamp_(min=0)  # eta_l is a learning rate (see below)
    return best, Knowledge(*(p.detach() for p in params))


def split_by_recoverability(r, seed=0):
    """Alg. 1 line 13: 2-means on {R(Delta_i)}; Delta_b = the cluster with the lower R, Delta_m = the rest.

    Returns (benign_idx, malicious_idx) as index tensors. Fewer than 2 distinct R values: all in Delta_b.
    """
    x = r.double().numpy().reshape(-1, 1)
    if len(np.unique(x)) < 2:
        return torch.arange(len(r)), torch.arange(0)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x).labels_
    low = int(x[labels == 1].mean() < x[labels == 0].mean())
    return torch.from_numpy(np.flatnonzero(labels == low)), torch.from_numpy(np.flatnonzero(labels != low))


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 2: normality score and model-update filtering
# ---------------------------------------------------------------------------------------------------------------

def dwt_lowpass(updates, wavelet="haar", level=3):
    """DWT(Delta) of sec. 3.2: the approximation (low-pass) coefficients of the 1-D DWT of each row of ``updates``.

    ``[n, d] -> [n, d']`` (float64, on ``updates.device``). This is ``pywt.wavedec(..., axis=1)[0]``.
    - wavelet / level: the paper names neither. Haar is the default because its level-L approximation coefficients
      are means of blocks of 2**L neighbouring parameters, times 2**(L/2). Distances in this domain are then
      distances between block-averaged updates, which is easy to read, and the 2-tap filter works for any d >= 2.
      Level 3 gives a compact representation (d/8 coefficients, the lowest eighth of the band). Each coefficient
      averages only 8 neighbouring parameters, so the smoothing stays local and never spans a whole layer.
    - mode="periodization": the transform stays orthogonal and gives ceil(d/2) coefficients per level. For odd
      lengths pywt repeats the last sample, so a constant vector still maps to a constant vector (times
      2**(level/2) for haar).
    - level is clamped to ``pywt.dwt_max_level(d, wavelet)`` so that short vectors work. Level 0 returns the rows
      unchanged.
    - The transform runs in the input's precision (float32 updates stay float32, which halves the memory for
      large models). The d' coefficients are then cast to float64 for the distances and the geometric median.
    """
    x = updates.detach().cpu().numpy()
    level = min(level, pywt.dwt_max_level(x.shape[1], wavelet))
    approx = pywt.wavedec(x, wavelet, mode="periodization", level=level, axis=1)[0]
    return torch.from_numpy(np.ascontiguousarray(approx, dtype=np.float64)).to(updates.device)


def geometric_median(points, iters=200, eps=1e-8, tol=1e-7):
    """Geometric median of the rows of ``points`` ``[m, k]``, by Weiszfeld's algorithm (eq. 8).

    Eq. 8 minimises sum_j ||DWT(Delta) - DWT(Delta_j)|| over Delta. The DWT is linear and onto the coefficient
    space, so we minimise over the coefficient vector directly and use the result as DWT(bar Delta_b). Nothing
    needs inverting, because eqs. 6-7 only use DWT(bar Delta_b).
    - Start at the coordinate-wise mean. All points get equal weight, as in eq. 8.
    - Coinciding points (the eps guard): a point closer to the iterate than ``eps * scale`` counts as coinciding,
      where scale is the largest distance of a point from the mean. We then take the Vardi-Zhang (2000) step
      rather than only clamping the distance at eps. A clamped weight of 1/eps freezes the iterate on any data
      point it hits, even one that is not the median (e.g. the mean of (-1,-1,-1,0,3) is the data point 0). The
      Vardi-Zhang step stops exactly when the coinciding point is the median (||sum of unit pulls|| <= its count)
      and otherwise moves away from it.
    - Stop after ``iters`` steps, or once a step is shorter than ``tol * scale``. The iterates approach a median
      that is a data point only sublinearly, so at the end the nearest data point is returned instead if it
      passes the same optimality test. m == 1, or all points equal, returns that point.
    """
    if len(points) == 0:
        raise ValueError("geometric median of an empty set")
    v = points.mean(0)
    scale = torch.linalg.vector_norm(points - v, dim=1).max()
    if len(points) == 1 or scale == 0:
        return v
    for _ in range(iters):
        dist = torch.linalg.vector_norm(points - v, dim=1)
        far = dist > eps * scale
        w = 1.0 / dist[far]
        t = (w[:, None] * points[far]).sum(0) / w.sum()            # plain Weiszfeld step over the other points
        n_coincide = int((~far).sum())
        if n_coincide:                                              # Vardi-Zhang correction
            pull = torch.linalg.vector_norm((w[:, None] * (points[far] - v)).sum(0))
            if pull <= n_coincide:
                break                                               # v is the median
            t = (1 - n_coincide / pull) * t + (n_coincide / pull) * v
        step = torch.linalg.vector_norm(t - v)
        v = t
        if step <= tol * scale:
            break
    # Weiszfeld closes in on a median that is a data point only slowly; snap to the nearest point if it is optimal
    j = torch.linalg.vector_norm(points - v, dim=1).argmin()
    dist = torch.linalg.vector_norm(points - points[j], dim=1)
    far = dist > eps * scale
    pull = torch.linalg.vector_norm(((points[far] - points[j]) / dist[far][:, None]).sum(0))
    return points[j].clone() if pull <= int((~far).sum()) else v


def malicious_representatives(recoverability, malicious_idx, k):
    """Eq. 9: the K members of Delta_m with the highest recoverability score R, with K = min(k, |Delta_m|).

    Highest R means least recoverable, since R is a reconstruction error (eq. 5a) and Delta_b is the low-R group.
    Maximising the sum of R over K-subsets means taking the top K. Ties go to the earlier position in
    ``malicious_idx`` (stable sort). Returns client indices as a python list, highest R first.
    """
    idx = torch.as_tensor(malicious_idx, dtype=torch.long).reshape(-1)
    k = max(0, min(int(k), len(idx)))
    r = torch.as_tensor(recoverability).reshape(-1).cpu()[idx]
    order = torch.argsort(r, descending=True, stable=True)[:k]
    return idx[order].tolist()


def benign_distance(coeffs, prototype):
    """Eq. 6: d_b(Delta_i) = ||DWT(Delta_i) - DWT(bar Delta_b)||_2 for every row of ``coeffs`` ``[n, d']``."""
    return torch.linalg.vector_norm(coeffs - prototype, dim=1)


def malicious_distance(coeffs, rep_idx):
    """Eq. 7: d_m(Delta_i) = sum over the representatives Delta' of ||DWT(Delta_i) - DWT(Delta')||_2.

    ``rep_idx``: row indices of the representatives in ``coeffs``. With no representative (empty Delta_m, or
    K = 0) the sum is empty and d_m = 0 for everyone, so eq. 10 reduces to -(1-alpha)*minmax(d_b).
    The distances are computed explicitly rather than with ``torch.cdist``, whose matrix-product shortcut loses
    precision on near-identical rows.
    """
    d_m = torch.zeros(len(coeffs), dtype=coeffs.dtype, device=coeffs.device)
    for j in rep_idx:
        d_m += torch.linalg.vector_norm(coeffs - coeffs[j], dim=1)
    return d_m


def min_max(v):
    """Min-max rescaling to [0, 1] (the tilde in eq. 10).

    An all-equal vector maps to zeros, with no division by zero. The distance then says nothing about anyone in
    this round. A range of at most 1e-12 of the largest magnitude counts as all-equal, so that float round-off
    is not blown up to [0, 1].
    """
    lo, hi = v.min(), v.max()
    span = hi - lo
    if span <= 1e-12 * torch.maximum(lo.abs(), hi.abs()) or span == 0:
        return torch.zeros_like(v)
    return (v - lo) / span


def normality_score(d_b, d_m, alpha=0.5):
    """Eq. 10: Phi = alpha * minmax(d_m) - (1 - alpha) * minmax(d_b), so Phi lies in [-(1-alpha), alpha].

    Higher means more benign: close to the benign prototype and far from the malicious representatives.
    alpha = 0.5 by default. The paper gives no value, and 0.5 weighs the two distances equally.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * min_max(d_m) - (1 - alpha) * min_max(d_b)


def dbscan_labels(d_b, eps=0.5, min_samples=2):
    """Alg. 2 line 6: D-labels = DBSCAN({d_b(Delta_i)}) on the 1-D feature d_b. Returns the labels (numpy, -1 = noise).

    - Scale: d_b has no fixed scale (it follows the learning rate and the model size), so it is first divided by
      its median over the round. A value then reads "this many times the typical distance to the benign
      prototype", and the labels do not change if all updates are rescaled. If the median is zero (more than
      half the updates coincide with the prototype), the mean is used instead. All-zero d_b is one cluster.
    - min_samples = 2: a cluster needs a point and at least one neighbour within eps. The clusters are then the
      chains of sorted scaled d_b whose consecutive gaps are <= eps, and a point with no neighbour within eps is
      noise (-1). So a lone far-off attacker shows up as noise next to the benign cluster, which gives two labels.
      With min_samples = 1 a lone point would form its own cluster, with the same outcome.
    - eps = 0.5: in an all-benign non-IID round the scaled d_b spread over roughly 0.5-2 with small gaps (n >= 10
      clients), so they chain into one cluster. A malicious group whose d_b exceeds the farthest benign one by
      more than half the typical benign distance leaves a gap > 0.5, and so a second label.
    - Measured on digits (FedDefuse's threat model, 10 participants, 40 rounds per attack; RESULTS.md): the gate keeps
      38 of 40 attack-free rounds whole and fires on every Gaussian and Fang round and on 36 of 40 Scaling rounds.
      It misses sign-flip (k = 1): a flipped update lies 1.7x (median) farther from the prototype than a genuine
      one, but the genuine d_b alone span 2.1-2.4x within a round (non-IID norms), so the two groups overlap (a
      threshold separates them in 8 of 40 rounds) and chain into one cluster in 27 of 40 rounds. A clean gap is
      not enough either: with 10 values over a factor ~3 the gaps are ~0.2, and when the attackers are the
      majority the median is an attacker's d_b, which shrinks the benign-attacker gap (k = 2: separable in 40 of
      40 rounds, yet one cluster in 4 of the 5 rounds with 6 attackers).
    """
    x = d_b.detach().double().cpu().numpy()
    scale = np.median(x)
    if scale <= 0:
        scale = x.mean()
    if scale <= 0:
        return np.zeros(len(x), dtype=int)
    return DBSCAN(eps=eps, min_samples=min_samples).fit(x.reshape(-1, 1) / scale).labels_


def is_uniformly_benign(labels):
    """Alg. 2 line 7, negated: the round is uniformly benign when D-labels hold ONE distinct value.

    All noise (every point isolated, e.g. two or three clients with very different d_b) is one distinct value,
    -1, so everyone is kept.
    """
    return len(np.unique(labels)) == 1


def select_benign(phi, rule="mean", seed=0):
    """Alg. 2 lines 8-10: KMeans(2) on Phi; keep the cluster with the higher score. Returns a boolean mask [n].

    - rule="mean" (default): the higher AVERAGE Phi, as the text of sec. 3.3 says. rule="sum": the higher SUM, as
      Alg. 2 line 9 writes it. The sum is not a statement about normality: it favours the larger cluster when the
      scores are positive and the smaller one when they are negative. A tie in the sum goes to the higher mean.
    - KMeans(n_clusters=2, n_init=10, random_state=seed) on the scores as a 1-D feature (float64).
    - Fewer than 2 distinct Phi values: there is nothing to split, so everyone is kept.
    """
    if rule not in ("mean", "sum"):
        raise ValueError(f"rule must be 'mean' or 'sum', got {rule!r}")
    x = phi.detach().double().cpu().numpy().reshape(-1, 1)
    if len(np.unique(x)) < 2:
        return torch.ones(len(x), dtype=torch.bool, device=phi.device)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x).labels_
    score = {a: (x[labels == a].mean() if rule == "mean" else x[labels == a].sum(), x[labels == a].mean())
             for a in (0, 1)}
    high = max(score, key=score.get)
    return torch.as_tensor(labels == high, device=phi.device)


class Filtering(NamedTuple):
    """What Algorithm 2 computed for one round; per-update entries follow the round's row order."""
    accepted: torch.Tensor       # B^r as a bool mask [n] (Alg. 2 line 12)
    phi: torch.Tensor            # Phi, eq. 10 [n]
    d_b: torch.Tensor            # eq. 6 [n]
    d_m: torch.Tensor            # eq. 7 [n]
    representatives: list        # bar Delta_m, eq. 9: row indices, highest R first
    dbscan_labels: np.ndarray    # D-labels, Alg. 2 line 6 (-1 = noise)
    uniform: bool                # line 7: one distinct D-label, so everyone is kept and KMeans does not run


ALGORITHM2 = ("n_representatives", "alpha", "dbscan_eps", "dbscan_min_samples", "rule")  # its knobs in Hyper


def normality_filter(coeffs, recoverability, benign_idx, malicious_idx, *, n_representatives=5, alpha=0.5,
                     dbscan_eps=0.5, dbscan_min_samples=2, rule="mean", seed=0):
    """Algorithm 2 as a whole, on the round's DWT coefficients ``coeffs = dwt_lowpass(updates)`` ``[n, d']``.

    Steps: the prototype as the geometric median of DWT(Delta_b) (line 2, eq. 8), the representatives (eq. 9),
    then d_b, d_m and Phi (lines 3-5, eqs. 6, 7, 10). DBSCAN on d_b (lines 6-7) keeps everyone when the round is
    uniformly benign; otherwise KMeans on Phi selects (lines 8-10). Returns a ``Filtering``.
    - It starts from the coefficients, so that the live defense and ``replay`` run the same code.
    - recoverability ``[n]`` (R per client, Algorithm 1); benign_idx / malicious_idx: the Delta_b / Delta_m split
      as row indices.
    - Alg. 2 line 2 reads "Compute Delta_i^r via Equation (8)". This is a typo for bar Delta_b^r, the only thing
      eq. 8 defines. Sec. 3.3 calls the two clustering steps "Step 9" and "Step 13", but they are lines 6 and 8 of
      the listing.
    - n_representatives = 5: the paper gives no K for eq. 9. The only K with a value in App. B.1 is K = 5, and it
      most likely names Algorithm 1's Adam-step count (same letter). 5 is reused here and clamped to |Delta_m|
      (so any K >= n means K = |Delta_m|).
    - An empty Delta_b (the paper never considers one) falls back to the geometric median of all updates: it still
      tolerates up to half of them being outliers. An empty Delta_m gives d_m = 0 (see ``malicious_distance``).
    - Eq. 11 (aggregating the accepted updates) is the caller's job.
    """
    benign_idx = torch.as_tensor(benign_idx, dtype=torch.long).reshape(-1)
    base = coeffs[benign_idx.to(coeffs.device)] if len(benign_idx) else coeffs
    prototype = geometric_median(base)
    reps = malicious_representatives(recoverability, malicious_idx, n_representatives)
    d_b = benign_distance(coeffs, prototype)
    d_m = malicious_distance(coeffs, reps)
    phi = normality_score(d_b, d_m, alpha)
    labels = dbscan_labels(d_b, dbscan_eps, dbscan_min_samples)
    uniform = is_uniformly_benign(labels)
    accepted = (torch.ones(len(coeffs), dtype=torch.bool) if uniform else select_benign(phi, rule, seed).cpu())
    return Filtering(accepted, phi, d_b, d_m, reps, labels, uniform)


def replay(record, **variant):
    """Algorithm 2 rerun offline on one recorded round (``FedDefuse.replay``), under ``variant``: a ``Filtering``.

    ``variant`` overrides any of the knobs in ``ALGORITHM2`` (K of eq. 9, alpha, DBSCAN's eps and min_samples,
    the KMeans rule); the others keep the values the round ran with. With no variant it reproduces the live
    decision. The DWT (wavelet, level) and the Algorithm 1 split are fixed by the record.
    """
    return normality_filter(record["coeffs"], record["r"], record["benign_idx"], record["malicious_idx"],
                            **{**record["hyper"], **variant})


def decision_details(clients, r, benign_idx, malicious_idx, f):
    """``fl.Decision.details``: what a round was decided from, JSON-ready, client ids as in ``Round.clients``.

    Per-client values are {str(client id): value}, like run.py's ``per_client``. ``kmeans`` is the cluster KMeans
    kept (client ids), or None when the DBSCAN gate called the round uniformly benign and KMeans did not run.
    """
    ids = lambda idx: [clients[i] for i in torch.as_tensor(idx).reshape(-1).tolist()]
    per = lambda v: dict(zip(map(str, clients), np.asarray(v).tolist()))
    return {"r": per(r), "delta_b": ids(benign_idx), "delta_m": ids(malicious_idx),
            "representatives": ids(f.representatives), "d_b": per(f.d_b.cpu()), "d_m": per(f.d_m.cpu()),
            "phi": per(f.phi.cpu()), "dbscan_labels": per(f.dbscan_labels), "uniform": bool(f.uniform),
            "kmeans": None if f.uniform else ids(torch.nonzero(f.accepted).reshape(-1))}


# ---------------------------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------------------------

class FedDefuse:
    """FedDefuse, every round afresh: Algorithm 1 (R and the split), Algorithm 2 (Phi and the filter), eq. 11.

    State kept per client across rounds: the surrogate D_i^s (refreshed every I rounds, Alg. 1 line 3, and on a
    client's first participation, which the paper does not cover) and the candidate D~_i with its eta_l (Alg. 1
    line 12). A client's candidate starts as its surrogate. Nobody is expelled: Phi relies on the current round
    only (sec. 2.3).
    Eq. 11 divides by |B^r| and weights by |D_i|/|D|, which shrinks the step by the fraction of data the round
    holds; we read it as the data-size-weighted mean over B^r, sum_i |D_i| Delta_i / sum_i |D_i|.
    Every Decision carries ``decision_details``. With ``record=True``, ``self.replay`` also gets one entry per
    round (``round_record``) from which ``replay`` reruns Algorithm 2 offline.
    """

    def __init__(self, model, sample_shape, num_classes, hp, local_lr, generator, record=False):
        self.model, self.hp, self.local_lr, self.generator = model, hp, local_lr, generator
        self.sample_shape, self.num_classes, self.record = sample_shape, num_classes, record
        self.surrogate, self.candidate = {}, {}  # client id -> Knowledge (alpha holds eta_l in candidates)
        self.replay = []

    def __call__(self, updates, rnd):
        """A client whose R could not be evaluated (inf: its objective overflowed at every evaluation, e.g. an
        update whose squared norm exceeds float32) is rejected and left out of Algorithm 2, where it would become a
        malicious representative at an overflowing distance; the others go through as if it had not been sent."""
        r = self.recoverability_of(updates, rnd)
        ok = torch.isfinite(r)
        if ok.all():
            return self.filter(updates, r, rnd)
        accepted = torch.zeros(len(updates), dtype=torch.bool)
        if not ok.any():
            return fl.Decision(update=torch.zeros_like(updates[0]), accepted=accepted, errors=r)
        decision = self.filter(updates[ok.to(updates.device)], r[ok], fl.subset_round(rnd, ok))
        accepted[ok] = decision.accepted
        return dataclasses.replace(decision, accepted=accepted, errors=r)

    def filter(self, updates, r, rnd):
        """Alg. 1 line 13 (the split by R), Algorithm 2 and eq. 11 for the round's updates with their R."""
        hp = self.hp
        benign_idx, malicious_idx = split_by_recoverability(r)
        coeffs = dwt_lowpass(updates, hp.wavelet, hp.level)
        knobs = {k: getattr(hp, k) for k in ALGORITHM2}
        f = normality_filter(coeffs, r, benign_idx, malicious_idx, **knobs)
        if self.record:
            self.replay.append(round_record(updates, coeffs, rnd, r, benign_idx, malicious_idx, knobs))
        return fl.Decision(update=fl.fedavg(updates[f.accepted.to(updates.device)], rnd.sizes[f.accepted]),
                           accepted=f.accepted, errors=r,
                           details=decision_details(rnd.clients, r, benign_idx, malicious_idx, f))

    def recoverability_of(self, updates, rnd):
        """Algorithm 1 up to line 12 for the round's participants: R [n], updating the per-client state."""
        hp = self.hp
        stale = [i for i, c in enumerate(rnd.clients) if c not in self.surrogate or rnd.t % hp.surrogate_every == 0]
        if stale:
            tau = torch.tensor([fl.local_steps(int(rnd.sizes[i])) for i in stale])
            fresh = dlg_surrogate(self.model, rnd.w_global, updates[stale], self.sample_shape, self.num_classes,
                                  self.local_lr, tau, hp, self.generator)
            for i, s in zip(stale, fresh.unstack()):
                self.surrogate[rnd.clients[i]] = s
        for c in rnd.clients:
            if c not in self.candidate:
                s = self.surrogate[c]
                self.candidate[c] = Knowledge(s.images, s.label_logits, s.alpha.new_tensor(hp.lr_init))
        surrogate = Knowledge.stack([self.surrogate[c] for c in rnd.clients])
        candidate = Knowledge.stack([self.candidate[c] for c in rnd.clients])
        r, candidate = recoverability(self.model, rnd.w_global, updates, candidate, surrogate, hp)
        self.candidate.update(zip(rnd.clients, candidate.unstack()))
        return r


def round_record(updates, coeffs, rnd, r, benign_idx, malicious_idx, knobs):
    """One entry of ``FedDefuse.replay``: Algorithm 2's inputs for the round, as CPU tensors.

    ``coeffs`` (DWT, float64), ``r``, the split, ``clients``, ``sizes``, the knobs the round ran with (``hyper``),
    and, for offline analysis only, ``gram`` = Delta_i . Delta_j in parameter space (cosines and norms without
    storing the updates) and ``malicious``, the ground truth of who attacked this round (``Round.malicious``;
    the defense never reads it).
    """
    u = updates.detach().double()
    return {"t": rnd.t, "clients": list(rnd.clients), "sizes": rnd.sizes.cpu(), "malicious": rnd.malicious.cpu(),
            "coeffs": coeffs.cpu(), "gram": (u @ u.T).cpu(), "r": r.cpu(), "benign_idx": benign_idx.cpu(),
            "malicious_idx": malicious_idx.cpu(), "hyper": dict(knobs)}


# ---------------------------------------------------------------------------------------------------------------
# Offline replay: python feddefuse.py replay RUN/replay.pt ... --n-representatives 1 5 10 --alpha 0.3 0.5
# ---------------------------------------------------------------------------------------------------------------

def replay_metrics(records, **variant):
    """Algorithm 2 under ``variant`` over recorded rounds, scored against their ground truth (run.py's metrics).

    ADACC, MR and FPR are per-round means (FPR over the rounds with a benign participant); ``mr0`` is the share
    of rounds with MR = 0 and ``gated`` the share the DBSCAN gate did not call uniform. Clients that run.py
    rejected as non-finite never reach the defense and are not counted here.
    """
    rows = []
    for rec in records:
        f = replay(rec, **variant)
        rows.append({**fl.detection_metrics(~f.accepted, rec["malicious"]),
                     "mr": fl.malicious_rate(f.accepted, rec["malicious"]), "gated": float(not f.uniform)})
    mean = lambda key: float(np.mean([x[key] for x in rows if x[key] is not None] or [np.nan]))
    return {"adacc": mean("dacc"), "mr": mean("mr"), "mr0": float(np.mean([x["mr"] == 0 for x in rows])),
            "fpr": mean("fpr"), "gated": mean("gated")}


def diagnosis(records):
    """Where Algorithm 2's decisions come from on recorded attacked rounds, scored with their ground truth
    (analysis only: the defense never reads it). Per run:

    - db_ratio: per round, mean d_b of the attacking updates / mean d_b of the genuine ones (median and IQR);
    - db_separable / r_separable: rounds in which a threshold on d_b / on R puts every attacker above every
      genuine update; split_clean: rounds whose Delta_b (Algorithm 1's split) holds no attacker;
    - uniform: rounds the DBSCAN gate called uniformly benign (everyone aggregated);
    - mr_gate_off, mr_gate_off_true_split: MR if KMeans on Phi ran in every round (a DBSCAN that makes every
      point its own cluster), with the recorded split and with the true one (Delta_b = the genuine updates);
    - cosine: mean pairwise cosine of the genuine updates of a round in parameter space (recorded Gram matrix),
      over every recorded round, attacked or not.
    """
    gate_off = dict(dbscan_eps=1e-12, dbscan_min_samples=1)
    attacked = [rec for rec in records if rec["malicious"].any() and (~rec["malicious"]).any()]
    true_split = [{**rec, "benign_idx": torch.nonzero(~rec["malicious"]).reshape(-1),
                   "malicious_idx": torch.nonzero(rec["malicious"]).reshape(-1)} for rec in attacked]
    cosines = []
    for rec in records:
        genuine = ~rec["malicious"]
        gram = rec["gram"][genuine][:, genuine]
        norms = gram.diagonal().sqrt()
        if len(gram) > 1:
            cosines.append((gram / norms[:, None] / norms[None, :])[~torch.eye(len(gram), dtype=torch.bool)].mean())
    ratios, db_sep, r_sep, clean, uniform = [], 0, 0, 0, 0
    for rec in attacked:
        f, bad = replay(rec), rec["malicious"]
        ratios.append((f.d_b[bad].mean() / f.d_b[~bad].mean()).item())
        db_sep += bool(f.d_b[~bad].max() < f.d_b[bad].min())
        r_sep += bool(rec["r"][~bad].max() < rec["r"][bad].min())
        clean += not bad[rec["benign_idx"]].any()
        uniform += f.uniform
    q = np.percentile(ratios, [25, 50, 75]) if ratios else [np.nan] * 3
    return {"rounds": len(attacked), "db_ratio": q[1], "db_ratio_iqr": (q[0], q[2]), "db_separable": db_sep,
            "r_separable": r_sep, "split_clean": clean, "uniform": uniform,
            "mr_gate_off": replay_metrics(attacked, **gate_off)["mr"] if attacked else np.nan,
            "mr_gate_off_true_split": replay_metrics(true_split, **gate_off)["mr"] if attacked else np.nan,
            "cosine": torch.stack(cosines).mean().item() if cosines else np.nan}


def main(argv=None):
    """``replay``: print replay_metrics for every recorded run and every combination of the knob values given.
    ``diagnose``: print ``diagnosis`` for every recorded run. Every file is checked before anything is printed.

    One thread: a round is a few [n, d'] tensors, and on a busy machine the thread pools of torch and of
    scikit-learn's KMeans cost ~200 ms a round where one thread takes ~5 ms.
    """
    p = fl.Parser(prog="feddefuse.py", description="Replay Algorithm 2 on recorded rounds.")
    commands = p.add_subparsers(dest="command", required=True)
    q = commands.add_parser(
        "replay", help="RUN/replay.pt files (run.py --save-replay); knobs not given keep their recorded values")
    q.add_argument("files", nargs="+")
    q.add_argument("--n-representatives", type=int, nargs="+", help="K of eq. 9 (K >= n: K = |Delta_m|)")
    q.add_argument("--alpha", type=fl.number, nargs="+")
    q.add_argument("--dbscan-eps", type=fl.number, nargs="+")
    q.add_argument("--dbscan-min-samples", type=int, nargs="+")
    q.add_argument("--rule", choices=("mean", "sum"), nargs="+")
    d = commands.add_parser("diagnose", help="where the recorded decisions come from (see ``diagnosis``)")
    d.add_argument("files", nargs="+")
    with fl.command_line("feddefuse.py"):
        args = p.parse_args(argv)
        for flag, ok, allowed in (("n_representatives", lambda k: k >= 0, "integers >= 0"),
                                  ("alpha", lambda a: 0 <= a <= 1, "numbers in [0, 1]"),
                                  ("dbscan_eps", lambda e: e > 0, "numbers > 0"),
                                  ("dbscan_min_samples", lambda m: m >= 1, "integers >= 1")):
            values = getattr(args, flag, None) or []
            if not all(map(ok, values)):
                p.error(f"argument --{flag.replace('_', '-')}: must be {allowed} (got {' '.join(map(str, values))})")
        looks_right = lambda records: isinstance(records, list) and len(records) > 0 and all(
            isinstance(r, dict) and {"coeffs", "hyper"} <= r.keys() for r in records)
        runs = {path: fl.load_file(path, "a replay file", "give the replay.pt of a run.py --save-replay run",
                                   looks_right, mmap=True) for path in args.files}  # mmap: read as needed
        torch.set_num_threads(1)
        threadpoolctl.threadpool_limits(1)
        if args.command == "diagnose":
            print("| run | attacked rounds | d_b attacking / genuine, median (IQR) | d_b separates | R separates | "
                  "Delta_b clean | gate: uniform | MR, gate off | MR, gate off, true split | cosine of genuine |")
            print("|---" * 10 + "|")
            for path, records in runs.items():
                m = diagnosis(records)
                n = m["rounds"]
                iqr = m["db_ratio_iqr"]
                print(f"| {path} | {n} | {m['db_ratio']:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f}) | {m['db_separable']}/{n} | "
                      f"{m['r_separable']}/{n} | {m['split_clean']}/{n} | {m['uniform']}/{n} | "
                      f"{100 * m['mr_gate_off']:.1f} | {100 * m['mr_gate_off_true_split']:.1f} | {m['cosine']:.3f} |")
            return
        grid = {k: getattr(args, k) for k in ALGORITHM2 if getattr(args, k) is not None}
        print("| run | " + " | ".join(ALGORITHM2) + " | ADACC | MR | MR=0 rounds | FPR | gate fired |")
        print("|---" * (len(ALGORITHM2) + 6) + "|")
        for path, records in runs.items():
            for values in itertools.product(*grid.values()):
                variant = dict(zip(grid, values))
                knobs = {**records[0]["hyper"], **variant}
                m = replay_metrics(records, **variant)
                print(f"| {path} | " + " | ".join(str(knobs[k]) for k in ALGORITHM2) + " | "
                      + " | ".join(f"{100 * m[k]:.1f}" for k in ("adacc", "mr", "mr0", "fpr", "gated")) + " |")


if __name__ == "__main__":
    main()
