"""One run: its command line, the federated round loop, and its outputs (results.json, results.png, the final line).

    python run.py                                          # FedREDefense vs the Fang attack on digits
    python run.py --defense feddefuse --attack scaling     # FedDefuse vs a backdoor
    python run.py --summarize runs/*                       # tables from earlier runs' results.json
    python run.py --table feddefuse-1 --jobs 2             # a paper's table as a grid of runs

A grid's command line (--table, comma-separated values) and --summarize belong to grid.py, which sits above this
file: ``python run.py`` hands them over to it (``for_grid``).

One round (FedREDefense Algorithm 1, with FedDefuse's strategic participation, sec. 2.2 and App. B.1):
  1. the server samples the round's participants among the clients it has not expelled (--sampling);
  2. each participant trains locally from w^{t-1} (an attacking Scaling/DBA/label-flip client trains on poisoned
     data; under FLCert, whose global model is one model per group of clients, from its group's model);
  3. updates with NaN/Inf are rejected (flagged) before anything else reads them;
  4. the attacking clients replace their honest updates by crafted ones (Fang, LIE, ...), colluding on the
     genuine updates they know (--knowledge); an adaptive attacker instead scales its label-flipped update by the
     largest factor the defense still accepts (FedREDefense Algorithm 3);
  5. the defense decides which updates to aggregate (and, for FedREDefense, whom to expel for good);
  6. w^t = w^{t-1} + aggregate; TACC, ASR and the detection metrics are recorded.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

# -----------------------------------------------------------------------------------------------------------------
# The command line's shape, read before torch loads: a grid or --summarize is grid.py's
# -----------------------------------------------------------------------------------------------------------------

GRID_FLAGS = ("--table", "--jobs", "--print-commands")  # the grid's own flags, never passed to a cell
SWITCHES = ("--download", "--save-replay", "--overwrite", "--print-commands")  # flags that take no value


def split_grid_argv(argv):
    """``argv`` as ([(flag, [values])], options): a value "a,b,c" is an axis of three values, a switch has the
    single value None; the grid's own flags and ``--out`` go to ``options``."""
    axes, options, i = [], {}, 0
    while i < len(argv):
        flag, value = argv[i], None
        if "=" in flag:
            flag, value = flag.split("=", 1)
        elif flag not in SWITCHES and i + 1 < len(argv):
            i += 1
            value = argv[i]
        i += 1
        if flag in GRID_FLAGS + ("--out",):
            options[flag] = True if flag == "--print-commands" else value
        else:
            axes.append((flag, [None] if value is None else value.split(",")))
    return axes, options


def summarizes(argv):
    """Whether a command line asks for --summarize."""
    return any(token == "--summarize" or token.startswith("--summarize=") for token in argv)


def for_grid(argv):
    """Whether a command line is grid.py's: many runs (--table, or a comma-separated value of any flag but --out) or
    their tables (--summarize)."""
    if summarizes(argv):
        return True
    axes, options = split_grid_argv(argv)
    return "--table" in options or any(len(values) > 1 for _, values in axes)


# grid.py sits above this file (it runs many of these runs), so this file never imports it: ``python run.py`` with a
# grid's command line becomes ``python grid.py`` with the same arguments, in this same process (its id, its
# terminal, its exit code), before torch loads here.
if __name__ == "__main__" and for_grid(sys.argv[1:]):
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "grid.py"),
                              *sys.argv[1:]])


