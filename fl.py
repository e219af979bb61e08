"""Federated-learning plumbing shared by every defense.

The paper's CNNs (and FedDefuse's fully connected nets, the FedREDefense authors' ConvNet), local SGD, model <->
update vectors, FedAvg, and the metrics both papers report.

Conventions (used by every module):
- A model's parameters are one flat vector ``w`` in ``named_parameters()`` order; the models have no buffers.
- A client's update is ``g_i = w_i - w_global`` (FedREDefense eq. 2 notation; FedDefuse writes Delta_i).
- A round's updates are one tensor ``[n_clients, n_params]``.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import math
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

# Local SGD learning rate per dataset. The FedREDefense paper uses 1e-3 for every dataset (App. A.5) over 500
# rounds; the embedded `digits` set has ~50 samples per client (2 SGD steps a round) and is meant to converge in
# tens of rounds on a laptop, so it uses a larger rate, chosen once for all attacks and defenses: 0.1 and 0.2
# learn faster but make genuine first-round updates markedly harder to reconstruct (FedREDefense's premise).
LOCAL_LR = {"digits": 0.05, "mnist": 1e-3, "fmnist": 1e-3, "cifar10": 1e-3, "cinic10": 1e-3}
BATCH_SIZE = 32  # App. A.5
LOCAL_EPOCHS = 1  # Sec. 5.1.4


class CNN(nn.Module):
    """The 2-layer CNN of FedREDefense Table 5 (1-channel data) and Table 6 (3-channel data).

    conv3x3(c1) + ReLU, maxpool 2, conv3x3(c2) + ReLU, maxpool 2, FC(hidden) + ReLU, FC(classes); the softmax
    lives in the loss. Table 5: (30, 50, 100); Table 6: (32, 64, 512).
    Padding: the tables give none (the MXNet CNN they come from uses valid convolutions), so images of 16 px and
    more use padding 0. Two valid conv+pool stages would shrink 8x8 digits to nothing, so smaller images use
    padding 1. On 28x28 images the second pool floors 11 rows to 5, so rows and columns 26-27 never reach the
    output (the backdoor trigger moves where the model reads: ``attacks.visible_trigger``). The FedREDefense
    authors' code (github: xyq7/FedREDefense, ``codes/models.py:ConvNet``) trains a 3-layer ConvNet-128 instead
    (``ConvNet``, run.py --model convnet); by default we follow the paper.
    """

    def __init__(self, in_channels, image_size, num_classes=10):
        super().__init__()
        c1, c2, hidden = (30, 50, 100) if in_channels == 1 else (32, 64, 512)
        pad = 0 if image_size >= 16 else 1
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=pad)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=pad)
        side = ((image_size + 2 * pad - 2) // 2 + 2 * pad - 2) // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        # ReLU after the pooling: the same function and the same gradients as pool(ReLU(x)) (ReLU is monotone, and
        # a window whose maximum is <= 0 passes no gradient either way), on a quarter of the activations.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """The fully connected networks of FedDefuse App. B.1: two FC layers for 1-channel data (its FMNIST model),
    three for 3-channel data (its CIFAR-10 model), ReLU between them; the softmax lives in the loss.

    The paper gives the depths only. Widths chosen here: 200 hidden units for the two-layer net (the width of
    McMahan et al.'s MNIST MLP), 512 and 128 for the three-layer one (the CIFAR CNN's FC width of Table 6, then a
    quarter of it). The image is flattened first, so every module that builds the model from ``sample_shape``
    (FedREDefense's knowledge, FedDefuse's surrogates) works unchanged.
    """

    def __init__(self, in_channels, image_size, num_classes=10):
        super().__init__()
        widths = [in_channels * image_size * image_size] + ([200] if in_channels == 1 else [512, 128])
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class ConvNet(nn.Module):
    """The model the FedREDefense authors' code trains in every script: ``codes/models.py:ConvNet`` with its
    defaults (github: xyq7/FedREDefense): width 128, depth 3, ReLU, "instancenorm", "avgpooling".

    Three blocks of conv3x3(128) + instance norm + ReLU + avgpool 2x2, then FC(classes) on the flattened features.
    Their instance norm is GroupNorm(128, 128) with affine parameters, so the model has no buffers. The first
    convolution pads 1-channel images by 3 (28x28 becomes 32x32), every other convolution by 1. Their code sizes the
    classifier for 32x32 inputs (128 x 4 x 4 = 2048 features); here it is sized from ``image_size``, which gives the
    same 2048 on 28x28 and 32x32 images, and 128 x 1 x 1 on 8x8 digits (12, 6, 3, then 1 pixel). Parameters and
    their names are theirs (``features.<i>``, ``classifier``): 317,706 on 1-channel 28x28 images, 320,010 on 3-channel
    32x32 ones. PyTorch's default initialisation, as theirs.
    """

    def __init__(self, in_channels, image_size, num_classes=10, width=128, depth=3):
        super().__init__()
        layers, channels, side = [], in_channels, image_size
        for block in range(depth):
            pad = 3 if in_channels == 1 and block == 0 else 1
            layers += [nn.Conv2d(channels, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                       nn.AvgPool2d(2, 2)]
            channels, side = width, (side + 2 * pad - 2) // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


MODELS = {"cnn": CNN, "mlp": MLP, "convnet": ConvNet}


# ---------------------------------------------------------------------------------------------------------------
# Parameters as one vector
# ---------------------------------------------------------------------------------------------------------------

def flatten_params(model):
    """All parameters of ``model`` as one detached vector ``w``."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_params(model, w):
    """Copy the flat vector ``w`` into ``model``'s parameters (no autograd; ``w`` itself is never aliased)."""
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            p.copy_(w[start:start + p.numel()].view_as(p))
            start += p.numel()


