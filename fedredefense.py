"""FedREDefense: model-update reconstruction error (Xie, Fang & Gong, ICML 2024).

Key finding (sec. 1): a genuine update g_i^t can be reproduced by a few SGD steps on a tiny distilled dataset
K_i (10 images with learned soft labels and a learned learning rate alpha_i); a hand-crafted poisoned update
cannot. So every round the server

- reconstructs each participant's update (Algorithm 2: bi-level optimisation of K_i, N unrolled inner steps),
- flags every client whose reconstruction error e_i^t exceeds gamma, drops its update and expels it for good,
- aggregates the rest with FedAvg (Algorithm 1).

Where the FedREDefense authors' code (github: xyq7/FedREDefense) and the paper differ, the choice made is written
next to the code it concerns; the list in short:

- Inner loss: soft-label cross-entropy averaged over batch *and* classes, as the official `kd_loss` (the paper
  writes f(K, w)); alpha's Table 7 values are on that scale.
- Outer optimiser: the paper says SGD; the code uses SGD with momentum 0.5, recreated at every call. We do the
  same: Table 7's learning rates were tuned with it.
- Initial K: N(0, 1) noise images shared by all clients and all-zero label logits (code; sec. 5.1.4 says
  "uniform noise"). Inputs are normalised, so N(0, 1) matches their scale.
- Dynamic early stop (sec. 4.4): the error is checked before every outer update and optimisation stops once
  e < gamma. Without an early stop the loop ends with the paper's final evaluation of the last K (Alg. 2
  lines 16-20); the code instead returns the error from before its last update.
- Iteration caps (Table 7): "Initial round of M" on a client's first participation, "Upper bound of M" after.
- Settings: Table 7's (``HYPER``, the default) or those of the authors' scripts (``OFFICIAL_HYPER``; run.py
  --fedredefense-settings official), which differ on FashionMNIST.
- The error carries the code's 1e-9 guard on both norms, so a zero update gets a huge (not infinite) error.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fl


@dataclass(frozen=True)
class Hyper:
    """FedREDefense's hyper-parameters for one dataset: Table 7's (``HYPER``) or the authors' scripts'
    (``OFFICIAL_HYPER``). N, gamma and |K| are sec. 5.1.4's, and the authors' code's too (syn_steps 5 in every
    script; the 0.6 hard-coded in ``Synthesizer.synthesize_single``; --ipc 1 of 10 classes)."""
    lr_images: float     # LR of images in K_i
    lr_labels: float     # LR of labels in K_i
    alpha_init: float    # virtual model LR: initial alpha_i
    lr_alpha: float      # LR of the virtual model LR
    first_iters: int     # "Initial round of M": cap on a client's first reconstruction
    max_iters: int       # "Upper bound of M": cap on every later reconstruction
    n_images: int = 10   # |K_i|: 10 data-label pairs
    inner_steps: int = 5  # N
    gamma: float = 0.6   # threshold on e_i^t
    momentum: float = 0.5  # official code's outer SGD momentum


# Table 7, one set per dataset and the same for every attack. MNIST shares FashionMNIST's row.
# `digits` (not in the paper) keeps Table 7's image and label learning rates. Its clients take tau = 2 local steps
# at lr 0.05, so alpha starts where N = 5 soft-CE/C steps move as far as the real update (alpha = tau*lr*C/N = 0.2)
# and learns 20x faster than in Table 7. Caps: 1000 (genuine one-class clients need up to ~400 iterations at first
# participation, and genuine updates grow harder to reconstruct as training advances). Chosen once, on genuine
# updates only (the `--attack none` run).
HYPER = {
    "fmnist": Hyper(1e-1, 5e-2, 1e-1, 5e-5, first_iters=5000, max_iters=5000),
    "mnist": Hyper(1e-1, 5e-2, 1e-1, 5e-5, first_iters=5000, max_iters=5000),
    "cifar10": Hyper(1e-1, 5e-2, 5e-2, 5e-5, first_iters=500, max_iters=1500),
    "cinic10": Hyper(1e-1, 5e-2, 5e-2, 5e-5, first_iters=2000, max_iters=4000),
    "digits": Hyper(1e-1, 5e-2, 2e-1, 1e-3, first_iters=1000, max_iters=1000),
}

# The FedREDefense authors' settings (github: xyq7/FedREDefense, scripts/{FashionMNIST,cifar10,cinic}/ours.sh as
# commit 6c80ea1 sets them, unchanged at HEAD): lr_img, lr_label, lr_teacher (the initial alpha), lr_lr, Iteration
# (the cap on a client's first reconstruction) and Max_Iter (the cap on every later one). Their scripts cover these
# three datasets only. CIFAR-10's and CINIC-10's rows equal Table 7's; FashionMNIST's shares only the initial alpha.
# The rest of their runs are run.py flags: --model convnet, --rounds 300 (500 at 6c80ea1), and on CIFAR-10
# --participation 0.1.
OFFICIAL_HYPER = {
    "fmnist": Hyper(5e-1, 2e-1, 1e-1, 5e-6, first_iters=800, max_iters=2000),
    "cifar10": Hyper(1e-1, 5e-2, 5e-2, 5e-5, first_iters=500, max_iters=1500),
    "cinic10": Hyper(1e-1, 5e-2, 5e-2, 5e-5, first_iters=2000, max_iters=4000),
}
SETTINGS = {"paper": HYPER, "official": OFFICIAL_HYPER}  # run.py --fedredefense-settings


@dataclass
class Knowledge:
    """K_i, the distilled local knowledge of one client, plus its virtual learning rate alpha_i.

    Also used stacked, with a leading client dimension, when a round's clients are reconstructed together.
    """
    images: torch.Tensor        # [|K|, C, H, W]
    label_logits: torch.Tensor  # [|K|, classes]; soft labels are their softmax
    alpha: torch.Tensor         # scalar

    def tensors(self):
        return self.images, self.label_logits, self.alpha

    def equal(self, other):
        return self is other or all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    @staticmethod
    def stack(ks):
        return Knowledge(*(torch.stack(t) for t in zip(*(k.tensors() for k in ks))))

    def unstack(self):
        return [Knowledge(*t) for t in zip(*self.tensors())]


def initial_knowledge(sample_shape, num_classes, hp, generator, device):
    """K_i^0: N(0, 1) noise images and zero label logits (uniform soft labels); alpha_i = Table 7's initial LR."""
    images = torch.randn(hp.n_images, *sample_shape, generator=generator)
    return Knowledge(images.to(device),
                     torch.zeros(hp.n_images, num_classes, device=device),
                     torch.tensor(hp.alpha_init, device=device))