def cores_in_use():
    """Whether another thread is runnable as this process starts (Linux's /proc/loadavg; elsewhere: unknown, no)."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) > 1  # this process's own thread is one of them
    except (OSError, ValueError, IndexError):
        return False


# Cores shared with other work: OpenMP threads that spin while they wait take the cores from each other (two runs
# side by side on two cores each went 60x slower), so this run's threads sleep while they wait instead (alone that
# costs up to 2.7x, RESULTS.md "Speed"). It must be set before torch loads OpenMP; the numbers do not depend on it.
SHARED_CORES = "OMP_WAIT_POLICY" not in os.environ and cores_in_use()
if SHARED_CORES:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:  # Ctrl-C while torch loads (seconds): one line, as everywhere else
    import numpy as np  # after the OpenMP setting
    import torch

    import attacks
    import baselines
    import data
    import fedredefense
    import feddefuse
    import fl
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported: the importer says it
        raise
    sys.stderr.write("run.py: interrupted\n")
    sys.exit(130)

DEFENSES = ("fedavg", "oracle") + baselines.ROBUST + baselines.DETECTION + ("fedredefense", "feddefuse")
PATTERNS = ("I", "II", "III")
SAMPLING = ("uniform", "capped", "attackers-first")
KNOWLEDGE = ("partial", "full")
# Each paper's threat model: how participants are sampled, what colluding attackers know, which model is trained.
# A run reproduces one of them (README); --sampling, --knowledge and --model override a single part.
PROTOCOLS = {
    "fedredefense": {"sampling": "uniform", "knowledge": "partial", "model": "cnn"},  # sec. 3, 5.1, App. B.2
    "feddefuse": {"sampling": "capped", "knowledge": "full", "model": "mlp"},          # sec. 1, 2.2, App. B.1
}
# --scale: the clients, rounds, participants and training images a run uses where the flags are not given
# (README, "Real datasets, scales and GPUs"). paper: 100 clients over the whole training set, 500 rounds
# (FedREDefense sec. 5.1.4; FedDefuse sec. 4.1), 20 a round under FedDefuse's protocol (this project's choice: the
# paper gives no number). laptop and small keep the papers' client size (1/100 of the training set), 28% malicious
# clients and FedDefuse's attacking share (A-bar = 0.6 of 10 participants draws 3-6 attackers, 45% on average) on a
# seeded stratified subset: shrinking the clients' data instead of their number would change what FedREDefense
# reconstructs. laptop: 25 clients for 100 rounds, where the 7 attackers hold at most 50-56% of a class and the
# oracle ends within 3 points of attack-free FedAvg on FashionMNIST (RESULTS.md, "A FashionMNIST scale with the
# papers' client structure"). small: 10 clients (20 under FedDefuse's protocol) for 50 rounds, where the 3-6
# attackers hold 74-95% of a class. Digits (not in the papers) has one scale.
SCALES = ("laptop", "small", "paper")
SCALE = {  # (clients, rounds, participants a round; None: every client)
    ("paper", "fedredefense"): (100, 500, None), ("paper", "feddefuse"): (100, 500, 20),
    ("laptop", "fedredefense"): (25, 100, None), ("laptop", "feddefuse"): (25, 100, 10),
    ("small", "fedredefense"): (10, 50, None), ("small", "feddefuse"): (20, 50, 10),
    ("digits", "fedredefense"): (25, 40, None), ("digits", "feddefuse"): (25, 40, None),
}
PAPER_CLIENTS = 100  # the paper's client size is 1/100 of the training set
# Training images of each dataset (the official training sets; digits' 75% split).
TRAIN_SIZE = {"digits": 1347, "mnist": 60000, "fmnist": 60000, "cifar10": 50000, "cinic10": 90000}
CLASSES = 10  # of every dataset here
MALICIOUS_SHARE = 0.28  # 28 of 100 clients (FedREDefense sec. 5.1.4)
# The flags that only some runs read, and which runs (a test on a run's config). A run that does not read such a
# flag refuses it rather than ignore it; a grid passes it only to its cells that read it (a table's --root-size 500
# goes to FLTrust alone); two configs that differ only in a setting neither run reads are the same run (same_run).
READ_BY = {
    "assumed_malicious": ("--defense krum, multikrum or trmean",
                          lambda c: c["defense"] in ("krum", "multikrum", "trmean")),
    "norm_bound": ("--defense normbound, or fedredefense with --aggregate normbound",
                   lambda c: c["defense"] == "normbound" or (c["defense"], c.get("aggregate")) == ("fedredefense",
                                                                                                  "normbound")),
    "aggregate": ("--defense fedredefense", lambda c: c["defense"] == "fedredefense"),
    "root_size": ("--defense fltrust", lambda c: c["defense"] == "fltrust"),
    "attack_rounds": ("--pattern II", lambda c: c["pattern"] == "II"),
    "attack_prob": ("--pattern III", lambda c: c["pattern"] == "III"),
    "signflip_k": ("--attack signflip", lambda c: c["attack"] == "signflip"),
    "max_malicious_share": ("--sampling capped or attackers-first (FedDefuse's protocol)",
                            lambda c: c.get("sampling", "uniform") != "uniform"),
    "save_replay": ("--defense feddefuse", lambda c: c["defense"] == "feddefuse"),
    "fedredefense_settings": ("--defense fedredefense", lambda c: c["defense"] == "fedredefense"),
}
CHECKPOINT = "checkpoint.pt"
OUTPUTS = ("results.json", "results.png", CHECKPOINT, "replay.pt")  # what a run writes in --out


# -----------------------------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None, refuse_unread=True):
    """The run's settings: the flags, checked, with the defaults of its dataset, scale and protocol filled in. A bad
    flag, value or combination, a flag the run does not read (``READ_BY``; kept with ``refuse_unread=False``), or an
    --out or --data-dir that cannot be one, is a ``fl.UserError``."""
    p = fl.Parser(prog="run.py", allow_abbrev=False,  # a grid tells its own flags from a cell's by their full names
                  description="Reconstruction-based defenses against model poisoning in federated learning.")
    p.add_argument("--dataset", choices=data.DATASETS, default="digits")
    p.add_argument("--data-dir", default="data", help="where the real datasets live (default: data)")
    p.add_argument("--download", action="store_true", help="fetch a missing dataset into --data-dir")
    p.add_argument("--defense", choices=DEFENSES, default="fedredefense")
    p.add_argument("--attack", choices=attacks.ATTACKS, default="fang")
    p.add_argument("--scale", choices=SCALES, default="laptop",
                   help="real datasets: laptop (25 clients of the paper's size, 10 a round under FedDefuse's protocol; "
                        "100 rounds), small (10 clients, 20 with 10 a round under FedDefuse's; 50 rounds) or paper "
                        "(100 clients, 20 a round under FedDefuse's; 500 rounds); sets --clients, --rounds, "
                        "--participants and --train-size where not given (default: laptop)")
    p.add_argument("--clients", type=int, help="number of clients (default: 25 for digits and at --scale laptop; at "
                                               "small 10, or 20 under FedDefuse's protocol; 100 at paper)")
    p.add_argument("--malicious", type=int, help="number of malicious clients (default: 28%% of --clients)")
    p.add_argument("--assumed-malicious", type=int,
                   help="f of Krum/Multi-Krum, b of Trimmed mean: how many malicious clients the server assumes "
                        "(default: --malicious)")
    p.add_argument("--norm-bound", default="median",
                   help="normbound's M: median (the round's median update norm), oracle (FedREDefense's: mean norm "
                        "of the truly benign updates) or a number (default: median)")
    p.add_argument("--aggregate", choices=("fedavg", "normbound"), default="fedavg",
                   help="fedredefense: the rule applied to the updates it accepts (FedREDefense Table 3; normbound "
                        "uses --norm-bound's M) (default: fedavg)")
    p.add_argument("--root-size", type=int, default=100,
                   help="fltrust: examples in the server's root set, drawn from the training data (default: 100, "
                        "FLTrust's; FedREDefense uses 500)")
    p.add_argument("--rounds", type=int, help="communication rounds (default: 40 for digits; 100 at --scale laptop, "
                                              "50 at small, 500 at paper)")
    p.add_argument("--train-size", type=int,
                   help="training images the clients share: a seeded subset stratified by class (default: all at "
                        "--scale paper and on digits; at laptop and small, 1/100 of the training set per client)")
    p.add_argument("--beta", type=fl.number, default=0.1, help="Dirichlet non-IID degree (default: 0.1)")
    p.add_argument("--participation", type=fl.number, default=1.0,
                   help="share of all clients sampled per round (default: 1.0)")
    p.add_argument("--participants", type=int,
                   help="clients per round (overrides --participation; default under FedDefuse's protocol on a real "
                        "dataset: 10 at --scale laptop and small, 20 at paper)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS),
                   help="whose threat model: sampling, knowledge, model (default: feddefuse for --defense "
                        "feddefuse, fedredefense otherwise)")
    p.add_argument("--sampling", choices=SAMPLING,
                   help="uniform: participants drawn uniformly; capped: A-bar caps a round's attackers (FedDefuse); "
                        "attackers-first: always floor(A-bar * S) attackers (stress test)")
    p.add_argument("--knowledge", choices=KNOWLEDGE,
                   help="what crafted attacks know: partial (every compromised participant's genuine update) or "
                        "full (every participant's)")
    p.add_argument("--model", choices=tuple(fl.MODELS),
                   help="cnn (FedREDefense), mlp (FedDefuse) or convnet (the FedREDefense authors' code)")
    p.add_argument("--fedredefense-settings", choices=tuple(fedredefense.SETTINGS), default="paper",
                   help="fedredefense: its hyper-parameters from the paper (Table 7) or from the authors' scripts "
                        "(official: fmnist, cifar10, cinic10) (default: paper)")
    p.add_argument("--max-malicious-share", type=fl.number, default=0.6,
                   help="A-bar: most of a round's participants that may be malicious, for --sampling capped and "
                        "attackers-first (default: 0.6)")
    p.add_argument("--pattern", choices=PATTERNS, default="I",
                   help="I: attack every round; II: only the first --attack-rounds; III: with --attack-prob")
    p.add_argument("--attack-rounds", type=int, default=50, help="pattern II: rounds that attack (default: 50)")
    p.add_argument("--attack-prob", type=fl.number, default=0.2, help="pattern III: attack probability (default: 0.2)")
    p.add_argument("--signflip-k", type=fl.number, default=1.0,
                   help="sign-flip's k: send -k times the update (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of everything (data split, model initialisation, sampling, attacks, training): the "
                        "same command gives the same numbers (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto, cpu or cuda; auto picks CUDA when it is available (default: auto)")
    p.add_argument("--save-replay", action="store_true",
                   help="feddefuse: also write replay.pt, each round's Algorithm 2 inputs (feddefuse.replay)")
    p.add_argument("--out", help="output folder for results.json, results.png and checkpoint.pt (default: "
                                 "runs/<setting>); a folder holding this same run's checkpoint resumes it")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last finished round, with the "
                                                   "settings it was started with; --rounds, the one flag it takes, "
                                                   "extends it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's results in --out (without it such a folder is refused)")
    p.add_argument("--summarize", nargs="+", metavar="RUN",
                   help="print the tables of earlier runs (folders or results.json files) and exit; a grid's folder: "
                        "(re)write its summary.md and summary.csv")
    p.add_argument("--figures", metavar="DIR",
                   help="with --summarize: draw RESULTS.md's figures of those runs into DIR (PNGs)")
    grids = p.add_argument_group("grids", "any flag given comma-separated values (--seed 0,1,2) runs every "
                                         "combination, each cell in its own process under --out")
    grids.add_argument("--table", help="a paper table's defenses x attacks: fedredefense-1, fedredefense-2, "
                                      "feddefuse-1, feddefuse-2; list prints them")
    grids.add_argument("--jobs", help="cells run at once (default: the number of cores)")
    grids.add_argument("--print-commands", action="store_true",
                      help="print one self-contained command per cell still to run, and exit")
    args = p.parse_args(argv)
    defaults = vars(p.parse_args([]))
    given = [k for k, v in vars(args).items() if v != defaults[k]]  # the flags given a value of their own
    if args.summarize or args.resume:  # they read or continue earlier runs, whose settings are their own
        takes = ["summarize", "figures"] if args.summarize else ["resume", "rounds"]
        other = [k for k in given if k not in takes]
        if other:
            alone = "--rounds alone" if args.resume else "no other flag but --figures"
            p.error(f"argument --{takes[0]}: takes {alone} (got --{other[0].replace('_', '-')})")
        if args.figures is not None:
            fl.check_folder("--figures", args.figures)
        return args
    for flag in ("jobs", "print_commands"):
        if flag in given:
            p.error(f"argument --{flag.replace('_', '-')}: only for a grid (a comma-separated value, or --table)")
    if "figures" in given:
        p.error("argument --figures: only with --summarize (give the runs to draw: --summarize RUN...)")

    args.protocol = args.protocol or ("feddefuse" if args.defense == "feddefuse" else "fedredefense")
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset == "digits" and args.scale == "paper":
        p.error("argument --scale: digits is not in the papers and has one scale (give laptop, or a real --dataset)")
    if args.dataset not in fedredefense.SETTINGS[args.fedredefense_settings]:
        covered = ", ".join(fedredefense.SETTINGS[args.fedredefense_settings])
        p.error(f"argument --fedredefense-settings: {args.fedredefense_settings} covers {covered} only, the datasets "
                f"of the FedREDefense authors' scripts (give paper on {args.dataset})")
    clients, rounds, participants = SCALE["digits" if args.dataset == "digits" else args.scale, args.protocol]
    args.clients = args.clients if args.clients is not None else clients
    args.malicious = args.malicious if args.malicious is not None else round(MALICIOUS_SHARE * args.clients)
    args.rounds = args.rounds if args.rounds is not None else rounds
    if args.train_size is None and args.dataset != "digits" and args.scale != "paper":  # the paper's client size
        size = args.clients * TRAIN_SIZE[args.dataset] // PAPER_CLIENTS
        args.train_size = size if size < TRAIN_SIZE[args.dataset] else None
    if args.assumed_malicious is None:
        args.assumed_malicious = args.malicious
    if args.participants is None:
        args.participants = (min(participants, args.clients) if participants and args.participation == 1 else
                             max(1, int(args.participation * args.clients + 1e-9)))
    n_train = TRAIN_SIZE[args.dataset]
    checks = [
        (2 <= args.clients <= (args.train_size or n_train), "--clients",
         f"an integer in [2, {args.train_size or n_train}] (the training images)", args.clients),
        (0 <= args.malicious < args.clients, "--malicious", f"an integer in [0, {args.clients - 1}]",
         args.malicious),
        (args.rounds >= 1, "--rounds", "an integer >= 1", args.rounds),
        (args.train_size in (None, n_train) or CLASSES <= args.train_size <= n_train - CLASSES, "--train-size",
         f"an integer in [{CLASSES}, {n_train - CLASSES}] (a stratified subset takes, and leaves, one image of each "
         f"class at least) or {n_train}", args.train_size),
        (args.root_size >= 1, "--root-size", "an integer >= 1", args.root_size),
        (0 <= args.assumed_malicious < args.clients, "--assumed-malicious", f"an integer in [0, {args.clients - 1}]",
         args.assumed_malicious),
        (args.norm_bound in ("median", "oracle") or is_number(args.norm_bound, at_least=0), "--norm-bound",
         "median, oracle or a number >= 0", args.norm_bound),
        (args.beta > 0, "--beta", "a number > 0", args.beta),
        (0 < args.participation <= 1, "--participation", "a number in (0, 1]", args.participation),
        ("participation" not in given or "participants" not in given, "--participation",
         "left out with --participants, which sets the clients a round", args.participation),
        (1 <= args.participants <= args.clients, "--participants", f"an integer in [1, {args.clients}]",
         args.participants),
        (0 <= args.max_malicious_share <= 1, "--max-malicious-share", "a number in [0, 1]",
         args.max_malicious_share),
        (args.attack_rounds >= 0, "--attack-rounds", "an integer >= 0", args.attack_rounds),
        (0 <= args.attack_prob <= 1, "--attack-prob", "a number in [0, 1]", args.attack_prob),
        (args.signflip_k >= 0, "--signflip-k", "a number >= 0", args.signflip_k),
        (0 <= args.seed < 2 ** 32, "--seed", f"an integer in [0, {2 ** 32 - 1}]", args.seed),
        (args.device != "cuda" or torch.cuda.is_available(), "--device", "auto or cpu (no CUDA device here)",
         args.device),
    ]
    for ok, flag, allowed, value in checks:
        if not ok:
            p.error(f"argument {flag}: must be {allowed} (got {value})")
    for key in sorted(unread(vars(args)) & set(given)) if refuse_unread else ():
        p.error(f"argument --{key.replace('_', '-')}: must be left out: only {READ_BY[key][0]} reads it "
                f"(got {getattr(args, key)})")
    if args.attack == "lie":
        most = min(args.malicious, args.participants if args.sampling == "uniform" else
                   max_attackers(args.participants, args.max_malicious_share))
        if most >= args.participants // 2 + 1:
            p.error(f"argument --attack: lie is undefined when attackers are a majority of a round "
                    f"({most} of {args.participants}); lower --malicious or --max-malicious-share")
    if args.out is None:  # runs/<setting>: the main settings, then every other flag given (not where the data is)
        scale = "" if args.dataset == "digits" else f"-{args.scale}"
        named = ("dataset", "scale", "defense", "attack", "pattern", "seed", "data_dir", "download", "overwrite")
        rest = "".join(f"_{k.replace('_', '-')}-{getattr(args, k)}" for k in given if k not in named)
        main_settings = os.path.join(
            "runs", f"{args.dataset}{scale}-{args.defense}-{args.attack}-{args.pattern}-s{args.seed}")
        args.out = main_settings + rest
        # Runs started while the default --out named the main settings alone live there: this same run, found
        # there and not under the longer name, continues there rather than afresh.
        if rest and holds_run(main_settings, args) and not holds_run(args.out):
            args.out = main_settings
    fl.check_folder("--out", args.out)
    fl.check_folder("--data-dir", args.data_dir, writable=args.download)
    return args


def holds_run(out, args=None):
    """Whether the folder ``out`` holds a run's checkpoint or results.json; with ``args``, those of this same run."""
    try:
        checkpoint = load_checkpoint(out, "cpu", mmap=True)
    except fl.UserError:  # damaged: whoever uses the folder names it
        return args is None
    found = checkpoint["config"] if checkpoint else results_config(out)
    return found is not None and (args is None or same_run(found, config_of(args)))