def param_sizes(model):
    """Number of entries of each parameter tensor, in flat-vector order (the layer layout of an update)."""
    return [p.numel() for p in model.parameters()]


def param_slices(model):
    """``[(name, slice, shape)]``: where each parameter tensor lives in the flat vector, in order."""
    out, start = [], 0
    for name, p in model.named_parameters():
        out.append((name, slice(start, start + p.numel()), tuple(p.shape)))
        start += p.numel()
    return out


def unflatten(model, w):
    """The flat vector ``w`` as its layers: one view per parameter tensor, in ``named_parameters()`` order."""
    return tuple(w[where].view(shape) for _, where, shape in param_slices(model))


def functional_forward(model, w, x):
    """``model(x)`` evaluated at the parameters ``w``, differentiably in ``w``: the flat vector, or its layers.

    This is what lets FedREDefense and FedDefuse unroll simulated SGD steps and back-propagate through them. The
    unrolled training passes layers (``unflatten``): autograd through slices of one flat vector builds a
    zero-filled full-size gradient for every slice, and did 59% of the work of a CIFAR-CNN reconstruction.
    """
    layers = unflatten(model, w) if isinstance(w, torch.Tensor) else w
    names = (name for name, _ in model.named_parameters())
    return functional_call(model, dict(zip(names, layers)), (x,))


# ---------------------------------------------------------------------------------------------------------------
# Local training
# ---------------------------------------------------------------------------------------------------------------

def sgd_epoch(model, x, y, lr, generator, batch_size=BATCH_SIZE):
    """One pass of plain SGD (no momentum, no weight decay; App. A.5) over (x, y) in a seeded random order:
    w <- w - lr * grad, the update ``torch.optim.SGD`` makes, without its per-step bookkeeping."""
    params = list(model.parameters())
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for batch in order.split(batch_size):
        grads = torch.autograd.grad(F.cross_entropy(model(x[batch]), y[batch]), params)
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p.add_(grad, alpha=-lr)


def local_update(model, w_global, x, y, lr, generator, epochs=LOCAL_EPOCHS):
    """Genuine local training: start from ``w_global``, run ``epochs`` of SGD, return ``g_i = w_i - w_global``."""
    load_params(model, w_global)
    for _ in range(epochs):
        sgd_epoch(model, x, y, lr, generator)
    return flatten_params(model) - w_global


