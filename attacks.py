"""Model-poisoning attacks: what the malicious clients upload in a round.

Sources: each function names its attack's paper. The seed papers' settings are FedREDefense (ICML 2024) sec. 5.1.2
and App. A.2, and FedDefuse App. B.1; where the FedREDefense authors' code (github: xyq7/FedREDefense,
``codes/client.py``) differs from a paper, the docstring says which one is followed.

Conventions (those of ``fl.py``):
- Parameters and updates are flat vectors; an update is ``g = w_local - w_global``; a set of updates is ``[n, d]``.
- Crafted attacks (``CRAFTED``) start from the genuine updates the attackers computed this round by training
  honestly on their own data, and collude on a *known* set of genuine updates: partial knowledge (every
  compromised participant's, FedREDefense sec. 3 and its official code) or full knowledge (every participant's,
  FedDefuse). ``craft`` takes both; every statistic-based function takes the known set as its ``honest``
  argument.
- Backdoor attacks (``BACKDOOR``) poison the local training itself (``backdoor_update``); so do the label flips
  (``LABEL_FLIP``, ``flip_labels``: data poisoning, FedREDefense sec. 6.1), whose adaptive variants (``ADAPTIVE``)
  then scale the update by the largest factor the defense still accepts (``adaptive_scale``, Algorithm 3).
- Every random draw uses the ``torch.Generator`` passed in (a CPU generator) and is made on the CPU, then moved to
  the input's device, so the same seed gives the same attack on every device.
- Fewer than 2 known updates leave the standard deviation undefined; the statistics-based attacks (Fang, LIE,
  Min-Max, Min-Sum) then send the zero update, as the FedREDefense authors' code does.
"""
import copy
import math
from statistics import NormalDist

import torch

import baselines
import fl

CRAFTED = ("fang", "lie", "minmax", "minsum", "mpaf", "signflip", "gaussian")  # crafted from honest updates
BACKDOOR = ("scaling", "dba")  # poisoned local training
ADAPTIVE = ("adaptive-labelflip", "adaptive-targeted-labelflip")  # label flips scaled by Algorithm 3
LABEL_FLIP = ("labelflip", "targeted-labelflip") + ADAPTIVE  # training on flipped labels (FedREDefense sec. 6.1)
TARGETED = ("targeted-labelflip", "adaptive-targeted-labelflip")  # ASR: source-class images sent to the target
# CLI order: none, the FedREDefense attacks (A.2 order), the two FedDefuse-only attacks, then sec. 6.1's four.
ATTACKS = ("none",) + CRAFTED[:5] + BACKDOOR + CRAFTED[5:] + LABEL_FLIP
FLIP_SOURCE, FLIP_TARGET = 0, 2  # targeted label flip: class 0 relabelled as 2 (Tolpegin et al. 2020)
BACKDOOR_TARGET = 0  # the backdoors' target class (FedREDefense App. A.2)