def unread(config):
    """The settings of ``READ_BY`` that the run of ``config`` does not read."""
    return {key for key, (_, reads) in READ_BY.items() if not reads(config)}


def is_number(text, at_least):
    try:
        return fl.number(text) >= at_least
    except ValueError:
        return False


# -----------------------------------------------------------------------------------------------------------------
# Who takes part, who attacks
# -----------------------------------------------------------------------------------------------------------------

def max_attackers(n, max_share):
    """floor(A-bar * n), robust to float error (0.28 * 100 = 28.000000000000004)."""
    return math.floor(max_share * n + 1e-9)


def sample_participants(available, malicious, n, max_share, rng, sampling):
    """M^t / S^r: n clients among the unexpelled ones (all of them when n >= their number), by one of three rules.

    - uniform (FedREDefense Alg. 1 and its code, FedDefuse sec. 2.1): n clients drawn uniformly; a round holds
      however many attackers the draw brings.
    - capped (FedDefuse App. B.1: "Prior to each experimental round, we first sample the attackers according to
      A-bar", A-bar being "the maximum ratio of malicious participants in each round"): the round's attacker count
      m is drawn uniformly from {ceil(A/2), ..., A}, A = floor(A-bar n), then m attackers and n - m benign clients
      are drawn uniformly. The paper gives only the maximum; this reading is inferred from its No-Defense rows
      (DACC 55.3 / MR 44.7 for every attack and both datasets, Tables 1 and 3): MR of accept-all is the mean
      attacking share, and the reading gives about 0.75 A-bar = 45% for A-bar = 0.6, whatever n. The reading
      "m uniform in {0, ..., A}" would give 30%, and a constant A gives 60%.
    - attackers-first: always min(A, available attackers) attackers, then benign clients: the worst case A-bar
      allows, every round; kept as a stress test.
    Too few clients of one kind leave the round short rather than exceed the attacker count.
    """
    draw = lambda pool, k: [pool[i] for i in torch.randperm(len(pool), generator=rng)[:k].tolist()]
    if sampling == "uniform":
        return sorted(draw(available, n))
    bad = [c for c in available if c in malicious]
    good = [c for c in available if c not in malicious]
    top = max_attackers(n, max_share)
    if sampling == "capped":
        low = math.ceil(top / 2)
        top = low + int(torch.randint(top - low + 1, (1,), generator=rng))
    n_bad = min(len(bad), top)
    n_good = min(len(good), n - n_bad)
    return sorted(draw(bad, n_bad) + draw(good, n_good))