def local_steps(n_samples, epochs=LOCAL_EPOCHS, batch_size=BATCH_SIZE):
    """tau, the number of SGD steps ``local_update`` takes on ``n_samples`` examples."""
    return epochs * math.ceil(n_samples / batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Speed: where the work runs, never what it computes. Measured with ``python bench.py`` (RESULTS.md, "Speed").
# ---------------------------------------------------------------------------------------------------------------
# - On a CPU, independent jobs (clients, test batches) run one per core, each on one thread with its own copy of
#   the model: at a batch of 32 one client's convolutions cannot keep two cores busy (FashionMNIST CNN: 9.1 ms a
#   step on two threads, 8.6 ms on one), while two clients at once take 4.4 ms a step each.
# - On a CPU the convolutional nets (CNN, ConvNet) and their images are in channels-last memory format, which
#   oneDNN's convolutions and pooling prefer (FashionMNIST CNN: 8.6 ms a step, against 15.6 ms in NCHW; ConvNet:
#   132 ms against 198 ms, on one busy thread). The flat vector ``w`` is unchanged: ``flatten_params`` and
#   ``load_params`` read and write the parameters in their logical order.
# - A GPU runs the jobs one after another, in NCHW (not measured here).
# - glibc's malloc hands every freed block above its mmap threshold back to the kernel, and the next tensor of that
#   size faults its pages in afresh. A FedDefuse round of 100 clients on FashionMNIST spent 3 min 7 s in the
#   kernel against 1 min 47 s in user code, in munmap and page faults; ``keep_freed_memory`` stops that.

def keep_freed_memory():
    """Have glibc's malloc serve every allocation from its heap and keep up to 1 GiB of freed memory there
    (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB), for the whole process. Elsewhere (no glibc) nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)        # M_MMAP_MAX
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


keep_freed_memory()


def device_of(model):
    return next(model.parameters()).device


def cores(device):
    """How many jobs run at once on ``device``: as many as the threads torch may use on a CPU, one on a GPU."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def on_cores(fn, items, model):
    """``[fn(m, item) for item in items]``, in order, the items spread over ``cores``: each worker thread has one
    intra-op thread and lends its job a private copy ``m`` of ``model`` (functional calls swap a module's
    parameters, so two jobs never share one). The items must be independent: the results do not depend on which
    worker runs which item."""
    workers = min(len(items), cores(device_of(model)))
    if workers <= 1:
        return [fn(model, item) for item in items]
    copies = queue.SimpleQueue()
    for m in [model] + [copy.deepcopy(model) for _ in range(workers - 1)]:
        copies.put(m)

    def job(item):
        m = copies.get()
        try:
            return fn(m, item)
        finally:
            copies.put(m)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(job, items))
    finally:
        torch.set_num_threads(threads)  # a worker's setting can leak into the process's (MKL's is global)


def channels_last(model):
    """Whether ``model`` runs in channels-last format: a convolutional net (CNN, ConvNet) on a CPU."""
    return isinstance(model, (CNN, ConvNet)) and device_of(model).type == "cpu"


def in_fast_format(model, *images):
    """``model`` and the image batches ``images`` in the memory format ``model`` runs fastest in."""
    if not channels_last(model):
        return (model, *images)
    fmt = torch.channels_last
    return (model.to(memory_format=fmt), *(x.contiguous(memory_format=fmt) for x in images))


# ---------------------------------------------------------------------------------------------------------------
# Aggregation: what every defense sees and returns
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Round:
    """What the server legitimately knows in round t, besides the updates themselves."""
    t: int                  # round index, from 0
    clients: list           # ids of the round's participants, row order of the updates
    w_global: torch.Tensor  # w^{t-1}, the model the participants started from ([G, d]: an ensemble, FLCert)
    sizes: torch.Tensor     # |D_i| of each participant (FedDefuse eq. 11 weights)
    malicious: torch.Tensor  # ground truth (attacking this round); read by the `oracle` defense only


def subset_round(rnd, keep):
    """The Round of the participants where the bool mask ``keep`` holds (their rows, in order)."""
    return dataclasses.replace(rnd, clients=[c for c, k in zip(rnd.clients, keep.tolist()) if k],
                               sizes=rnd.sizes[keep], malicious=rnd.malicious[keep])


