"""Baseline aggregation rules: FedAvg, the oracle, and the robust aggregators the two papers compare against.

Specification: ``reference/ALGORITHMS.md`` D1 (FedAvg), D2 (Krum, Multi-Krum), D3 (Median), D4 (Trimmed mean),
D5 (Norm bound), D10 (RFA); ``reference/fedredefense-official-code.md`` sec. 4 (what the FedREDefense code runs).

Two shapes of function live here:
- **Pure rules** ``rule(updates, **hp) -> fl.Decision`` (``krum``, ``multikrum``, ``median``, ``trmean``,
  ``normbound``, ``rfa``): ``updates`` is a plain ``[n, d]`` tensor of the round's updates, every hyper-parameter
  (f, b, M, ...) is a keyword argument, and nothing else about the round is read. ``Decision.accepted`` is a bool
  ``[n]`` CPU tensor for rules that select updates (Krum, Multi-Krum) and ``None`` for rules that make no
  per-client decision (Median, Trimmed mean, Norm bound, RFA). A failed precondition raises ValueError.
- **The server-side defense interface** ``defense(updates, rnd) -> fl.Decision`` (``fedavg``, ``oracle``): what the
  round loop in ``run.py`` calls every round, with ``rnd`` a ``fl.Round`` (what the server knows in this round).
  ``RobustDefense`` (at the end) wraps a pure rule into it, with the hyper-parameters a server can know.

Conventions: updates are ``g_i = w_i - w^{t-1}`` (``fl.py``); every rule returns an update in the input's dtype and
on its device. The FedREDefense code aggregates *models* for Median, Trimmed mean and Krum; on updates that is the
same, because those rules are translation-equivariant and Krum only uses differences (ALGORITHMS.md sec. 1).
"""
import math
import sys

import torch

import fl


def fedavg(updates, rnd):
    """No defense: FedAvg over every update (McMahan et al. 2017; the unweighted mean, as the FedREDefense code)."""
    return fl.Decision(update=fl.fedavg(updates), accepted=torch.ones(len(updates), dtype=torch.bool))


def oracle(updates, rnd):
    """FedAvg over the truly benign updates only: the upper bound FedDefuse calls "Best Defense" (Table 2).

    It reads the ground truth ``rnd.malicious`` (the clients attacking this round), which no real server has.
    """
    benign = ~rnd.malicious
    return fl.Decision(update=fl.fedavg(updates[benign.to(updates.device)]), accepted=benign)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------

def fedredefense_code_f(n, share):
    """The FedREDefense code's f (Krum) and b (Trimmed mean): ceil(share * n) + 1, in floating point as it does.

    Compatibility option only, never a default here: the paper says f = b = q, the code (``server.py``) uses
    ceil(r * n) + 1 with r the attack rate. In floating point 0.28 * 100 = 28.000000000000004, so for the default
    28 attackers of 100 the ceiling is 29 and the code trims / assumes **30**, not 28
    (fedredefense-official-code.md sec. 4).
    """
    return math.ceil(share * n) + 1