def attacking_now(pattern, t, is_malicious, attack_rounds, attack_prob, rng):
    """Which malicious participants attack in round t (FedDefuse sec. 4.1): I every round; II only in the first
    ``attack_rounds`` rounds; III each independently with probability ``attack_prob``. The others send their
    honest update and count as benign for the round."""
    if pattern == "I":
        return is_malicious.clone()
    if pattern == "II":
        return is_malicious & (t < attack_rounds)
    return is_malicious & (torch.rand(len(is_malicious), generator=rng) < attack_prob)


def attacked_krum_f(args, n):
    """Under full knowledge against Krum or Multi-Krum, Fang's attack targets Krum with the f the server uses (Fang
    et al. 2020, sec. 4; FedDefuse's protocol); else None, and Fang is the trimmed-mean attack. Under partial
    knowledge the trimmed-mean Fang runs against Krum too: FedREDefense App. A.2 names the Krum attack, but its
    code constructs only the trimmed-mean client (``Client_Fang``) whatever the rule, so its Krum column comes
    from that attack."""
    krum = args.defense in ("krum", "multikrum") and args.knowledge == "full"
    return baselines.krum_f(args.assumed_malicious, n) if krum else None


def generator_for(seed, t, *client):
    """A generator for (round[, client]): a client's randomness does not depend on who else was sampled."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t, *client]).generate_state(1)[0]))


# -----------------------------------------------------------------------------------------------------------------
# Metrics: computed here, once, for every defense
# -----------------------------------------------------------------------------------------------------------------

def round_metrics(accepted, attacking):
    """Per-round DACC, FPR, FNR over the round's participants and MR (FedDefuse App. B.1); all None for a rule
    that makes no per-client decision (``accepted`` None), as FedDefuse's tables print "-" for RFA or Median."""
    if accepted is None:
        return {"dacc": None, "fpr": None, "fnr": None, "mr": None}
    return {**fl.detection_metrics(~accepted, attacking), "mr": fl.malicious_rate(accepted, attacking)}