@dataclass
class Decision:
    """What every defense returns; detection metrics are computed from it in one place (run.py)."""
    update: torch.Tensor                   # aggregated update: w^t = w^{t-1} + update
    accepted: torch.Tensor | None          # bool [n]: updates that went into the aggregate; None: the rule
                                           # makes no per-client decision (Median, Trimmed mean, RFA, ...)
    expel: torch.Tensor | None = None      # bool [n]: clients removed for good (FedREDefense Alg. 1); None: never
    errors: torch.Tensor | None = None     # per-update reconstruction error / recoverability, where computed
    iterations: torch.Tensor | None = None  # outer optimisation iterations spent per update, where counted
    details: dict | None = None             # what the defense decided from, JSON-ready; stored in the round record


def fedavg(updates, weights=None):
    """FedAvg of the rows of ``updates`` ``[n, d]``: the plain mean, or the ``weights``-weighted mean.

    The FedREDefense code averages unweighted (clients are near-equal in size after its balanced partition);
    FedDefuse eq. 11 weights by data size. An empty set aggregates to the zero update (the global model stays),
    where the official code crashes.
    """
    if len(updates) == 0:
        return torch.zeros(updates.shape[1], device=updates.device)
    if weights is None:
        return updates.mean(0)
    weights = weights.to(updates)
    return (weights / weights.sum()) @ updates


def finite_rows(updates):
    """Boolean mask of the updates with no NaN or Inf entry.

    The round loop drops the others right after collecting them, so that no defense, attack statistic or average
    ever sees a non-finite value; they count as flagged.
    """
    return torch.isfinite(updates).all(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, w, x, batch_size=256):
    """The class the global model ``w`` ``[d]`` predicts for each row of ``x``; for an ensemble ``w`` ``[G, d]``
    (FLCert: one global model per group of clients), the plurality vote of its G models. The batches are spread
    over the cores (``on_cores``); 256 images keep a CNN's activations in cache (batches of 2048 took 4x as long
    on FashionMNIST, much of it in the kernel, paging 166 MB of intermediates in and out)."""
    if w.dim() == 2:
        return plurality_vote(torch.stack([predict(model, w_g, x, batch_size) for w_g in w]))
    load_params(model, w)
    return torch.cat(on_cores(lambda m, xb: m(xb).argmax(1), x.split(batch_size), model))


def plurality_vote(predictions):
    """The most frequent label of each column of ``predictions`` ``[G, m]``; ties go to the smallest label
    (FLCert's rule: ``argmax`` returns the first maximum of the vote counts)."""
    votes = F.one_hot(predictions, int(predictions.max()) + 1).sum(0)
    return votes.argmax(1)


def accuracy(model, w, x, y):
    """TACC: the share of test examples the global model ``w`` classifies correctly (App. A.4)."""
    return (predict(model, w, x) == y).float().mean().item()


def attack_success_rate(model, w, x, y, add_trigger, target):
    """ASR: the share of triggered test images classified as ``target``, over the test images whose true label
    is not already ``target`` (App. A.4 and the official code's denominator)."""
    keep = y != target
    return (predict(model, w, add_trigger(x[keep])) == target).float().mean().item()


def targeted_success_rate(model, w, x, y, source, target):
    """ASR of a targeted label flip (FedREDefense sec. 6.1): the share of the ``source`` class's test images that
    the global model classifies as ``target``."""
    keep = y == source
    return (predict(model, w, x[keep]) == target).float().mean().item()


def _rate(numerator, denominator):
    return numerator / denominator if denominator else None


def detection_metrics(flagged, malicious):
    """DACC, FPR, FNR of a detector (App. A.4; positive = malicious). ``None`` where a rate has no denominator.

    flagged, malicious: boolean tensors over the same clients.
    DACC = correct / all;  FPR = benign flagged / benign;  FNR = malicious accepted / malicious.
    """
    flagged, malicious = flagged.bool(), malicious.bool()
    n_mal = int(malicious.sum())
    n_ben = len(malicious) - n_mal
    return {
        "dacc": _rate(int((flagged == malicious).sum()), len(malicious)),
        "fpr": _rate(int((flagged & ~malicious).sum()), n_ben),
        "fnr": _rate(int((~flagged & malicious).sum()), n_mal),
    }


def malicious_rate(accepted, malicious):
    """FedDefuse's MR for one round: the share of accepted updates that are malicious, FN / (FN + TN).

    App. B.1's wording is ambiguous; its tables (No Defense: DACC + MR = 100) fix this reading. A round that
    accepts nobody has MR 0.
    """
    accepted, malicious = accepted.bool(), malicious.bool()
    n_accepted = int(accepted.sum())
    return int((accepted & malicious).sum()) / n_accepted if n_accepted else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Progress inside a long round