def soft_cross_entropy(logits, label_logits):
    """f(K, w): cross-entropy against softmax(label_logits), averaged over the batch and the classes
    (the official `kd_loss`; plain CE divided by the number of classes)."""
    return -(label_logits.softmax(-1) * logits.log_softmax(-1)).mean()


def simulate_training(model, w0, images, label_logits, lr, steps):
    """w_hat_N: ``steps`` steps of gradient descent from ``w0`` on (images, soft labels) at learning rate ``lr``.

    Alg. 2 lines 6-9: w_hat_{n+1} = w_hat_n - alpha * grad f(K, w_hat_n). The parameters are the model's layers
    (``fl.unflatten``), and so is the result. The inner gradients are taken with torch.func.grad, so w_hat_N stays
    differentiable in the images, the labels and the learning rate (the outer loop back-propagates through all
    steps) and the function can be vmapped over clients. FedDefuse's simulated local training (its eq. 5b) is the
    same computation and calls this function too.
    """
    loss = lambda w: soft_cross_entropy(fl.functional_forward(model, w, images), label_logits)
    w = w0
    for _ in range(steps):
        w = tuple(w_n - lr * grad for w_n, grad in zip(w, torch.func.grad(loss)(w)))
    return w


def simulated_updates(model, w0, images, label_logits, lrs, steps):
    """w_hat_N - w_hat_0 ``[n, d]`` for a batch of clients (leading dimension of every argument but the flat
    ``w0``): ``simulate_training``, one client's knowledge and learning rate per row, vmapped over the clients
    (a single client runs without vmap, which then only costs). ``fl.CNN`` takes the same computation written out
    by hand, ``cnn_simulated_updates``. Shared by FedREDefense and FedDefuse."""
    layers = fl.unflatten(model, w0)

    def one(x, y, a):
        w_hat = simulate_training(model, layers, x, y, a, steps)
        return torch.cat([(w_n - w_0).reshape(-1) for w_n, w_0 in zip(w_hat, layers)])

    # Measured on one thread, client outer iterations/s at 1 / 25 clients (a 1024^2 matmul at 194-216 GFLOP/s), the
    # hand-written path against the plain loop: FashionMNIST 30.5 / 33.2 against 20.1 / 19.3, CIFAR 14.2 / 17.1
    # against 6.1 / 6.3 (this function's vmapped path: 9.6 / 10.0), digits 84.9 / 196 against 66.6 / 67.5. The
    # vmapped path is slower on the 1-channel CNNs too (FashionMNIST, 1 client: 21.1 against 28.7 hand-written).
    if type(model) is fl.CNN:
        return cnn_simulated_updates(model, w0, images, label_logits, lrs, steps)
    if len(images) == 1:
        return one(images[0], label_logits[0], lrs[0])[None]
    return torch.func.vmap(one)(images, label_logits, lrs)