def mean_of(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def final_metrics(rounds, n_clients, malicious, expelled, expels, tacc, asr):
    """The final row of FedREDefense Tables 1-2 and FedDefuse Tables 1-3.

    dacc/fpr/fnr: client-level verdicts at the end of training over all clients, never-sampled ones counting as
    benign (FedREDefense App. A.4); defined only for a defense that marks clients (expels them), else None.
    aar: mean over malicious clients of the rounds in which they took part and their update was aggregated
    (App. A.4), attacking or not; aar_attacking counts only the rounds in which they attacked. Both are None for a
    rule that makes no per-client decision (Median, Trimmed mean, RFA, Norm bound).
    adacc/afpr/afnr/mr: per-round detection over the participants, averaged over rounds (FedREDefense App. B.1,
    FedDefuse App. B.1).
    """
    out = {"tacc": tacc, "asr": asr}
    truth = torch.tensor([c in malicious for c in range(n_clients)])
    flagged = torch.tensor([c in expelled for c in range(n_clients)])
    out.update(fl.detection_metrics(flagged, truth) if expels else {"dacc": None, "fpr": None, "fnr": None})
    decided = malicious and all(r["accepted"] is not None for r in rounds)
    aar = lambda who: sum(len(set(r["accepted"]) & set(who(r))) for r in rounds) / len(malicious) if decided else None
    out.update(aar=aar(lambda r: malicious), aar_attacking=aar(lambda r: r["attacking"]))
    per_round = lambda key: mean_of([r[key] for r in rounds])
    out.update(adacc=per_round("dacc"), afpr=per_round("fpr"), afnr=per_round("fnr"), mr=per_round("mr"),
               mr_zero_rounds=mean_of([None if r["mr"] is None else float(r["mr"] == 0) for r in rounds]))
    iterations = [i for r in rounds for i in (r["iterations"] or {}).values()]
    out["aoi"] = sum(iterations) / len(iterations) if iterations else None
    return out


# -----------------------------------------------------------------------------------------------------------------
# The run
# -----------------------------------------------------------------------------------------------------------------

def make_defense(args, model, ds, x_train, y_train, w_init, device):
    """The server's defense, built with what it legitimately knows (its constructor is the only way in)."""
    shape, classes = tuple(ds.x_train.shape[1:]), ds.num_classes
    generator = torch.Generator().manual_seed(args.seed)
    hp = baselines.DETECTION_HYPER[args.dataset]
    if args.dataset != "digits" and args.scale != "paper":  # digits' row is already at the laptop scale's counts
        hp = {**hp, **baselines.LAPTOP_SCALE}
    layers = fl.param_slices(model)
    _, out_weight, out_shape = layers[-2]  # the output layer's weight matrix (out, in); its bias is layers[-1]
    norm_bound = args.norm_bound if args.norm_bound in ("median", "oracle") else float(args.norm_bound)
    if args.defense == "fedredefense":
        after = None if args.aggregate == "fedavg" else baselines.RobustDefense("normbound", 0, norm_bound)
        hyper = fedredefense.SETTINGS[args.fedredefense_settings][args.dataset]
        return fedredefense.FedREDefense(model, shape, classes, hyper, generator, device, aggregate=after)
    if args.defense == "feddefuse":
        return feddefuse.FedDefuse(model, shape, classes, feddefuse.HYPER[args.dataset], fl.LOCAL_LR[args.dataset],
                                   generator, record=args.save_replay)
    if args.defense in baselines.ROBUST:
        return baselines.RobustDefense(args.defense, args.assumed_malicious, norm_bound)
    detection = {
        "flame": lambda: baselines.FLAME(args.seed),
        "fltrust": lambda: baselines.FLTrust(model, x_train, y_train, fl.LOCAL_LR[args.dataset], args.root_size,
                                             args.seed),
        "fldetector": lambda: baselines.FLDetector(w_init, hp["fldetector_window"], hp["fldetector_cold_start"],
                                                   args.seed),
        "flcert": lambda: baselines.FLCert(args.clients, min(hp["flcert_groups"], args.clients)),
        "auror": lambda: baselines.Auror(slice(out_weight.start, layers[-1][1].stop), hp["auror_alpha"],
                                         hp["auror_warmup"]),
        "foolsgold": baselines.FoolsGold,
        "feddmc": baselines.FedDMC,
        "fedcpa": lambda: baselines.FedCPA([where for _, where, size in layers if len(size) in (2, 4)]),
        "freqfed": lambda: baselines.FreqFed(out_weight, out_shape),
    }
    if args.defense in detection:
        return detection[args.defense]()
    return getattr(baselines, args.defense)


def starting_models(w, groups, clients):
    """The model each of ``clients`` trains from: the global model, or for an ensemble (a defense with
    ``groups``, FLCert) the row of its client's group; ``[d]`` or ``[len(clients), d]``."""
    return w if groups is None else w[[groups[c] for c in clients]]


def device_of(args):
    return torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def run(args, checkpoint=None):
    """The round loop (FedREDefense Alg. 1 / FedDefuse Alg. 1 around any defense); ``checkpoint`` (the state
    ``save_checkpoint`` wrote after some round) continues a run from there. Returns results.json's content."""
    device = device_of(args)
    torch.manual_seed(args.seed)
    ds = data.training_subset(data.load_dataset(args.dataset, args.data_dir, args.download, args.seed),
                              args.train_size, args.seed)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    parts = data.dirichlet_partition(ds.y_train, args.clients, args.beta, args.seed)
    # The last q ids, as in the official code; with no attack nobody is malicious, for the metrics too.
    malicious = set(range(args.clients - args.malicious, args.clients)) if args.attack != "none" else set()
    model = fl.MODELS[args.model](ds.x_train.shape[1], ds.x_train.shape[2], ds.num_classes).to(device)
    model, x_train, x_test = fl.in_fast_format(model, x_train, x_test)
    w = w_init = fl.flatten_params(model)
    lr = fl.LOCAL_LR[args.dataset]
    code_pixels = data.trigger_pixels(ds.x_train.shape[2])  # the authors' trigger pixels
    pixels = attacks.visible_trigger(model, code_pixels, tuple(ds.x_train.shape[1:]))  # moved where the model reads
    add_trigger = lambda x: data.add_trigger(x, pixels)
    defense = make_defense(args, model, ds, x_train, y_train, w_init, device)
    groups = getattr(defense, "groups", None)  # an ensemble (FLCert): one global model per group of clients
    if groups is not None:
        w = w_init.repeat(defense.n_groups, 1)
    rng = torch.Generator().manual_seed(args.seed)  # sampling and attack schedule
    expelled, rounds, start = set(), [], time.time()
    if checkpoint is not None:
        w, defense, expelled = checkpoint["w"], checkpoint["defense"], checkpoint["expelled"]
        rounds = checkpoint["rounds"]
        rng.set_state(checkpoint["rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        start -= checkpoint["seconds"]
        print(f"resuming {args.out} after round {len(rounds)}", flush=True)
    marks_clients = getattr(defense, "expels", False)  # Algorithm 1: a flagged client is removed for good
    print(f"threat model: {threat_model(args)}; {scale_of(args)}", flush=True)
    if args.attack in attacks.BACKDOOR and pixels != code_pixels:
        print(f"trigger: pixels {pixels}, moved up-left to where the model reads (attacks.visible_trigger)", flush=True)
    if SHARED_CORES:
        print("other work is using the cores: this run's threads sleep while they wait, which is slower than on "
              "idle cores (run several settings as one grid, with --jobs, rather than side by side)", flush=True)

    for t in range(len(rounds), args.rounds):
        tic = time.time()
        available = [c for c in range(args.clients) if c not in expelled]
        clients = sample_participants(available, malicious, args.participants, args.max_malicious_share, rng,
                                      args.sampling)
        is_malicious = torch.tensor([c in malicious for c in clients], dtype=torch.bool)  # bool even with nobody left
        attacking = attacking_now(args.pattern, t, is_malicious, args.attack_rounds, args.attack_prob, rng)

        # Local training: genuine, or on poisoned data for an attacking Scaling/DBA client; clients run one per
        # core (``fl.on_cores``), each on its own copy of the model.
        def local_training(m, client):
            c, attacks_now = client
            x, y, g = x_train[parts[c]], y_train[parts[c]], generator_for(args.seed, t, c)
            w_c = starting_models(w, groups, [c]).reshape(-1)
            if attacks_now and args.attack in attacks.BACKDOOR:
                trigger = pixels if args.attack == "scaling" else [pixels[c % 4]]  # DBA: pattern = id mod 4
                return attacks.backdoor_update(m, w_c, x, y, data.add_trigger(x, trigger),
                                              attacks.BACKDOOR_TARGET, lr, g)
            if attacks_now and args.attack in attacks.LABEL_FLIP:
                y = attacks.flip_labels(args.attack, y, ds.num_classes)
            return fl.local_update(m, w_c, x, y, lr, g)

        updates = fl.on_cores(local_training, list(zip(clients, attacking.tolist())), model)
        updates = torch.stack(updates) if updates else w_init.new_zeros(0, len(w_init))

        # Reject non-finite updates before any attack statistic or defense sees them.
        finite = fl.finite_rows(updates).cpu()
        rejected, rejected_attacking = [c for c, ok in zip(clients, finite.tolist()) if not ok], attacking[~finite]
        clients = [c for c, ok in zip(clients, finite.tolist()) if ok]
        updates, attacking, is_malicious = updates[finite.to(device)], attacking[finite], is_malicious[finite]

        # Crafted attacks: the attacking clients collude on the genuine updates they know (--knowledge).
        if args.attack in attacks.CRAFTED and attacking.any():
            known = updates[is_malicious.to(device)] if args.knowledge == "partial" else updates
            attackers = [c for c, a in zip(clients, attacking.tolist()) if a]
            updates[attacking.to(device)] = attacks.craft(
                args.attack, updates[attacking.to(device)], known, n_participants=len(clients),
                w_global=starting_models(w, groups, attackers),
                w_init=w_init, sizes=fl.param_sizes(model), generator=generator_for(args.seed, t),
                signflip_k=args.signflip_k, krum_f=attacked_krum_f(args, len(clients)), knowledge=args.knowledge)

        # Adaptive attacks (FedREDefense Alg. 3): each attacker scales its poisoned update by the largest lambda
        # that the defense, run on the attacker's copy of its state, still accepts in this round (against
        # FedREDefense all attackers search together, in batched tests: ``attacks.adaptive_attack``).
        sizes = torch.tensor([len(parts[c]) for c in clients])
        rnd, lambdas = fl.Round(t, clients, w, sizes, attacking), {}
        if args.attack in attacks.ADAPTIVE:
            lambdas = {str(clients[i]): lam for i, lam in
                       attacks.adaptive_attack(defense, updates, attacking.nonzero()[:, 0].tolist(), rnd).items()}

        decision = (defense(updates, rnd) if clients else  # all expelled
                    fl.Decision(update=torch.zeros_like(w), accepted=torch.zeros(0, dtype=torch.bool),
                                expel=torch.zeros(0, dtype=torch.bool)))
        w = w + decision.update
        accepted = None if decision.accepted is None else decision.accepted.cpu()
        if marks_clients:  # a non-finite update is flagged too, so its client goes the same way
            expelled |= {c for c, e in zip(clients, decision.expel.tolist()) if e} | set(rejected)

        record = {
            "round": t + 1,
            "participants": clients + rejected,
            "attacking": [c for c, a in zip(clients + rejected, torch.cat([attacking, rejected_attacking]).tolist())
                          if a],
            "accepted": None if accepted is None else [c for c, a in zip(clients, accepted.tolist()) if a],
            "flagged": (rejected if accepted is None else
                        [c for c, a in zip(clients, accepted.tolist()) if not a] + rejected),
            "rejected_nonfinite": rejected,
            "errors": per_client(clients, decision.errors),
            "iterations": per_client(clients, decision.iterations),
            "details": decision.details,
            "lambda": lambdas or None,
            "tacc": fl.accuracy(model, w, x_test, y_test),
            "asr": attacks.success_rate(args.attack, model, w, x_test, y_test, add_trigger),
            **round_metrics(None if accepted is None else torch.cat([accepted, torch.zeros(len(rejected),
                                                                                          dtype=torch.bool)]),
                            torch.cat([attacking, rejected_attacking])),
            "seconds": time.time() - tic,
        }
        rounds.append(record)
        save_checkpoint(args.out, {"config": config_of(args), "rounds": rounds, "w": w, "defense": defense,
                                   "expelled": expelled, "rng": rng.get_state(), "torch_rng": torch.get_rng_state(),
                                   "seconds": time.time() - start})
        recent = [r["seconds"] for r in rounds[1:][-10:]]  # round 1 (first reconstructions) is unlike the rest
        print(progress_line(record, args.rounds, sum(recent) / len(recent) if recent else None), flush=True)

    results = {
        "config": config_of(args),
        "partition": data.partition_summary(ds.y_train, parts, ds.num_classes),
        "malicious": sorted(malicious),
        "expelled": sorted(expelled),
        "rounds": rounds,
        "final": final_metrics(rounds, args.clients, malicious, expelled, marks_clients, rounds[-1]["tacc"],
                               rounds[-1]["asr"]),
        "seconds": time.time() - start,
        "trigger": pixels if args.attack in attacks.BACKDOOR else None,
        "version": code_version(),
    }
    if args.save_replay and args.defense == "feddefuse":
        fl.write_atomically(os.path.join(args.out, "replay.pt"), lambda tmp: torch.save(defense.replay, tmp))
    return results


def per_client(clients, values):
    """{client id: value} for results.json, or None where the defense computes no such value."""
    return None if values is None else dict(zip(map(str, clients), values.tolist()))


def progress_line(r, total, seconds_per_round):
    eta = "-" if seconds_per_round is None else f"{seconds_per_round * (total - r['round']) / 60:.1f} min"
    asr = f"  ASR {100 * r['asr']:5.1f}%" if r["asr"] is not None else ""
    accepted = "all" if r["accepted"] is None else len(r["accepted"])
    return (f"round {r['round']:>3}/{total}  TACC {100 * r['tacc']:5.1f}%{asr}  "
            f"accepted {accepted:>3}  flagged {len(r['flagged']):>3}  ({r['seconds']:.1f}s, ETA {eta})")


# -----------------------------------------------------------------------------------------------------------------
# Output
# -----------------------------------------------------------------------------------------------------------------

def save_checkpoint(out, state):
    """After every round: all the next round depends on (global model, the defense with its state, the RNG
    states, the rounds so far), written atomically, so a run killed at any moment resumes from its last round."""
    fl.write_atomically(os.path.join(out, CHECKPOINT), lambda tmp: torch.save(state, tmp))


def load_checkpoint(out, device, mmap=False):
    """The checkpoint in ``out``, or None; a damaged one is a ``fl.UserError`` naming it. ``mmap``: its tensors stay
    on disk until read (to read its config)."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    return fl.load_file(path, "a run's checkpoint", "delete it to start that run afresh",
                        lambda state: isinstance(state, dict) and {"config", "rounds"} <= state.keys(),
                        map_location=device, weights_only=False, mmap=mmap)


# Settings that change nothing a run's rounds compute: where its files are, and how many rounds it runs (the same
# run with more rounds continues from its checkpoint).
NOT_COMPARED = ("out", "data_dir", "download", "rounds")
# Settings that some recorded configs lack, each with the value such a run used.
UNRECORDED = {"fedredefense_settings": "paper"}


def same_run(config, other):
    """Two configs describe the same run, up to ``NOT_COMPARED`` and the settings neither run reads (``READ_BY``)."""
    return compared(config) == compared(other)


def compared(config):
    """The settings that make ``config``'s run what it is: all but ``NOT_COMPARED`` and those it does not read; a
    setting its results.json predates takes its ``UNRECORDED`` value."""
    config = {**UNRECORDED, **config}
    return {k: v for k, v in config.items() if k not in NOT_COMPARED and k not in unread(config)}


def previous_run(args):
    """This same run's checkpoint in ``--out``, on the run's device, to resume from (and run on to ``--rounds``);
    or None. Another run's results there are refused in one line, or cleared with ``--overwrite``; this run with
    more rounds done than ``--rounds`` is refused."""
    checkpoint = load_checkpoint(args.out, device_of(args))
    found = checkpoint["config"] if checkpoint else results_config(args.out)
    if found is None:
        return None
    if same_run(found, config_of(args)):
        done = len(checkpoint["rounds"]) if checkpoint else found["rounds"]
        if done > args.rounds:
            raise fl.UserError(f"argument --rounds: {args.out} holds {done} rounds of this run already (give "
                               f"--rounds {done} or more)")
        return checkpoint
    if not args.overwrite:
        there, here = compared(found), compared(config_of(args))
        changed = ", ".join(f"--{k.replace('_', '-')} {there.get(k)} there, {here.get(k)} here"
                            for k in sorted(there.keys() | here.keys()) if there.get(k) != here.get(k))
        raise fl.UserError(f"argument --out: {args.out} holds another run's results ({changed}); give --overwrite to "
                           f"replace them, or another --out")
    for name in OUTPUTS:
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    return None


def resumed_args(out, rounds):
    """The settings of the run whose checkpoint is in ``out`` (``--resume``), to ``rounds`` rounds where given."""
    fl.check_folder("--resume", out)
    checkpoint = load_checkpoint(out, "cpu", mmap=True)  # the config only: the run loads it on its device
    if checkpoint is None:
        raise fl.UserError(f"argument --resume: {out} holds no {CHECKPOINT}")
    if checkpoint["config"]["device"] == "cuda" and not torch.cuda.is_available():
        raise fl.UserError(f"argument --resume: the run in {out} was started with --device cuda, and there is no "
                           f"CUDA device here")
    defaults = vars(parse_args(["--resume", out]))  # the flags a config does not record, at their defaults
    config = {**checkpoint["config"], **({} if rounds is None else {"rounds": rounds})}
    return argparse.Namespace(**{**defaults, **config, "out": out, "resume": None})


def results_config(out):
    """The config recorded in ``out``'s results.json, or None."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return None


def save(results, out):
    """results.json and results.png in ``out``. The rates in results.json (TACC, ASR, DACC, FPR, FNR, ADACC, AFPR,
    AFNR, MR, per round and final) are fractions in [0, 1], where the console and the plot print percent; AAR is in
    rounds; reconstruction errors and R are as the defense computes them."""
    fl.write_atomically(os.path.join(out, "results.png"), lambda tmp: plot(results, tmp))
    # results.json last: a folder that holds it holds every output
    fl.write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))


def code_version():
    """The code that made a run: ``git describe --always --dirty`` of this file's checkout ("-dirty": with
    uncommitted changes), or "unknown" outside a git checkout. results.json records it, and RESULTS.md names it."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def config_of(args):
    """The run's settings as results.json records them (the grid compares them to decide what is done)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("summarize", "figures", "table", "jobs", "print_commands", "resume", "overwrite")}


def threat_model(config):
    """One line naming the threat model a run used, for its progress output and every summary table."""
    c = config if isinstance(config, dict) else vars(config)
    return f"{c['protocol']} (sampling {c['sampling']}, {c['knowledge']} knowledge, {c['model']})"


def scale_of(config):
    """One line naming the scale a run used (--scale and what it set), beside its threat model everywhere."""
    c = config if isinstance(config, dict) else vars(config)
    images = "all" if c.get("train_size") is None else f"{c['train_size']:,}"
    name = "digits' one scale" if c.get("dataset") == "digits" else f"{c.get('scale', 'laptop')} scale"  # no --scale
    return f"{name} ({c['clients']} clients, {images} training images, {c['rounds']} rounds)"


def pct(v):
    """A rate (a fraction in results.json) as the console and the tables print it: percent, or "-"."""
    return "-" if v is None else f"{100 * v:.1f}"


def rounds_text(v):
    """AAR (rounds) as the console and the tables print it."""
    return "-" if v is None else f"{v:.2f}"


def format_final(final):
    """A run's final row on one line (the end of a run, and each cell of a grid as it finishes)."""
    return (f"TACC {pct(final['tacc'])}  ASR {pct(final['asr'])}  DACC {pct(final['dacc'])}  "
            f"FPR {pct(final['fpr'])}  FNR {pct(final['fnr'])}  AAR {rounds_text(final['aar'])}  "
            f"ADACC {pct(final['adacc'])}  MR {pct(final['mr'])}")


def plot(results, path):
    """results.png, per round: TACC (and ASR); each update's reconstruction error e with FedREDefense's threshold
    gamma, or FedDefuse's recoverability R; DACC over the participants (its mean is ADACC); MR (its mean is MR).
    A panel whose metric the defense does not compute says n/a and why. Returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds, c = results["rounds"], results["config"]
    t = [r["round"] for r in rounds]
    series = lambda key: [float("nan") if r[key] is None else 100 * r[key] for r in rounds]

    def n_a(ax, why):  # no data: say so, with no scale to read
        ax.text(0.5, 0.5, f"n/a: {why}", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])

    fig = Figure(figsize=(11, 7), layout="tight")
    (acc, err), (dacc, mr) = axes = fig.subplots(2, 2)
    acc.plot(t, series("tacc"), label="TACC")
    if rounds[0]["asr"] is not None:
        acc.plot(t, series("asr"), label="ASR")
    acc.set(title="Global model", ylabel="%")
    acc.legend()

    err.set(**({"title": "Recoverability R per update", "ylabel": "R"} if c["defense"] == "feddefuse"
               else {"title": "Reconstruction error e per update", "ylabel": "e"}))
    for label, color, attacking in (("benign", "tab:blue", False), ("attacking", "tab:red", True)):
        pts = [(r["round"], e) for r in rounds for k, e in (r["errors"] or {}).items()
               if (int(k) in r["attacking"]) == attacking]
        if pts:
            err.scatter(*zip(*pts), s=8, color=color, alpha=0.6, label=label)
    if c["defense"] == "fedredefense":  # it flags e > gamma
        gamma = fedredefense.HYPER[c["dataset"]].gamma
        err.axhline(gamma, color="black", linestyle="--", label=f"γ = {gamma:g}")
    if err.has_data():
        err.set_yscale("log")
        err.legend()
    else:
        n_a(err, f"{c['defense']} reconstructs no updates")

    for ax, key, title, color in ((dacc, "dacc", "Per-round DACC (mean = ADACC)", "tab:blue"),
                                  (mr, "mr", "Per-round MR (mean = MR)", "tab:red")):
        ax.set(title=title, ylabel="%")
        if any(r[key] is not None for r in rounds):
            ax.plot(t, series(key), color=color)
        else:
            n_a(ax, f"{c['defense']} does not label clients")
    for ax in axes.flat:
        ax.set(xlabel="round", xlim=(0.5, len(rounds) + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is not err:
            ax.set_ylim(-5, 105)  # a line at 0 or 100 stays off the frame
    fig.suptitle(f"{c['dataset']}: {c['defense']} vs {c['attack']} (pattern {c['pattern']})")
    fig.savefig(path, format="png", dpi=100)
    return fig


def main(argv=None):
    """One run's command line (see the top of this file); a grid's or --summarize's (``for_grid``) is grid.main's.
    What the user can get wrong or interrupt ends in one line (``fl.command_line``); Ctrl-C during a run says where
    its checkpoint stands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with fl.command_line("run.py"):
        if for_grid(argv):  # from Python only: ``python run.py`` hands these to grid.py at the top of this file
            raise fl.UserError("a grid, --table or --summarize is grid.py's command line (call grid.main)")
        args = parse_args(argv)
        if args.resume:
            args = resumed_args(args.resume, args.rounds)
        checkpoint = previous_run(args)
        try:
            results = run(args, checkpoint)
            save(results, args.out)
        except KeyboardInterrupt:
            saved = load_checkpoint(args.out, "cpu", mmap=True)
            raise fl.Interrupted(f"interrupted after round {len(saved['rounds']) if saved else 0} of {args.rounds}; "
                                 f"rerun the same command to resume") from None
        print(format_final(results["final"]))
        print(f"wrote {os.path.join(args.out, 'results.json')} and results.png")


if __name__ == "__main__":
    sys.exit(main())