# ---------------------------------------------------------------------------------------------------------------

_shown = {"at": 0.0, "open": False}


def show_progress(text, every=1.0, every_in_logs=60.0):
    """Say what a long computation is doing, ``text()``: on a terminal, one line rewritten at most every ``every``
    seconds; in a log (stderr not a terminal), one line every ``every_in_logs`` seconds. ``text`` is only called
    when a line is due, so a hot loop pays for the clock alone."""
    tty = sys.stderr.isatty()
    now = time.monotonic()
    if now - _shown["at"] < (every if tty else every_in_logs):
        return
    _shown["at"] = now
    sys.stderr.write(f"\r\033[K  {text()}" if tty else f"  {text()}\n")
    sys.stderr.flush()
    _shown["open"] = tty


def end_progress():
    """Clear the progress line, if one is showing, before the next ordinary line."""
    if _shown["open"]:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        _shown["open"] = False


# ---------------------------------------------------------------------------------------------------------------
# Command lines (run.py, grid.py, feddefuse.py, bench.py): what the user can get wrong ends in one line,
# and what they write is never left half-written
# ---------------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A failure the user causes and can fix (a flag, a path, a file): its message is one line saying what is wrong
    and what to do."""


class Interrupted(Exception):
    """Ctrl-C, caught where it is known what was kept: its message says so, and how to go on."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose bad flags and values are a ``UserError`` (the usage is under --help)."""

    def error(self, message):
        raise UserError(message)


def number(text):
    """A finite float (argparse's ``type`` for a number flag: nan and inf are no setting)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


@contextlib.contextmanager
def command_line(prog):
    """Around a command's work: a ``UserError`` ends in one line on stderr, "PROG: error: ...", and exit code 2;
    Ctrl-C in one line (an ``Interrupted``'s message, else "PROG: interrupted") and exit code 130; a closed stdout
    quietly, exit code 1. A traceback is for bugs only."""
    try:
        yield
    except UserError as e:
        end_progress()
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        end_progress()
        sys.stderr.write(f"{prog}: {str(e) or 'interrupted'}\n")
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (| head): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def load_file(path, what, fix, looks_right, **kw):
    """``torch.load(path, **kw)`` of a file the user points to. One that cannot be read, or whose content fails
    ``looks_right``, is a ``UserError`` naming it, ``what`` it should be, and the ``fix``."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; {fix}")
    try:
        content = torch.load(path, **kw)
    except Exception as e:  # torch.load raises whatever its unpickler meets in a damaged or foreign file
        raise UserError(f"{path} is damaged or not {what} ({type(e).__name__}); {fix}") from None
    if not looks_right(content):
        raise UserError(f"{path} is not {what}; {fix}")
    return content


def check_folder(flag, path, writable=True):
    """Refuse, before any work, a folder that cannot be one: no name, a file, inside a file, or (``writable``) one
    this process may not write to or create. A folder still to be made is made and removed again, the only test of
    a parent that refuses it (/proc, a full or read-only disk, even for root)."""
    if not path:
        raise UserError(f"argument {flag}: must name a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"argument {flag}: {existing} is a file, not a folder (give a folder)")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"argument {flag}: {existing} is not writable (give a folder where files can be written)")
    if not writable or existing == os.path.abspath(path):
        return
    try:
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"argument {flag}: cannot create {path} ({e.strerror or e}); give a folder where files can "
                        f"be written") from None
    finally:  # the folders made, deepest first, up to the one that was there
        made = os.path.abspath(path)
        while made != existing:
            with contextlib.suppress(OSError):
                os.rmdir(made)
            made = os.path.dirname(made)


def write_atomically(path, write):
    """Write through a temporary file and rename, so a crash never leaves a half-written result behind; the folder is
    made if need be. A write the system refuses (a full disk, a folder made read-only) is a ``UserError`` naming the
    file."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):  # the write failed (an exception; a kill leaves it, to be overwritten next time)
            os.remove(tmp)


def write_text(path, text):
    """``text`` into the file ``path``, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)