def patches(x):
    """im2col of 3x3 convolutions in channels-last layout: ``x`` [clients, n, H, W, C] (already padded) ->
    [clients, n * (H - 2) * (W - 2), 9 * C], one row per output position in row-major order, each row the
    (ky, kx, C) patch at that position. Its backward is ``col2im`` (``Patches``)."""
    windows = x.unfold(2, 3, 1).unfold(3, 3, 1)  # a view [clients, n, H - 2, W - 2, C, ky, kx]
    return windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(len(x), -1, 9 * x.shape[-1])


def col2im(cols, shape):
    """The adjoint of ``patches``: each patch row added back onto the positions it was read from, [shape]."""
    clients, n, height, width, channels = shape
    cols = cols.view(clients, n, height - 2, width - 2, 9, channels)
    out = cols.new_zeros(shape)
    for k in range(9):
        a, b = divmod(k, 3)
        out[:, :, a:a + height - 2, b:b + width - 2] += cols[:, :, :, :, k]
    return out


class Patches(torch.autograd.Function):
    """``patches`` whose backward is ``col2im``'s 9 in-place additions rather than autograd's backward of 9
    slices and a stack (a zero-filled full-size tensor per slice): 17 ms against 47 ms for 25 clients of the
    FashionMNIST CNN's conv2 patches, one thread."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return patches(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return col2im(grad, ctx.shape)


class Col2im(torch.autograd.Function):
    """``col2im``, whose backward is ``patches`` of the gradient made channels-last first: the gradient arrives
    channels-first in memory (from pooling's backward), and ``patches`` copies it 8x slower so (25 clients' conv2
    input gradient on FashionMNIST: 9.5 ms against 1.3 with the copy, one thread)."""

    @staticmethod
    def forward(ctx, cols, shape):
        return col2im(cols, shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return patches(grad.contiguous()), None


class Conv(torch.autograd.Function):
    """A 3x3 convolution as a product with its patches, z = patches w^T + b (``patches`` [clients, rows, 9C], ``w``
    [clients, C', 9C]), for ``cnn_gradient``'s conv2, whose patches have one more use: the weight gradient d^T
    patches (``ConvWeightGradient``, d = dL/dz). The patches' gradient has a term from each, g w + d g_w. Autograd
    takes two products with C' (50) columns and adds them; this backward takes one product of the stacked factors,
    [g, d] [w; g_w], which the weight gradient's backward leaves in ``link``. One thread, 13 FashionMNIST
    clients: 32.3 client outer iterations/s against 30.6 (a 1024^2 matmul at 181 GFLOP/s). Not used for conv1,
    whose patches' gradient is narrow (9 columns): there the stacking lost 3%."""

    @staticmethod
    def forward(ctx, patches, w, b, link):
        ctx.save_for_backward(patches, w)
        ctx.link = link
        return torch.baddbmm(b.unsqueeze(1), patches, w.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        patches, w = ctx.saved_tensors
        rows, weights = [grad], [w]
        if "term" in ctx.link:
            d, g_w = ctx.link.pop("term")
            rows.append(d)
            weights.append(g_w)
        return torch.cat(rows, 2) @ torch.cat(weights, 1), grad.transpose(1, 2) @ patches, grad.sum(1), None


class ConvWeightGradient(torch.autograd.Function):
    """d^T patches, the weight gradient of ``Conv`` for its output gradient ``d``. Its backward leaves its patches
    term (d, g_w) to ``Conv``'s backward through ``link``. It must run first, and does: autograd runs the nodes
    made later first, and this one is made after the ``Conv`` it belongs to (it takes dL/dz)."""

    @staticmethod
    def forward(ctx, d, patches, link):
        ctx.save_for_backward(d, patches)
        ctx.link = link
        return d.transpose(1, 2) @ patches

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_w):
        d, patches = ctx.saved_tensors
        ctx.link["term"] = d, g_w
        return patches @ g_w.transpose(1, 2), None, None


def pooled_part(x):
    """The part of a padded input [clients, n, H, W, C] that a 3x3 convolution followed by 2x2 max-pooling reads:
    pooling drops an odd output's last row and column, so its convolution is not computed (the FashionMNIST CNN's
    conv2: 100 of 121 positions, the CIFAR CNN's: 144 of 169)."""
    height, width = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return x[:, :, :height, :width]


def pool(z, n, side):
    """2x2 max-pooling of conv outputs [clients, n * side * side, c] (row-major positions, channels last), by
    ``F.max_pool2d`` on the channels-last view: (maxima [clients * n, c, side // 2, side // 2] in channels-last
    memory, the indices ``F.max_unpool2d`` takes)."""
    clients, _, channels = z.shape
    return F.max_pool2d(z.view(clients * n, side, side, channels).permute(0, 3, 1, 2), 2, return_indices=True)


def unpool(grad, where, side, clients):
    """max-pooling's backward: ``grad`` [clients * n, c, side // 2, side // 2] onto the positions ``where`` of
    ``pool``, zero elsewhere: [clients, n * side * side, c]."""
    return F.max_unpool2d(grad, where, 2, output_size=(side, side)).permute(0, 2, 3, 1).reshape(
        clients, -1, grad.shape[1])


class Factored:
    """A fully connected weight after some gradient steps, kept as its factors: W = W0 + sum_j u_j^T v_j.

    A step's weight gradient d_out^T x is the product of the layer's output gradient and its input over the n
    images, of rank n (10), while the weight is [out, in] (the CIFAR CNN's fc1: 512 x 2304). Kept as factors, a step
    costs products with the n-row factors instead of writing a full weight and its gradient: on one thread the
    unfactored CIFAR CNN spent 46% of its time on fc1's weights. W0 [out, in] is shared by the clients; u
    [clients, r, out] and v [clients, r, in] hold the r = steps * n rows taken so far, u scaled by -alpha."""

    def __init__(self, w0, u, v):
        self.w0, self.u, self.v = w0, u, v

    @staticmethod
    def start(w0, clients):
        return Factored(w0, w0.new_zeros(clients, 0, w0.shape[0]), w0.new_zeros(clients, 0, w0.shape[1]))

    def forward(self, x):
        """x W^T for x [clients, n, in]."""
        return x @ self.w0.T + (x @ self.v.transpose(1, 2)) @ self.u

    def backward(self, d_out):
        """d_out W for d_out [clients, n, out]: the gradient of the layer's input."""
        return d_out @ self.w0 + (d_out @ self.u.transpose(1, 2)) @ self.v

    def step(self, lrs, d_out, x):
        """W - alpha * d_out^T x, one learning rate per client."""
        return Factored(self.w0, torch.cat([self.u, -lrs.view(-1, 1, 1) * d_out], 1), torch.cat([self.v, x], 1))

    def delta(self):
        """W - W0 [clients, out, in]."""
        return self.u.transpose(1, 2) @ self.v


class Dense:
    """A fully connected weight kept whole, W [clients, out, in], with ``Factored``'s methods."""

    def __init__(self, w0, w):
        self.w0, self.w = w0, w

    @staticmethod
    def start(w0, clients):
        return Dense(w0, w0.expand(clients, *w0.shape))

    def forward(self, x):
        return x @ self.w.transpose(1, 2)

    def backward(self, d_out):
        return d_out @ self.w

    def step(self, lrs, d_out, x):
        return Dense(self.w0, self.w - lrs.view(-1, 1, 1) * (d_out.transpose(1, 2) @ x))

    def delta(self):
        return self.w - self.w0


def fully_connected(w0, clients):
    """A fully connected layer's weight for ``clients`` clients: ``Factored`` where the weight is large (100k entries
    or more: the FashionMNIST and CIFAR CNNs' fc1), ``Dense`` where it is small, which the factors' extra
    operations can cost more than they save. Chosen by the weight alone, so that a client's arithmetic does not
    depend on how many clients share its batch (an adaptive attacker's test must round as the server's). One
    thread, client outer iterations/s with fc1 factored / whole (a 1024^2 matmul at about 190 GFLOP/s): the digits
    CNN's (100 x 200), one client 74.7 / 81.0, 13 clients 196 / 180; the FashionMNIST CNN's (100 x 1250), 13
    clients 33.4 / 29.0."""
    return (Factored if w0.numel() >= 100_000 else Dense).start(w0, clients)


def cnn_simulated_updates(model, w0, images, label_logits, lrs, steps):
    """``simulated_updates`` for ``fl.CNN``, with the inner gradient written out by hand (forward and backward
    of the CNN as batched matrix products over the clients) instead of torch.func.grad under vmap. The same
    computation: w_hat_{n+1} = w_hat_n - alpha * grad f(K, w_hat_n), every operation differentiable, so autograd
    takes the outer gradient through the N steps. Activations are channels-last, convolutions are matrix products
    with ``patches`` (conv1's depend on the images only, so they are built once for all N steps), pooling is
    ``F.max_pool2d`` on channels-last views, the fully connected weights are ``fully_connected``'s. The convolution
    kernels are kept as (ky, kx, C) and fc1's columns as (h, w, c), and put back in the flat order at the end. Its
    speed, measured: ``simulated_updates``' comment. The vmapped path pays for oneDNN's grouped convolutions (vmap
    over clients), autograd's zero-filled backward of every slice, and max-pooling with indices in NCHW."""
    pad = model.conv1.padding[0]
    clients, n, channels, side = images.shape[:4]
    c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b = fl.unflatten(model, w0)
    hidden, (c2, c1) = f1w.shape[0], c2w.shape[:2]
    cells = f1w.shape[1] // c2  # pooled positions after conv2
    start = (c1w.permute(0, 2, 3, 1).reshape(c1, -1), c1b, c2w.permute(0, 2, 3, 1).reshape(c2, -1), c2b,
             f1w.view(hidden, c2, cells).transpose(1, 2).reshape(hidden, -1), f1b, f2w, f2b)
    w = [*(t.expand(clients, *t.shape) for t in start[:4]), fully_connected(start[4], clients),
         f1b.expand(clients, -1), fully_connected(f2w, clients), f2b.expand(clients, -1)]
    padded = F.pad(images.permute(0, 1, 3, 4, 2), (0, 0, pad, pad, pad, pad))
    patches1 = Patches.apply(pooled_part(padded))
    targets = label_logits.softmax(-1)
    total = targets.sum(-1, keepdim=True)
    for _ in range(steps):
        grads = cnn_gradient(w, patches1, targets, total, pad, n, (side + 2 * pad - 2) // 2 * 2)
        w = [w_n.step(lrs, *grad) if isinstance(w_n, (Factored, Dense))
             else w_n - lrs.view(-1, *[1] * (w_n.dim() - 1)) * grad for w_n, grad in zip(w, grads)]
    d1w, d1b, d2w, d2b, df1w, df1b, df2w, df2b = [w_n.delta() if isinstance(w_n, (Factored, Dense)) else w_n - w_0
                                                  for w_n, w_0 in zip(w, start)]
    delta = (d1w.view(clients, c1, 3, 3, channels).permute(0, 1, 4, 2, 3), d1b,
             d2w.view(clients, c2, 3, 3, c1).permute(0, 1, 4, 2, 3), d2b,
             df1w.view(clients, hidden, cells, c2).transpose(2, 3), df1b, df2w, df2b)
    return torch.cat([d.reshape(clients, -1) for d in delta], 1)


def cnn_gradient(w, patches1, targets, total, pad, n, side1):
    """grad f(K, w) for every client's weights ``w`` in ``cnn_simulated_updates``'s layout, by hand; ``side1``
    is conv1's output side that pooling reads (even). The fully connected layers' weight gradients are returned
    as their factors (the layer's output gradient, its input), as ``Factored.step`` takes them."""
    (c1w, c1b, c2w, c2b, fc1, f1b, fc2, f2b), clients = w, len(patches1)
    c1, c2 = c1w.shape[1], c2w.shape[1]
    pooled1, where1 = pool(torch.baddbmm(c1b.unsqueeze(1), patches1, c1w.transpose(1, 2)), n, side1)
    a1 = pooled1.relu().permute(0, 2, 3, 1).reshape(clients, n, side1 // 2, side1 // 2, c1)
    padded = F.pad(a1, (0, 0, pad, pad, pad, pad))
    used = pooled_part(padded)
    patches2 = Patches.apply(used)
    side2 = used.shape[2] - 2  # conv2's output side that pooling reads
    link2 = {}
    pooled2, where2 = pool(Conv.apply(patches2, c2w, c2b, link2), n, side2)
    a2 = pooled2.relu().permute(0, 2, 3, 1).reshape(clients, n, -1)
    h = (fc1.forward(a2) + f1b.unsqueeze(1)).relu()
    logits = fc2.forward(h) + f2b.unsqueeze(1)
    # soft_cross_entropy's gradient: log_softmax's backward of -targets / (n * classes)
    d_logits = (logits.softmax(-1) * total - targets) / targets[0].numel()
    d_h = fc2.backward(d_logits) * (h > 0)
    d_a2 = fc1.backward(d_h) * (a2 > 0)
    d_z2 = unpool(d_a2.view(pooled2.shape[0], *pooled2.shape[2:], c2).permute(0, 3, 1, 2), where2, side2, clients)
    dropped = padded.shape[2] - used.shape[2]
    d_padded = F.pad(Col2im.apply(d_z2 @ c2w, used.shape), (0, 0, 0, dropped, 0, dropped))
    d_a1 = d_padded[:, :, pad:pad + side1 // 2, pad:pad + side1 // 2]
    d_a1 = d_a1.permute(0, 1, 4, 2, 3).reshape(pooled1.shape) * (pooled1 > 0)
    d_z1 = unpool(d_a1, where1, side1, clients)
    return (d_z1.transpose(1, 2) @ patches1, d_z1.sum(1), ConvWeightGradient.apply(d_z2, patches2, link2), d_z2.sum(1),
            (d_h, a2), d_h.sum(1), (d_logits, h), d_logits.sum(1))


def reconstruction_error(reconstructed, g, eps=1e-9):
    """e = ||reconstructed - g||^2 / ||g||^2 (Alg. 2 lines 11 and 20) per row, with the official 1e-9 guards."""
    return ((reconstructed - g).pow(2).sum(-1) + eps) / (g.pow(2).sum(-1) + eps)


def clients_per_batch(model, device):
    """How many clients one batched evaluation (``cnn_simulated_updates``, or vmapped) holds at most. A GPU takes a
    whole round at once (not measured). On a CPU, ``fl.CNN``'s hand-written path holds 32 clients: larger batches
    gain little (one thread, client outer iterations/s at 1 / 2 / 4 / 12 clients a batch: CIFAR 13.9 / 15.8 /
    16.3 / 16.8; FashionMNIST at 2 / 7 / 14: 32.8 / 33.2 / 33.4), and 32 CIFAR clients hold about 2 GB. The vmapped
    path holds at most 2M parameters: batching pays while the layers are small and loses once the arithmetic
    dominates (measured with ``python bench.py``)."""
    if torch.device(device).type != "cpu":
        return 1_000_000
    return 32 if type(model) is fl.CNN else max(1, 2_000_000 // sum(p.numel() for p in model.parameters()))


def core_batches(clients, most, cores):
    """``clients`` in one batch where they fit in one, which torch's threads then share; else in batches of at most
    ``most``, as even as can be, their number a multiple of ``cores``, so that every core gets a batch and none
    waits on a larger one. One batch on 2 threads against a batch per core (client outer iterations/s, 1024^2
    matmul at 366 GFLOP/s): FashionMNIST CNN, 10 / 25 clients, 63.6 / 60.0 against 58.2 / 58.5; CIFAR 31.3 / 29.1
    against 27.2 / 28.0; digits 306 / 332 against 195 / 298."""
    count = -(-len(clients) // most)
    if count == 1:
        return (clients,)
    return clients.tensor_split(min(len(clients), -(-count // cores) * cores))


def outer_gradient(model, w_global, params, updates, clients, caps, m, hp):
    """One outer evaluation of Algorithm 2 (lines 5-11) for ``clients``: their errors e (on the CPU), which of
    them go on (finite, e >= gamma, cap not spent) and the gradient of e with respect to their K_i and alpha_i
    (None if none goes on). The rows of ``params`` are only read, so batches of clients can run at once."""
    own = [p[clients].detach().requires_grad_(True) for p in params]
    e = reconstruction_error(simulated_updates(model, w_global, *own, hp.inner_steps), updates[clients])
    e_now = e.detach().cpu()
    go_on = torch.isfinite(e_now) & (e_now >= hp.gamma) & (m < caps[clients])
    # Clients are independent: each K_i gets only its own gradient.
    grads = torch.autograd.grad(e[go_on.to(e.device)].sum(), own) if go_on.any() else None
    return e_now, go_on, grads


def reconstruct(model, w_global, updates, knowledge, caps, hp):
    """Algorithm 2 with dynamic optimisation (sec. 4.4), for all of a round's clients in parallel (Alg. 1 line 7).

    updates: [n, d] the g_i^t; knowledge: the stacked K_i^{t-1}; caps: [n] the most outer updates per client.
    Each client's outer loop takes SGD steps (momentum 0.5) on its own K_i and alpha_i against its own loss
    L_m = e(w_hat_N - w_hat_0, g_i) through the N unrolled inner steps, and stops as soon as e < gamma or its
    cap is spent; clients that have stopped leave the batch. An error that overflows stops its client, which keeps
    its last finite error (inf if none). The clients still running are evaluated in one batch where they fit in
    ``clients_per_batch``, else in even batches, one per core at a time (``core_batches``, ``fl.on_cores``); they
    are independent, so the batching changes the speed only. Returns (e [n], stacked K_i^t, iterations [n]),
    iterations counting evaluations of the unrolled training: the outer iterations of Table 9's AOI (an early stop
    at the first check counts 1, as in the official code).
    """
    params = [t.clone() for t in (knowledge.images, knowledge.label_logits, knowledge.alpha)]
    velocity = [torch.zeros_like(p) for p in params]
    lrs = (hp.lr_images, hp.lr_labels, hp.lr_alpha)
    n, most, cores = len(updates), clients_per_batch(model, updates.device), fl.cores(updates.device)
    errors, iterations = torch.full((n,), float("inf")), torch.zeros(n, dtype=torch.long)
    active = torch.arange(n)
    for m in range(int(caps.max()) + 1):
        fl.show_progress(lambda: f"reconstructing {len(active)} of {n} updates: outer iteration {m + 1}, at most "
                                 f"{int(caps[active].max()) + 1}")
        batches = core_batches(active, most, cores)
        evaluated = fl.on_cores(lambda model_, clients: outer_gradient(model_, w_global, params, updates, clients,
                                                                       caps, m, hp), batches, model)
        stepping = []
        for clients, (e_now, go_on, grads) in zip(batches, evaluated):
            finite = torch.isfinite(e_now)  # a zero update's huge error can blow the outer step up: stop there
            errors[clients[finite]], iterations[clients] = e_now[finite], m + 1
            if grads is None:
                continue
            step = clients[go_on]
            for p, v, grad, lr in zip(params, velocity, grads, lrs):
                v[step] = hp.momentum * v[step] + grad[go_on.to(grad.device)]
                p[step] -= lr * v[step]
            stepping.append(step)
        if not stepping:
            break
        active = torch.cat(stepping)
    fl.end_progress()
    return errors, Knowledge(*params), iterations


def shared_rows(updates, starts, caps):
    """For each row of ``updates``, the first row whose reconstruction is the same computation: an equal update
    (torch.equal; +0 and -0 count as equal, and g enters e only through differences and squares, which do not
    tell them apart), the same starting K (the same object, or equal images, label logits and alpha) and the
    same cap. A row that shares with none is its own first row."""
    _, kind = torch.unique(updates, dim=0, return_inverse=True)
    kind, caps = kind.tolist(), caps.tolist()
    first = []
    for i in range(len(kind)):
        first.append(next((j for j in dict.fromkeys(first)
                           if kind[j] == kind[i] and caps[j] == caps[i] and starts[j].equal(starts[i])), i))
    return first


class FedREDefense:
    """Algorithm 1: reconstruct every participant's update, drop and expel those with e_i^t > gamma, aggregate the rest.

    The server keeps K_i for every client across rounds (sec. 4.4, "maintaining local knowledge"); a client's
    first reconstruction starts from K^0 under the first-participation cap. The accepted updates are aggregated by
    their unweighted mean, as in the official code, or by ``aggregate`` (a defense, e.g. Norm bound: sec. 6.1,
    "FedREDefense, as a detection method, can apply any aggregation rule after filtering", Table 3).
    """
    expels = True  # run.py expels the flagged clients, and a client whose update was not finite as well

    def __init__(self, model, sample_shape, num_classes, hp, generator, device, aggregate=None):
        self.model, self.hp, self.aggregate = model, hp, aggregate
        self.initial = initial_knowledge(sample_shape, num_classes, hp, generator, device)
        self.knowledge = {}  # client id -> K_i

    def test(self, updates, clients, w_global, knowledge):
        """Alg. 1's test for ``clients``: reconstruct each update from its K in ``knowledge`` (client -> K) and
        flag e > gamma (strict, as the official code; NaN would count too). Changes no state.

        Rows that are equal, start from the same K and have the same cap (``shared_rows``: the copies of one
        vector that Min-Max, Min-Sum, LIE and MPAF attackers send, each new, from K^0) are reconstructed once and
        the result (error, learned K, iterations) is handed to each of them. Clients are independent in
        ``reconstruct``, so this changes the work only (and the rounding, where it leaves one row, which then
        runs without vmap).
        Returns (flagged, errors, the learned K stacked, iterations)."""
        caps = torch.tensor([self.hp.max_iters if c in knowledge else self.hp.first_iters for c in clients])
        starts = [knowledge.get(c, self.initial) for c in clients]
        first = shared_rows(updates, starts, caps)
        once = sorted(set(first))
        errors, learned, iterations = reconstruct(self.model, w_global, updates[once],
                                                  Knowledge.stack([starts[i] for i in once]), caps[once], self.hp)
        row = torch.tensor([once.index(i) for i in first])  # each row's place among the computed ones
        learned = Knowledge(*(t[row.to(t.device)] for t in learned.tensors()))
        return ~(errors[row] <= self.hp.gamma), errors[row], learned, iterations[row]

    def __call__(self, updates, rnd):
        flagged, errors, learned, iterations = self.test(updates, rnd.clients, rnd.w_global, self.knowledge)
        self.knowledge.update(zip(rnd.clients, learned.unstack()))
        accepted = ~flagged
        kept = updates[accepted.to(updates.device)]
        if self.aggregate is None:
            update = fl.fedavg(kept)
        else:
            update = self.aggregate(kept, fl.subset_round(rnd, accepted)).update
        return fl.Decision(update=update, accepted=accepted, expel=flagged, errors=errors, iterations=iterations)

    def attacker_test(self, clients, rnd):
        """``passes(trials)`` for the adaptive attackers ``clients`` (Algorithm 3), who know FedREDefense entirely:
        this defense's own ``test`` of the trial updates (a row per attacker, one batched reconstruction), each
        from the attacker's copy of its K (K^0 for a new client), under the server's cap; a bool per row. The
        server's K are never touched. Clients are independent in ``reconstruct``, so an attacker's verdict does
        not depend on the other attackers' trials; it is computed with the vmapped arithmetic of the server's own
        test of the round (a trial tested alone runs without vmap, which rounds differently).

        Every trial starts from that copy, as Algorithm 3 line 6 has it (each Reconstruction takes K_i^{t-1}; the
        K_i^t it returns is the last trial's), so ``passes`` is the verdict the server will reach on the update.
        A variant that threads K from trial to trial (not Algorithm 3) lets the attacker test against a K refined
        by up to four caps' worth of iterations the server does not have: on digits (round 1, targeted label
        flip) 6 of the 7 attackers then passed their own test at lambda = 4.875, and the server flagged all 7.
        """
        copy = {c: self.knowledge[c] for c in clients if c in self.knowledge}
        return lambda trials: ~self.test(trials, clients, rnd.w_global, copy)[0]