def _selected(n, index):
    """Bool ``[n]`` CPU mask with ``index`` (an int or a list of ints) set."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def _middle(sorted_values, lower=False):
    """Median along dim 0 of values already sorted along dim 0: the middle one for odd n; for even n the mean of
    the two middle ones, or the lower of them (``lower=True``, what ``torch.median`` returns)."""
    n = sorted_values.shape[0]
    if n % 2 == 1 or lower:
        return sorted_values[(n - 1) // 2]
    return (sorted_values[n // 2 - 1] + sorted_values[n // 2]) / 2


def pairwise_distances(updates, *, squared=True):
    """``[n, n]`` matrix of ||Delta_i - Delta_j||^2 (``squared=True``) or ||Delta_i - Delta_j||; zero diagonal.

    Computed from the differences (``torch.cdist`` without its matrix-product shortcut ||a||^2 + ||b||^2 - 2ab,
    which cancels badly for nearby updates and leaves a non-zero diagonal). In float32 the sum over d coordinates
    carries a relative error of about 1e-5 (float64: about 1e-14).
    """
    dist = torch.cdist(updates, updates, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.square() if squared else dist


# ---------------------------------------------------------------------------------------------------------------
# D2. Krum and Multi-Krum
# ---------------------------------------------------------------------------------------------------------------

def krum_scores(updates, f, *, squared=True):
    """Krum's score of every update (ALGORITHMS.md D2). Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.

    Formula: score_i = sum_{j in N_i} ||Delta_i - Delta_j||^2, with N_i the n - f - 2 updates nearest to Delta_i
    among the *other* n - 1 (i itself is excluded; a duplicate of Delta_i is another update, at distance 0).
    ``squared=False`` sums plain distances ||Delta_i - Delta_j|| instead, as the FedREDefense code does.

    Precondition: n - f - 2 >= 1 (at least one neighbour; Blanchard's guarantee further needs n > 2f + 2, which is
    not enforced) and f >= 0; ValueError otherwise. Returns ``[n]``.
    """
    n = len(updates)
    k = n - f - 2
    if f != int(f) or f < 0 or k < 1:
        raise ValueError(f"Krum needs an integer f >= 0 and n - f - 2 >= 1 neighbours, got n={n} updates and "
                         f"f={f} (n - f - 2 = {k})")
    k = int(k)
    dist = pairwise_distances(updates, squared=squared)
    dist.fill_diagonal_(float("inf"))  # i is not its own neighbour
    return dist.topk(k, dim=1, largest=False).values.sum(1)


def krum(updates, f, *, squared=True):
    """Krum (ALGORITHMS.md D2; Blanchard et al., NeurIPS 2017): the single update with the lowest ``krum_scores``.

    Formula: i* = argmin_i score_i (``krum_scores``); the aggregate is Delta_{i*} itself, a single client's update.
    f is the number of Byzantine clients the server assumes (FedREDefense's text: the true number q).

    Conventions:
    - squared distances and n - f - 2 neighbours, as Blanchard et al.; ties go to the lowest index.
    - FedREDefense code compat: ``squared=False`` (plain distances) with f = ``fedredefense_code_f(n, r)``.
    - n - f - 2 < 1: ValueError (the caller decides the fallback). FLDetector's code instead lowers f to n - 3 and
      picks a random update when n <= 2; not done here.

    Returns ``fl.Decision`` with ``accepted`` True for i* only.
    """
    i = int(krum_scores(updates, f, squared=squared).argmin())  # argmin returns the first minimum: lowest index
    return fl.Decision(update=updates[i].clone(), accepted=_selected(len(updates), i))


def multikrum(updates, f, m=None, *, squared=True):
    """Multi-Krum (ALGORITHMS.md D2; Blanchard et al., NeurIPS 2017, Sec. 5): the mean of the m best Krum scores.

    Formula: compute score_i (``krum_scores``) once for all n updates; S = the m updates with the lowest scores;
    aggregate = (1/m) sum_{i in S} Delta_i.

    Conventions:
    - one-shot selection (Blanchard's definition): the scores are not recomputed after each pick. Shejwalkar's
      code re-runs Krum on the remaining set instead, and FedDMC's code sums n - f - 1 neighbours; neither is done.
    - m = n - f by default (Blanchard's experiments); 1 <= m <= n. m = 1 is Krum, m = n the plain mean.
    - ties in the scores go to the lowest index (stable sort); squared distances unless ``squared=False``.
    - same precondition as Krum (n - f - 2 >= 1, ValueError otherwise).

    Returns ``fl.Decision`` with ``accepted`` True for the m selected updates.
    """
    n = len(updates)
    if m is None:
        m = n - f
    scores = krum_scores(updates, f, squared=squared)
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum needs 1 <= m <= n, got m={m} for n={n} updates")
    chosen = torch.sort(scores, stable=True).indices[:m]
    accepted = _selected(n, chosen.tolist())
    return fl.Decision(update=updates[accepted.to(updates.device)].mean(0), accepted=accepted)


# ---------------------------------------------------------------------------------------------------------------
# D3. Median and D4. Trimmed mean
# ---------------------------------------------------------------------------------------------------------------

def median(updates, *, lower=False):
    """Coordinate-wise Median (ALGORITHMS.md D3). Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018 (FedDefuse cites Xie et al. 2018 for it).

    Formula: aggregate_j = median_i Delta_ij, for every coordinate j separately.

    Conventions:
    - even n: the mean of the two middle values (the textbook median, numpy's and FLDetector's);
      ``lower=True`` returns the lower middle value, which is what ``torch.median`` and hence the FedREDefense code
      give. Odd n: the ((n+1)/2)-th smallest value either way.
    - n = 0: the zero update (the global model stays), like ``fl.fedavg``.

    Returns ``fl.Decision`` with ``accepted=None`` (no per-client decision).
    """
    if len(updates) == 0:
        return fl.Decision(update=fl.fedavg(updates), accepted=None)
    return fl.Decision(update=_middle(updates.sort(dim=0).values, lower), accepted=None)


def trmean(updates, b):
    """Coordinate-wise Trimmed mean (ALGORITHMS.md D4). Yin, Chen, Ramchandran, Bartlett, ICML 2018.

    Formula: for every coordinate j, sort Delta_1j..Delta_nj, drop the b largest and the b smallest, and average
    the n - 2b values left.

    Conventions:
    - b is given by the caller. FedREDefense's text trims b = q (the number of attackers) per side; Yin et al.
      write b = beta * n; the FedREDefense code uses ``fedredefense_code_f(n, r)`` (= 30 for 28 of 100).
    - requires an integer b >= 0 with n > 2b (at least one value left); ValueError otherwise.
      b = 0 is the mean; odd n with b = (n - 1)/2 is the median.

    Returns ``fl.Decision`` with ``accepted=None``.
    """
    n = len(updates)
    if b != int(b) or b < 0 or n <= 2 * b:
        raise ValueError(f"Trimmed mean needs an integer b >= 0 with n > 2b, got n={n} updates and b={b}")
    b = int(b)
    return fl.Decision(update=updates.sort(dim=0).values[b:n - b].mean(0), accepted=None)


# ---------------------------------------------------------------------------------------------------------------
# D5. Norm bound
# ---------------------------------------------------------------------------------------------------------------

def normbound(updates, M):
    """Norm bound (ALGORITHMS.md D5). Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
    2019.

    Formula: clip every update to norm at most M, bar Delta_i = Delta_i * min(1, M / ||Delta_i||), then aggregate
    (1/n) sum_i bar Delta_i. No "weak DP" noise (Sun et al.'s option; FedREDefense adds none).

    Conventions:
    - M is the caller's. Sun et al. use fixed constants (?verify: small values such as 3-10 on EMNIST);
      FedREDefense sets M to the mean norm of the benign updates, an oracle: ``oracle_norm_bound``. Without an
      oracle or a fixed M, this project's default is ``median_norm`` (the median update norm), which a real server
      can compute.
    - The ratio is only evaluated for updates longer than M (the others are kept bit for bit), with ||Delta_i||
      floored at 1e-8 as FedREDefense's guard against a zero norm. The FedREDefense code scales by
      (M + 1e-8) / (||Delta_i|| + 1e-8) instead, which leaves a clipped norm up to 1e-8 above M.
    - M must be >= 0 (ValueError otherwise); n = 0 gives the zero update, like ``fl.fedavg``.

    Returns ``fl.Decision`` with ``accepted=None`` (everyone is aggregated, clipped or not).
    """
    M = float(M)
    if not M >= 0:
        raise ValueError(f"Norm bound needs a threshold M >= 0, got M={M}")
    norms = torch.linalg.vector_norm(updates, dim=1)
    scale = torch.where(norms > M, M / norms.clamp_min(1e-8), torch.ones_like(norms))
    return fl.Decision(update=fl.fedavg(updates * scale[:, None]), accepted=None)


def oracle_norm_bound(updates, benign):
    """FedREDefense's Norm-bound threshold: the mean norm of the TRULY BENIGN updates. **An oracle.**

    This reads the ground truth ``benign`` (bool ``[n]``), which no real server has; it is here only to reproduce
    FedREDefense's Norm-bound numbers (its code tests benign identity by client id and calls the value
    ``median_tensor``, though it is a mean). If no update is benign, the mean norm over all updates (as the code).
    Returns a float (0.0 for no updates at all).
    """
    norms = torch.linalg.vector_norm(updates, dim=1)
    benign = benign.to(norms.device)
    if benign.any():
        norms = norms[benign]
    return norms.mean().item() if len(norms) else 0.0


def median_norm(updates):
    """The median of the update norms, median_i ||Delta_i||: a Norm-bound threshold M that needs no ground truth.

    This project's default M when neither a fixed M (Sun et al.) nor the oracle (``oracle_norm_bound``) is asked
    for. With fewer than half of the updates malicious, the median norm lies within the range of the benign norms.
    Even n: the mean of the two middle norms (as ``median``). Returns a float (0.0 for no updates).
    """
    if len(updates) == 0:
        return 0.0
    return _middle(torch.linalg.vector_norm(updates, dim=1).sort().values).item()


# ---------------------------------------------------------------------------------------------------------------
# D10. RFA (geometric median by smoothed Weiszfeld)
# ---------------------------------------------------------------------------------------------------------------

def geometric_median_objective(v, updates, alphas):
    """obj(v) = sum_i alpha_i ||v - Delta_i||, the weighted sum of distances the geometric median minimises."""
    return (alphas * torch.linalg.vector_norm(updates - v, dim=1)).sum()


def smoothed_weiszfeld(updates, weights=None, nu=1e-5, iters=4, ftol=1e-6):
    """The smoothed Weiszfeld iterations of RFA (ALGORITHMS.md D10); returns (v, [obj(v_0), obj(v_1), ...]).

    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (RFA), IEEE TSP 2022, Algorithm 2,
    following their code (``krishnap25/RFA`` ``geometric_median_update``):
        alpha_i = weights_i / sum_j weights_j            (uniform 1/n when ``weights`` is None)
        v_0 = sum_i alpha_i Delta_i                        (the weighted mean)
        repeat: beta_i = alpha_i / max(nu, ||v - Delta_i||);   v <- sum_i beta_i Delta_i / sum_i beta_i
        stop after ``iters`` updates of v, or once |obj_prev - obj| < ftol * obj.
    nu > 0 smooths the objective (a point closer than nu to v is weighted as if at distance nu) and keeps a step
    that lands on a data point finite. Defaults are RFA's code (nu = 1e-5, 4 iterations, ftol = 1e-6);
    the ``geom_median`` package uses nu = 1e-6, 100 iterations, ftol = 1e-20.

    The objective history is returned so that its monotone decrease can be checked. ``weights`` must be >= 0 with
    a positive sum (ValueError otherwise); n = 0 gives the zero vector and an empty history.

    Caveat of RFA's defaults (a test shows it): with a cluster of huge outliers (4 of 9 updates at 1e9) the start,
    the mean, is far away; each step shrinks the outliers' pull only by a constant factor, and the objective is
    dominated by their distances, so both 4 iterations and the relative ftol rule stop far from the benign updates.
    The converged geometric median (many iterations, ftol = 0) is robust (Minsker 2015, Lemma 2.1).
    """
    n, d = updates.shape
    if n == 0:
        return updates.new_zeros(d), []
    if weights is None:
        alphas = updates.new_full((n,), 1.0 / n)
    else:
        weights = torch.as_tensor(weights).to(updates)
        if (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("RFA needs non-negative weights with a positive sum")
        alphas = weights / weights.sum()
    v = alphas @ updates
    objective = [geometric_median_objective(v, updates, alphas).item()]
    for _ in range(iters):
        betas = alphas / torch.linalg.vector_norm(updates - v, dim=1).clamp_min(nu)
        v = (betas / betas.sum()) @ updates
        objective.append(geometric_median_objective(v, updates, alphas).item())
        if abs(objective[-2] - objective[-1]) < ftol * objective[-1]:
            break
    return v, objective


def rfa(updates, weights=None, nu=1e-5, iters=4, ftol=1e-6):
    """RFA (ALGORITHMS.md D10): the (approximate) geometric median of the updates. Pillutla, Kakade, Harchaoui,
    "Robust Aggregation for Federated Learning", IEEE TSP 2022; FedDefuse cites it as Minsker, "Geometric median
    and robust estimation in Banach spaces", Bernoulli 2015.

    Formula: aggregate = argmin_v sum_i alpha_i ||v - Delta_i||, approximated by ``smoothed_weiszfeld`` (its
    docstring has the iteration, the constants nu = 1e-5, 4 iterations, ftol = 1e-6 of RFA's code, and the stop
    rule). ``weights``: alpha_i before normalisation (None: uniform; RFA weights by client sample counts).

    Returns ``fl.Decision`` with ``accepted=None`` and ``details={"objective": [...]}`` (obj per iterate).
    """
    v, objective = smoothed_weiszfeld(updates, weights, nu, iters, ftol)
    return fl.Decision(update=v, accepted=None, details={"objective": objective})


# ---------------------------------------------------------------------------------------------------------------
# The pure rules as server-side defenses
# ---------------------------------------------------------------------------------------------------------------

ROBUST = ("krum", "multikrum", "median", "trmean", "normbound", "rfa")


def krum_f(f, n):
    """The f Krum runs with on n updates: the assumed f, lowered to n - 3 where n - f - 2 >= 1 would fail (as
    FLDetector's code does). The Fang attack on Krum simulates the server with the same value."""
    return min(f, n - 3)


class RobustDefense:
    """One of the ``ROBUST`` rules with the defense interface ``defense(updates, rnd) -> fl.Decision``.

    f (Krum, Multi-Krum) and b (Trimmed mean) are the number of malicious clients the server *assumes*
    (``run.py --assumed-malicious``, by default ``--malicious``: both papers' setting), never the round's ground
    truth. Where a rule's precondition fails in a round (partial participation, rejected updates) it falls back,
    and says so once on stderr:
    - Krum / Multi-Krum need n - f - 2 >= 1: f is lowered to n - 3 (``krum_f``); with n <= 2 there is nothing to
      compare, and the round is the plain mean (n = 1: that update).
    - Trimmed mean needs n > 2b: b is lowered to floor((n - 1) / 2) (for odd n, the median).
    Norm bound's M: ``"median"`` (``median_norm`` of the round, no ground truth; default), ``"oracle"``
    (FedREDefense's ``oracle_norm_bound``: reads the round's ground truth, like the ``oracle`` defense) or a fixed
    number (Sun et al.). RFA weights the updates by the clients' data sizes, as RFA's code.
    """

    def __init__(self, rule, assumed_malicious, norm_bound="median", warn=None):
        if rule not in ROBUST:
            raise ValueError(f"unknown robust rule {rule!r}; expected one of {ROBUST}")
        self.rule, self.f, self.norm_bound = rule, assumed_malicious, norm_bound
        self.warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.warned = False

    def fallback(self, message):
        if not self.warned:
            self.warn(f"{self.rule}: {message} (said once per run)")
            self.warned = True

    def __call__(self, updates, rnd):
        n, rule = len(updates), self.rule
        if rule in ("krum", "multikrum"):
            if n <= 2:
                self.fallback(f"a round of {n} updates has no Krum neighbours; aggregating their mean")
                return fl.Decision(update=fl.fedavg(updates), accepted=torch.ones(n, dtype=torch.bool))
            f = krum_f(self.f, n)
            if f < self.f:
                self.fallback(f"n - f - 2 < 1 with f = {self.f} and n = {n}; using f = {f}")
            return krum(updates, f) if rule == "krum" else multikrum(updates, f)
        if rule == "trmean":
            b = min(self.f, (n - 1) // 2)
            if b < self.f:
                self.fallback(f"n <= 2b with b = {self.f} and n = {n}; using b = {b}")
            return trmean(updates, b)
        if rule == "median":
            return median(updates)
        if rule == "normbound":
            return normbound(updates, self.threshold(updates, rnd))
        return rfa(updates, weights=rnd.sizes)

    def threshold(self, updates, rnd):
        """Norm bound's M for this round: the median norm, the oracle's mean benign norm, or the fixed number."""
        if self.norm_bound == "median":
            return median_norm(updates)
        if self.norm_bound == "oracle":
            return oracle_norm_bound(updates, ~rnd.malicious)
        return self.norm_bound