def _rand(shape, generator, like, normal=False):
    """Uniform(0,1) (or N(0,1)) numbers drawn on the CPU with ``generator``, then cast/moved like ``like``."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)


# ---------------------------------------------------------------------------------------------------------------
# Fang (trimmed-mean / median attack), partial and full knowledge (Fang et al., USENIX Security 2020, sec. 4)
# ---------------------------------------------------------------------------------------------------------------

def fang(honest, n_out, generator):
    """Fang attack on Trimmed-mean/Median, partial-knowledge variant.

    Source: Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
    USENIX Security 2020, Sec. 4; the variant is the one the FedREDefense code runs (``client.py:Client_Fang``),
    which both seed papers call "Fang".

    Formula, per coordinate j, with mu_j and sigma_j the mean and std of the known updates and s_j = sign(mu_j):
        s_j = -1 (mu_j < 0):  g_j = mu_j + (3 + u_j) sigma_j   in [mu_j + 3 sigma_j, mu_j + 4 sigma_j]
        s_j = +1 (mu_j > 0):  g_j = mu_j - (4 - u_j) sigma_j   in [mu_j - 4 sigma_j, mu_j - 3 sigma_j]
        s_j =  0 (mu_j = 0):  g_j = 0
    i.e. each coordinate is pushed 3-4 standard deviations against the direction the benign aggregate would move
    it. u_j ~ U(0,1) is drawn afresh for every output row and coordinate (so the attackers send different
    vectors); one u_j serves whichever branch applies, as in the official code.

    Knowledge: partial -- ``honest`` ``[m, d]`` are the attackers' own genuine updates (any known set works).

    Choices where sources disagree:
    - Update space (not Fang's model-parameter space), as in the seed papers' pipelines.
    - sigma is the unbiased std (ddof 1) as in the FedREDefense code; FLDetector's ``partial_trim`` uses ddof 0
      and the deterministic midpoint 3.5 sigma instead of a uniform draw.
    - mu_j == 0 gives 0 (= mu_j), as in the FedREDefense code; Fang's paper does not cover it.
    - m < 2 (std undefined) gives zero updates, as in the FedREDefense code.
    - Against Krum the papers run Fang's Krum-specific attack instead (``fang_krum``; ``craft`` chooses).
    - Under full knowledge ``craft`` runs Fang's own full-knowledge attack instead (``fang_full``).

    Returns ``[n_out, d]``.
    """
    m, d = honest.shape
    if m < 2:
        return honest.new_zeros(n_out, d)
    mu = honest.mean(0)
    sigma = honest.std(0, unbiased=True)
    u = _rand((n_out, d), generator, honest)
    up = mu + (3 + u) * sigma      # s_j = -1: push the coordinate up
    down = mu - (4 - u) * sigma    # s_j = +1: push it down
    return torch.where(mu < 0, up, torch.where(mu > 0, down, torch.zeros_like(up)))


def fang_full(benign, n_out, generator, b=2.0):
    """Fang attack on Trimmed-mean/Median, full-knowledge variant: the attack as its paper states it. Fang, Cao,
    Jia, Gong, USENIX Security 2020, Sec. 4 ("attacking Trimmed mean", full knowledge; the same crafted values
    attack Median).

    Formula, per coordinate j, with s_j the sign of the benign aggregate and w_max,j / w_min,j the largest and
    smallest benign value:
        s_j = -1:  g_j ~ U[w_max,j, b w_max,j]  if w_max,j > 0,   else U[w_max,j, w_max,j / b]
        s_j = +1:  g_j ~ U[w_min,j / b, w_min,j]  if w_min,j > 0,   else U[b w_min,j, w_min,j]
        s_j =  0:  g_j = 0
    i.e. each coordinate lands just beyond the benign range, on the side opposite to the benign aggregate's move;
    b = 2. u ~ U(0,1) is drawn afresh for every output row and coordinate (on the CPU with ``generator``), one u
    serving whichever branch applies.

    Knowledge: full -- ``benign`` ``[m, d]`` are the genuine updates the attackers know (``craft`` passes
    every participant's genuine update, the attackers' own honestly trained ones included).

    Choices where sources disagree or the paper is silent:
    - Update space (not Fang's model-parameter space), as the seed papers' pipelines and Shejwalkar's and
      FLDetector's code (``get_malicious_updates_fang_trmean``, ``full_trim``, both on gradients).
    - s = sign of the *mean* of ``benign``: Fang defines s_j as the direction of the global model's change
      without attack, which the attacker computes from the genuine updates; the mean (FedAvg's aggregate) is
      what FLDetector's ``full_trim`` (the sign of the sum) and ``fang`` use, not the trimmed mean of the AGR.
    - The bounds come from ``benign`` as given. Fang's w_max,j / w_min,j are over the benign devices; here the
      attackers' own genuine updates are among them (FLDetector's ``full_trim`` takes the max/min over all
      devices' genuine gradients the same way). They are honestly trained, so they are benign-distributed.
    - Uniform draws, as Fang's text and Shejwalkar's code; FLDetector's ``full_trim`` takes the far endpoint
      (b w or w / b) deterministically. s_j = 0 gives 0 (Fang is silent; FLDetector's code gives 0).
    - Unlike ``fang`` one known update suffices (no std is needed); none known gives zero updates.

    Returns ``[n_out, d]``.
    """
    m, d = benign.shape
    if m == 0:
        return benign.new_zeros(n_out, d)
    s = torch.sign(benign.mean(0))
    w_max, w_min = benign.max(0).values, benign.min(0).values
    beyond_max = torch.where(w_max > 0, b * w_max, w_max / b)  # the far end of the interval above w_max
    beyond_min = torch.where(w_min > 0, w_min / b, b * w_min)  # the far end of the interval below w_min
    u = _rand((n_out, d), generator, benign)
    up = w_max + u * (beyond_max - w_max)       # s_j = -1: in [w_max, beyond_max]
    down = beyond_min + u * (w_min - beyond_min)  # s_j = +1: in [beyond_min, w_min]
    return torch.where(s < 0, up, torch.where(s > 0, down, torch.zeros_like(up)))


# ---------------------------------------------------------------------------------------------------------------
# Fang attack on Krum (not in the official FedREDefense code: its ``Client_Krum`` is dead, broken code)
# ---------------------------------------------------------------------------------------------------------------

def fang_krum_bound(known, n_attackers, n_participants=None):
    """lambda_0, Fang's upper bound on lambda in the attack on Krum.

    Source: Fang, Cao, Jia, Gong, USENIX Security 2020, Sec. 4 ("attacking Krum"), in update space (the
    pre-attack global model is the origin, so ||Delta_i|| is its distance to it). With c = ``n_attackers``,
    n = ``n_participants``, K = ``known`` ``[m, d]``, plain (not squared) Euclidean distances:
        lambda_0 = 1 / ((n - 2c - 1) sqrt(d)) * min_{i in K} sum_{l in Gamma_i} ||Delta_l - Delta_i||
                   + 1 / sqrt(d) * max_{i in K} ||Delta_i||,
    Gamma_i = the n - c - 2 known updates nearest to Delta_i, i excluded (?verify the count against the paper;
    Shejwalkar's code sums n_benign - c - 2).

    Choices (Fang states the bound for full knowledge, K = the n - c benign updates):
    - n defaults to m + c (full knowledge). Under partial knowledge the caller passes the round's participants,
      e.g. 7 attackers knowing their own 7 genuine updates, n = 25.
    - Gamma_i is clamped to the m - 1 other known updates when n - c - 2 exceeds them (partial knowledge): the
      sum, and so the starting lambda, is then smaller than with full knowledge. m = 1: the sum is empty (0).
    - Where the bound is undefined, n - 2c - 1 <= 0 (c >= n/2) or n - c - 2 <= 0, or where it is not a positive
      finite number (e.g. every known update is zero, or m = 0), lambda_0 = 1: FLDetector's starting value.

    Returns a float.
    """
    m, d = known.shape
    c = n_attackers
    n = m + c if n_participants is None else n_participants
    if n - 2 * c - 1 <= 0 or n - c - 2 <= 0 or m == 0 or d == 0:
        return 1.0
    dist = baselines.pairwise_distances(known, squared=False)
    dist.fill_diagonal_(float("inf"))
    n_neighbours = min(n - c - 2, m - 1)
    neighbour_sums = dist.topk(n_neighbours, dim=1, largest=False).values.sum(1)  # [m]; zeros when m = 1
    max_norm = torch.linalg.vector_norm(known, dim=1).max()
    lambda_0 = (neighbour_sums.min() / ((n - 2 * c - 1) * math.sqrt(d)) + max_norm / math.sqrt(d)).item()
    return lambda_0 if 0 < lambda_0 < math.inf else 1.0


def fang_krum_lambda(known, n_attackers, f, *, n_participants=None, lambda_min=1e-5):
    """Fang's search for lambda (Fang et al., USENIX Security 2020, sec. 4); returns (lambda, lambda_0).

    Starting from lambda = lambda_0 (``fang_krum_bound``):
        while lambda >= lambda_min:
            if Krum(K followed by c copies of -lambda s, f) selects a copy: stop
            lambda <- lambda / 2
    with s = sign(mean of K) and Krum = ``baselines.krum`` (squared distances, the given f). If no lambda down to
    lambda_min succeeds, the last lambda (the first one below lambda_min) is used anyway, as both Fang's and
    FLDetector's code do. So lambda <= lambda_0 and lambda_0 / lambda is a power of 2.

    Choices:
    - Knowledge is whatever ``known`` is: the simulated round is K plus the c copies (partial knowledge: Fang
      simulates Krum on those alone; FLDetector's partial variant also grows the number of simulated attackers,
      not done here).
    - The known updates come first and the copies last (the attackers are the last ids in this project), so a
      tie in the Krum scores goes to a known update: the search only stops on a strict win.
    - If Krum cannot run on the simulated round (m + c - f - 2 < 1), there are no attackers (c = 0) or nothing is
      known (m = 0), there is nothing to search: lambda = lambda_0.
    """
    m, d = known.shape
    c = n_attackers
    lambda_0 = fang_krum_bound(known, c, n_participants)
    if c < 1 or m == 0 or m + c - f - 2 < 1:
        return lambda_0, lambda_0
    s = torch.sign(known.mean(0))
    lam = lambda_0
    while lam >= lambda_min:
        crafted = (-lam * s).expand(c, d)
        if baselines.krum(torch.cat([known, crafted]), f).accepted[m:].any():
            break
        lam /= 2
    return lam, lambda_0


def fang_krum(known, n_attackers, f, generator, *, n_participants=None, eps=0.01, lambda_min=1e-5):
    """Fang attack on Krum. Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated
    Learning", USENIX Security 2020, Sec. 4; the search and the noise follow FLDetector's ``byzantine.py``
    (``dir_full_krum_lambda`` / ``dir_partial_krum_lambda``), same group. Used only when the server runs Krum (both
    seed papers; FedREDefense A.2).

    Formula, with K = ``known`` ``[m, d]``, c = ``n_attackers`` and s = sign(mean of K) in {-1, 0, +1}^d:
        Delta'_1 = -lambda * s,           lambda from ``fang_krum_lambda`` (Fang's bound, halved until simulated
                                          Krum with the server's ``f`` selects a crafted update)
        Delta'_k = Delta'_1 + xi_k,       k = 2..c, ||xi_k|| <= eps,
    xi_k = u / ||u|| * r * eps with u ~ Uniform(-1/2, 1/2)^d and r ~ U(0,1) (FLDetector), drawn after lambda is
    fixed (during the search all c copies are identical), on the CPU with ``generator``, then moved to K's
    device. Coordinates with s_j = 0 stay 0 in Delta'_1 (only the noise touches them in the other rows).

    Knowledge: K + Krum with its f. Partial: K = the attackers' own genuine updates, with ``n_participants`` the
    round's n for the bound; full: K = all benign updates (``n_participants`` defaults to m + c).

    Choices where sources disagree: direction from the mean of K (Shejwalkar; matches ``fang``), not FLDetector's sign
    of Krum(K) nor Fang's unattacked global-model change; start at Fang's bound, not FLDetector's lambda = 1
    (which is kept as the fallback where the bound is undefined, see ``fang_krum_bound``); eps = 0.01 and
    lambda_min = 1e-5 as FLDetector. m = 0 (nothing known, no direction): zero updates, like the other crafted
    attacks with too little knowledge.

    Returns ``[n_attackers, d]``.
    """
    m, d = known.shape
    c = n_attackers
    if m == 0 or c == 0:
        return known.new_zeros(c, d)
    lam, _ = fang_krum_lambda(known, c, f, n_participants=n_participants, lambda_min=lambda_min)
    first = -lam * torch.sign(known.mean(0))
    u = _rand((c - 1, d), generator, known) - 0.5
    xi = u / torch.linalg.vector_norm(u, dim=1, keepdim=True) * _rand((c - 1, 1), generator, known) * eps
    return torch.cat([first[None], first + xi])


# ---------------------------------------------------------------------------------------------------------------
# LIE -- A Little Is Enough (not in the official FedREDefense code)
# ---------------------------------------------------------------------------------------------------------------

def lie_z(n, q):
    """z_max of LIE: the largest z with Phi(z) < (n - q - s) / (n - q), s = floor(n/2 + 1) - q.

    Source: Baruch, Baruch, Goldberg, "A Little Is Enough", NeurIPS 2019; formula as printed in FedREDefense
    App. A.2 (p participants there = ``n`` here, q malicious, n includes the malicious clients). The supremum is
    Phi^{-1} of the ratio (``statistics.NormalDist().inv_cdf``). Worked values: z(100, 28) = 0.46925,
    z(50, 10) = 0.25335.

    Raises ValueError where the formula is undefined: q >= floor(n/2) + 1 (then s <= 0 and the ratio is >= 1, so
    z would be infinite -- e.g. FedREDefense's 72-of-100 sweep, for which neither paper says what was done), a
    negative q, or n so small that the ratio is 0.
    """
    n, q = int(n), int(q)
    if q < 0 or n < 1:
        raise ValueError(f"LIE needs n >= 1 participants and q >= 0 malicious ones, got n={n}, q={q}")
    if q >= n // 2 + 1:
        raise ValueError(
            f"LIE's z_max is undefined for q={q} >= floor(n/2)+1={n // 2 + 1} malicious of n={n} participants: "
            "the supporters s = floor(n/2+1) - q would be <= 0, the ratio (n-q-s)/(n-q) >= 1 and z infinite. "
            "Pass an explicit z to lie() to run it anyway.")
    s = math.floor(n / 2 + 1) - q
    ratio = (n - q - s) / (n - q)
    if ratio <= 0:
        raise ValueError(f"LIE's z_max is undefined for n={n}, q={q}: the ratio (n-q-s)/(n-q) = {ratio} <= 0")
    return NormalDist().inv_cdf(ratio)


def lie(honest, n, q, *, z=None):
    """LIE, "A Little Is Enough". NOT in the official FedREDefense code (written from the papers).

    Source: Baruch, Baruch, Goldberg, NeurIPS 2019; FedREDefense App. A.2 gives the form used here.

    Formula (FedREDefense A.2 notation, p = ``n`` participants, q malicious): every malicious client sends
        g_j = mu_j - z_max * sigma_j,   z_max = Phi^{-1}((p - q - s) / (p - q)),   s = floor(p/2 + 1) - q,
    with mu_j, sigma_j the coordinate-wise mean and std of the known updates (see ``lie_z``). All ``q`` rows are
    identical.

    Knowledge: partial -- ``honest`` are the attackers' own genuine updates (the original attack is likewise
    non-omniscient; FedREDefense does not say which set it used); plus n and q.

    Choices where sources disagree:
    - z_max from (p - q - s) / (p - q), FedREDefense App. A.2's formula (FLPoison's ``alie.py`` computes the same).
      Baruch et al.'s Algorithm 1 could not be read here; some ports write (n - s) / n instead (z(100, 28) =
      0.739 instead of 0.469), and Baruch et al.'s own code computes neither: it takes z as a command-line
      argument (``main.py --num_std``, default 1.5). LIE runs only under FedREDefense's protocol here (FedDefuse
      does not run it), so FedREDefense's formula is the one its tables were made with.
    - Sign: mu - z sigma *in update space*, as FedREDefense A.2 writes it for "model updates". Baruch et al. work on
      gradients (g = -update / lr), where their mu - z sigma is mu + z sigma in update space (FLPoison sends
      mu + z sigma of the updates). FedREDefense's code has no LIE, so which sign its tables used cannot be
      checked; its text is followed.
    - sigma is the population std (ddof 0), as in Baruch et al.'s code (Shejwalkar's notebooks use ddof 1).
    - Fewer than 2 known updates: zero updates, like the other statistics-based attacks (common convention).
    - q >= floor(n/2) + 1: ValueError (``lie_z``) unless an explicit ``z`` is given; no cap on the CDF.
    - Shejwalkar's hard-coded z tables (e.g. 0.72575 for n=50, q=10) do not follow the formula; not used.

    Returns ``[q, d]``.
    """
    if z is None:
        z = lie_z(n, q)
    m, d = honest.shape
    if m < 2:
        return honest.new_zeros(q, d)
    mu = honest.mean(0)
    sigma = honest.std(0, unbiased=False)
    return (mu - z * sigma).expand(q, d).clone()


# ---------------------------------------------------------------------------------------------------------------
# Min-Max and Min-Sum (AGR-agnostic optimisation attacks)
# ---------------------------------------------------------------------------------------------------------------

def _sq_dists_to(updates, v):
    """||updates_i - v||^2 for every row i."""
    return (updates - v).pow(2).sum(1)


def _pairwise_sq_dists(updates):
    """[m, m] matrix of ||updates_i - updates_j||^2, one row at a time (no [m, m, d] tensor, no Gram cancellation)."""
    return torch.stack([_sq_dists_to(updates, u) for u in updates])


def _perturbation(honest, mu, dev_type):
    if dev_type == "std":
        return honest.std(0, unbiased=True)
    if dev_type == "unit_vec":
        return mu / mu.norm()
    if dev_type == "sign":
        return torch.sign(mu)
    raise ValueError(f"unknown dev_type {dev_type!r}; expected 'std', 'unit_vec' or 'sign'")


def _gamma_search(feasible, gamma_init, tau):
    """The bisection of Shejwalkar's code and FedREDefense's ``Client_MinMax``/``Client_MinSum``:

        gamma = step = gamma_init; gamma_succ = 0
        while |gamma_succ - gamma| > tau:
            if feasible(gamma): gamma_succ = gamma; gamma += step/2
            else:               gamma -= step/2
            step /= 2
    Returns gamma_succ, which lies in [0, 2 * gamma_init) (0 when even a tiny step is infeasible).
    """
    gamma, step, gamma_succ = float(gamma_init), float(gamma_init), 0.0
    while abs(gamma_succ - gamma) > tau:
        if feasible(gamma):
            gamma_succ = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return gamma_succ


def _optimisation_attack(honest, gamma_init, tau, dev_type, rule):
    m, d = honest.shape
    if m < 2:
        return honest.new_zeros(d)
    mu = honest.mean(0)
    p = _perturbation(honest, mu, dev_type)
    dists = _pairwise_sq_dists(honest)
    if rule == "minmax":
        bound = dists.max()

        def feasible(gamma):
            return _sq_dists_to(honest, mu - gamma * p).max() <= bound
    else:
        bound = dists.sum(1).min()

        def feasible(gamma):
            return _sq_dists_to(honest, mu - gamma * p).sum() <= bound
    return mu - _gamma_search(feasible, gamma_init, tau) * p


def min_max(honest, gamma_init=30.0, tau=1e-5, *, dev_type="std"):
    """Min-Max. Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021, Algorithm 1.

    Formula: g_m = mu - gamma * p, with mu the mean of the known updates {g_i}, p the perturbation (coordinate-wise
    std of {g_i}, unbiased: the "std" variant FedREDefense A.2 uses), and gamma the largest value the bisection
    ``_gamma_search`` finds with
        max_i ||g_m - g_i||^2  <=  max_{i,j} ||g_i - g_j||^2      (squared distances, as in the code),
    i.e. the malicious update is no farther from any known update than the two farthest known updates are from
    each other. The constraint holds at gamma = 0 (mu is in their convex hull) and its left side is convex in gamma,
    so feasibility is monotone and the bisection finds the boundary to ~tau (or saturates at ~2 gamma_init).

    Knowledge: partial (the attackers' own genuine updates, as in the FedREDefense code); AGR-agnostic. The
    paper's main setting is full knowledge (all benign updates): pass those as ``honest`` for it.

    Sign: mu - gamma p *in update space* is the FedREDefense code's (``Client_MinMax``, on model updates).
    Shejwalkar & Houmansadr perturb *gradients*, nabla^b - gamma p with p the gradients' std, which in update space
    (update = -lr * gradient) is mu + gamma p. The two candidates are mirror images about mu: Min-Sum's constraint
    and so its gamma are the same for both (the cross term sums to zero), Min-Max's gamma can differ, and the
    direction of the malicious update differs. The FedREDefense code's sign is kept because FedREDefense's tables
    were made with it.

    Choices: gamma_init = 30 (FedREDefense ``threshold=30``; Shejwalkar's notebooks use 10), tau = 1e-5;
    ``dev_type`` 'std' by default ('unit_vec' = mu/||mu|| and 'sign' = sign(mu) are the paper's other variants);
    m < 2 gives the zero update (FedREDefense). All malicious clients send this same vector.

    Returns ``[d]`` (the caller repeats it for every attacker).
    """
    return _optimisation_attack(honest, gamma_init, tau, dev_type, "minmax")


def min_sum(honest, gamma_init=30.0, tau=1e-5, *, dev_type="std"):
    """Min-Sum. Shejwalkar & Houmansadr, NDSS 2021, Algorithm 1 with the Min-Sum objective.

    Formula: g_m = mu - gamma * p as in ``min_max``, with gamma found by the same bisection under
        sum_i ||g_m - g_i||^2  <=  min_i sum_j ||g_i - g_j||^2     (squared distances),
    i.e. the malicious update's total distance to the known updates does not exceed the smallest total distance
    of any known update to the others. Because mu is their mean the cross term vanishes and the constraint has the
    closed form gamma* = sqrt((min_i sum_j ||g_i - g_j||^2 - sum_i ||mu - g_i||^2) / (m ||p||^2)); the search
    returns min(gamma*, ~2 gamma_init) to within ~tau.

    Knowledge and choices: as ``min_max`` (partial knowledge, gamma_init = 30 FedREDefense preset, tau = 1e-5, std
    perturbation with ddof 1, m < 2 gives the zero update), and the same sign: mu - gamma p in update space, the
    FedREDefense code's (``Client_MinSum``), the opposite of the NDSS paper's gradient-space perturbation.

    Returns ``[d]``.
    """
    return _optimisation_attack(honest, gamma_init, tau, dev_type, "minsum")


# ---------------------------------------------------------------------------------------------------------------
# MPAF -- fake clients
# ---------------------------------------------------------------------------------------------------------------

def mpaf(w_base, w_global, scale=3.0):
    """MPAF. Cao & Gong, "MPAF: Model Poisoning Attacks to Federated Learning based on Fake Clients", CVPR
    Workshops 2022.

    Formula: g = lambda * (w_base - w^{t-1}): every fake client pulls the global model towards a base model.

    Knowledge: the current global model (which every client receives) and the base model; no data, no training,
    no benign update, no aggregation rule.

    Choices (FedREDefense App. A.2 and ``Client_MPAF``): base = the initial global model w^0, lambda = 3. The
    original MPAF uses an attacker-chosen random model and lambda >> 1 (1e6 in a third-party port; unverified).
    MPAF injects *extra* fake clients; FedREDefense lets its q compromised clients play them, and so does the
    caller here: this function only crafts the vector.

    Returns ``[d]``.
    """
    return scale * (w_base - w_global)


# ---------------------------------------------------------------------------------------------------------------
# Sign flipping and Gaussian (FedDefuse's attacks)
# ---------------------------------------------------------------------------------------------------------------

def sign_flip(honest, k=1.0):
    """Sign-flipping. FedDefuse App. B.1, citing Wu, Ling, Chen, Giannakis, IEEE TSP 2020.

    Formula (FedDefuse notation): Delta_w^r = -k * hat{Delta}_w^r, each attacker's own honest update flipped.

    Knowledge: own (each row uses only its own honest update).

    Choice: k = 1 by default (a pure flip, as in FLPoison and Damaskinos et al.); FedDefuse gives no k, other works
    use 4 or 10, and Wu et al.'s value is unverified. ``run.py --signflip-k`` sets it.

    Returns ``[m, d]``, row-wise.
    """
    return -k * honest


def gaussian(honest, w_global, sizes, generator):
    """Gaussian attack. FedDefuse App. B.1, citing Ma et al. 2022 ("DisBezant").

    Formula, FedDMC-lineage code reading (``clients.py`` GS_attack): each attacker trains honestly, giving the local
    model theta = w^{t-1} + hat{Delta}; then every parameter tensor P of theta is replaced element-wise by
        P~ = mean(P) + std(P) * N(0, 1),
    and the attacker uploads theta~, i.e. the update theta~ - w^{t-1}.

    Knowledge: own (each attacker's own trained model).

    Choices where sources disagree (FedDefuse's text writes Delta = mu + N(0,1) * sigma with mu, sigma "the average
    and variance of all parameters of the model"):
    - the *local model* is replaced, not the update (text and code agree on "replaces the local model");
    - per parameter tensor (code), not one mean/std over all parameters (text); tensor slices come from ``sizes``
      (``fl.param_sizes(model)``, the numel of each tensor in flat order);
    - sigma is the (unbiased, ``torch.std``) standard deviation, as in the code: a scale on N(0,1) must be a std;
    - a tensor with a single entry has no std; it gets sigma = 0 (the code would produce NaN);
    - the code's other variant (noise * 2 sigma, in an unused function) is not followed.
    The noise is one N(0,1) draw of shape [m, d], made on the CPU with ``generator``.

    Returns ``[m, d]``.
    """
    if sum(sizes) != honest.shape[1]:
        raise ValueError(f"sizes sum to {sum(sizes)} but the updates have {honest.shape[1]} entries")
    theta = w_global + honest
    noise = _rand(honest.shape, generator, honest, normal=True)
    theta_tilde = torch.empty_like(theta)
    start = 0
    for size in sizes:
        block = theta[:, start:start + size]
        mean = block.mean(1, keepdim=True)
        std = block.std(1, keepdim=True, unbiased=True) if size > 1 else torch.zeros_like(mean)
        theta_tilde[:, start:start + size] = mean + std * noise[:, start:start + size]
        start += size
    return theta_tilde - w_global


# ---------------------------------------------------------------------------------------------------------------
# Scaling and DBA -- backdoors by poisoned local training
# ---------------------------------------------------------------------------------------------------------------

def backdoor_update(model, w_global, x, y, x_poisoned, target, lr, generator, scale=3.0, epochs=1):
    """Backdoor update of Scaling and DBA, FedREDefense recipe.

    Sources: Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020 (Scaling / model replacement);
    Xie, Huang, Chen, Li, "DBA: Distributed Backdoor Attacks against Federated Learning", ICLR 2020; the recipe is
    FedREDefense App. A.2 and its code (``utils.py:train_op_backdoor`` / ``train_op_dba``).

    Formula: starting from w^{t-1}, for each local epoch run
        1. one SGD pass over (x_poisoned, target) -- *every* sample triggered and relabelled to the target, then
        2. one SGD pass over the clean (x, y),
    then upload g = S * (w_local - w^{t-1}) with S = ``scale`` (3 in FedREDefense). The attacker thus takes twice
    the SGD steps of a benign client (same optimiser: ``fl.sgd_epoch``, plain SGD, seeded order).

    The trigger is the caller's: ``x_poisoned = data.add_trigger(x, pixels)`` with all 4 pixels for Scaling, or
    only ``[pixels[cid % 4]]`` for DBA (client ``cid``'s local pattern), where ``pixels`` are the code's, moved where
    the model reads them (``visible_trigger``). Target label 0 in FedREDefense.

    Knowledge: own data only.

    Choices where sources disagree: FedREDefense's alternate-pass schedule, S = 3, 4-pixel trigger and target 0
    (not Bagdasaryan's gamma = n/eta = 100 with poisoned samples mixed into each batch and label 2, nor DBA's
    original 1x4 bars, target 2, gamma = 100, nor FedDMC's half-batch 9-pixel patch with s = (n/q)/2).

    Returns ``[d]``; ``model`` is left holding the (unscaled) poisoned local model and ``w_global`` is unchanged.
    """
    # Load a copy: ``torch.nn.utils.vector_to_parameters`` (behind ``fl.load_params``) makes the parameters *views*
    # of the vector it is given, so training on them would otherwise overwrite ``w_global`` in place.
    fl.load_params(model, w_global.clone())
    y_target = torch.full((len(x_poisoned),), int(target), dtype=torch.long, device=x_poisoned.device)
    for _ in range(epochs):
        fl.sgd_epoch(model, x_poisoned, y_target, lr, generator)
        fl.sgd_epoch(model, x, y, lr, generator)
    return scale * (fl.flatten_params(model) - w_global)


def visible_trigger(model, pixels, sample_shape):
    """The trigger ``pixels`` moved up and left, a pixel at a time, until ``model`` reads every one of them.

    The attacker holds the global model, so it plants its trigger where the model can see it. The FedREDefense
    code's pixels (``data.trigger_pixels``: rows and columns 24-26) are read by its ConvNet, by the MLP, and by the
    paper's CNN (Table 5, ``fl.CNN``) on 8- and 32-pixel images. On 28-pixel images that CNN, with valid
    convolutions, reads rows and columns 0-25 only: its second 2x2 max-pool floors 11 rows to 5 and drops the last.
    Three of the four pixels would never reach its output. There the pattern moves by one pixel, to (25,25),
    (23,25), (25,23), (24,24); every other model and image size keeps the code's pixels. The papers give no trigger
    position. (Where it reads the trigger, that CNN still barely learns it: RESULTS.md, "The backdoor trigger and
    the paper's CNN (FashionMNIST)".)

    A pixel is read when the gradient of the model's outputs on random inputs is non-zero there (any channel).
    """
    device = fl.device_of(model)
    x = torch.randn(8, *sample_shape, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    gradient, = torch.autograd.grad(model(x).sum(), x)
    read = (gradient.abs().sum((0, 1)) > 0).cpu()  # [H, W]
    for shift in range(min(min(p) for p in pixels) + 1):
        moved = [(r - shift, c - shift) for r, c in pixels]
        if all(read[r, c] for r, c in moved):
            return moved
    raise ValueError(f"the model reads none of the positions the trigger {pixels} can move to")


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------

def craft(name, honest, known, *, n_participants, w_global, w_init, sizes, generator, signflip_k=1.0, krum_f=None,
          knowledge="partial"):
    """The crafted updates of the attack ``name`` (one of ``CRAFTED``) for this round's attackers.

    honest: ``[q, d]``, the attacking clients' own genuine updates this round (every attacker trains honestly
        first; sign-flip and Gaussian transform their own row).
    known: ``[k, d]``, the genuine updates the colluding attackers know, from which Fang, LIE, Min-Max and Min-Sum
        take their statistics: *partial* knowledge, the genuine updates of every compromised participant of the
        round, attacking or not (FedREDefense sec. 3), or *full* knowledge, every participant's genuine update
        (FedDefuse sec. 1: "complete knowledge of others"). The caller chooses.
    n_participants: clients taking part this round, malicious included (LIE's n; q is ``len(honest)``).
    w_global, w_init: the current global model w^{t-1} and the initial one w^0 (MPAF's base); w_global is
        ``[q, d]``, one row per attacker, when the server trains an ensemble (FLCert: each group its model).
    sizes: ``fl.param_sizes(model)`` (Gaussian's per-tensor slices).
    generator: CPU ``torch.Generator`` for Fang and Gaussian.
    signflip_k: sign-flip's k (FedDefuse App. B.1 gives none; 1 is a pure flip).
    krum_f: the f of the server's Krum when it runs Krum or Multi-Krum: "fang" then means Fang's attack on Krum
        (``fang_krum``), as in both papers; None (any other defense): the trimmed-mean/median attack.
    knowledge: what ``known`` is, ``"partial"`` or ``"full"`` (``run.py --knowledge``). It picks Fang's
        trimmed-mean/median variant: partial, the FedREDefense code's mu +- 3-4 sigma (``fang``); full, Fang's own
        full-knowledge attack from the benign max/min (``fang_full``). Against Krum both use ``fang_krum`` on
        ``known``. LIE, Min-Max and Min-Sum take their statistics from ``known`` either way.

    LIE in a round whose attackers are a majority: run.py refuses settings where sampling alone can bring that
    about, but a defense that expels benign clients (FLDetector under LIE) can leave only attackers. z_max is then
    undefined (``lie_z``) and neither paper says what the attackers do; here they send LIE's centre, the mean of
    the known updates (z = 0), so the run goes on.

    Returns ``[q, d]``, row k for the k-th attacker. Unknown name: ValueError.
    """
    q, d = honest.shape
    if knowledge not in ("partial", "full"):
        raise ValueError(f"unknown knowledge {knowledge!r}; expected 'partial' or 'full'")
    if name == "fang" and krum_f is not None:
        return fang_krum(known, q, krum_f, generator, n_participants=n_participants)
    if name == "fang":
        return fang_full(known, q, generator) if knowledge == "full" else fang(known, q, generator)
    if name == "lie":  # attackers a majority (a defense expelled benign clients): z_max undefined, z = 0
        return lie(known, n_participants, q, z=0.0 if q >= n_participants // 2 + 1 else None)
    if name == "minmax":
        return min_max(known).expand(q, d).clone()
    if name == "minsum":
        return min_sum(known).expand(q, d).clone()
    if name == "mpaf":
        return mpaf(w_init, w_global).to(honest).expand(q, d).clone()
    if name == "signflip":
        return sign_flip(honest, signflip_k)
    if name == "gaussian":
        return gaussian(honest, w_global, sizes, generator)
    raise ValueError(f"unknown crafted attack {name!r}; expected one of {CRAFTED}")


# ---------------------------------------------------------------------------------------------------------------
# Label flips and the adaptive scaling attack (FedREDefense sec. 6.1, Algorithm 3)
# ---------------------------------------------------------------------------------------------------------------

def flip_labels(name, y, num_classes):
    """The labels an attacking client trains on (FedREDefense sec. 6.1 and its code's ``train_op_flip`` /
    ``train_op_tr_flip``).

    - ``labelflip`` (and its adaptive variant): y -> (y + 1) mod C, "the next class" (FedDMC's C - 1 - y and
      FLDetector's (y + 1) mod 9 are not followed);
    - ``targeted-labelflip`` (and its adaptive variant): source class 0 -> target class 2, the rest unchanged.
    The client then trains normally on its own images; the update is uploaded unscaled (adaptive: see
    ``adaptive_scale``).
    """
    if name in TARGETED:
        return torch.where(y == FLIP_SOURCE, torch.full_like(y, FLIP_TARGET), y)
    return (y + 1) % num_classes


def adaptive_scale(g, passes, delta_init=2.0, gamma_att=0.125):
    """The adaptive scaling attack, FedREDefense Algorithm 3 (sec. 6.1), for k attackers at once (rows of g
    ``[k, d]``): for each, the largest lambda >= 1 such that lambda * g_i still passes the defense, found by the
    paper's binary search:
        lambda = 1, delta = delta_init
        while delta >= gamma_att:  lambda += delta;  if not passes(lambda * g): lambda -= delta;  delta /= 2
    With delta_init = 2 and gamma_att = 0.125 (sec. 6.1) it tries 3, then +-1, +-0.5, +-0.25, +-0.125: five
    steps, and lambda lies on the grid 1 + 0.125 k, at most 4.875. ``passes(trials [k, d]) -> [k] bool`` is the
    defense's own decision on each attacker's trial update, run on the attacker's copy of the defense's state
    (``attacker_test``); each step makes one call, with every attacker's current trial, and each attacker's
    lambdas follow from its own verdicts only. On a monotone pass/fail it returns the largest grid point that
    passes. Returns (the k lambdas, their lambda_i * g_i ``[k, d]``).
    """
    scaled = lambda lams: g * torch.tensor(lams, dtype=g.dtype, device=g.device)[:, None]
    lams, delta = [1.0] * len(g), delta_init
    while delta >= gamma_att:
        trials = [lam + delta for lam in lams]
        lams = [trial if ok else lam for trial, lam, ok in zip(trials, lams, passes(scaled(trials)).tolist())]
        delta /= 2
    return lams, scaled(lams)


def attacker_test(defense, updates, rows, rnd):
    """``passes(trials)`` for the adaptive attackers of ``rows`` (Algorithm 3): the defense's own decision on
    this round with those rows replaced by ``trials`` (``[len(rows), d]``), run on a copy of the defense, so its
    state never changes; a bool per row. A defense may offer the same decision more cheaply (FedREDefense:
    ``attacker_test``, the reconstruction test of the trial rows alone). A rule that makes no per-client decision
    (Median, Norm bound, ...) passes every update."""
    if hasattr(defense, "attacker_test"):
        return defense.attacker_test([rnd.clients[i] for i in rows], rnd)

    def passes(trials):
        trial = updates.clone()
        trial[rows] = trials
        accepted = copy.deepcopy(defense)(trial, rnd).accepted
        return torch.ones(len(rows), dtype=torch.bool) if accepted is None else accepted[rows].cpu()
    return passes


def adaptive_attack(defense, updates, rows, rnd):
    """Algorithm 3 in a round: every attacker (the rows ``rows`` of ``updates``, replaced in place) scales its
    poisoned update by ``adaptive_scale`` against ``attacker_test``. A defense with its own ``attacker_test``
    (FedREDefense) tests each client's update apart from the others', so all attackers search together: each
    step is one batched test of every attacker's trial. Against any other defense a verdict depends on the whole
    round, so the attackers search in turn, each on the round as the earlier ones left it. Returns
    {row: lambda}."""
    if not rows:
        return {}
    searches = [rows] if hasattr(defense, "attacker_test") else [[i] for i in rows]
    lambdas = {}
    for searching in searches:
        lams, updates[searching] = adaptive_scale(updates[searching], attacker_test(defense, updates, searching, rnd))
        lambdas.update(zip(searching, lams))
    return lambdas


# ---------------------------------------------------------------------------------------------------------------
# What an attack achieves: its attack success rate (ASR)
# ---------------------------------------------------------------------------------------------------------------

def success_rate(attack, model, w, x_test, y_test, add_trigger):
    """ASR of the run's attack: a backdoor's (triggered images of other classes sent to the target, App. A.4) or
    a targeted label flip's (source-class images sent to the target, sec. 6.1); None for every other attack."""
    if attack in BACKDOOR:
        return fl.attack_success_rate(model, w, x_test, y_test, add_trigger, BACKDOOR_TARGET)
    if attack in TARGETED:
        return fl.targeted_success_rate(model, w, x_test, y_test, FLIP_SOURCE, FLIP_TARGET)
    return None
