"""fl.py: model sizes, update vectors, local training, FedAvg and the metrics, against hand-computed cases."""
import pytest
import torch
import torch.nn.functional as F

import bench
import fl


@pytest.mark.parametrize("channels, side, n_params", [
    (1, 28, 30 * 9 + 30 + 50 * 30 * 9 + 50 + 50 * 5 * 5 * 100 + 100 + 100 * 10 + 10),   # Table 5, valid convs
    (3, 32, 32 * 27 + 32 + 64 * 32 * 9 + 64 + 64 * 6 * 6 * 512 + 512 + 512 * 10 + 10),  # Table 6, valid convs
    (1, 8, 30 * 9 + 30 + 50 * 30 * 9 + 50 + 50 * 2 * 2 * 100 + 100 + 100 * 10 + 10),    # digits, padding 1
])
def test_cnn_matches_tables_5_and_6(channels, side, n_params):
    model = fl.CNN(channels, side)
    assert sum(fl.param_sizes(model)) == n_params
    assert model(torch.zeros(2, channels, side, side)).shape == (2, 10)


def test_flat_parameters_round_trip_without_aliasing():
    model = fl.CNN(1, 8)
    w = torch.randn(sum(fl.param_sizes(model)))
    fl.load_params(model, w)
    assert torch.equal(fl.flatten_params(model), w)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(fl.flatten_params(model), w), "the model must not be a view of w"


def test_functional_forward_equals_module_forward():
    model, x = fl.CNN(1, 8), torch.randn(4, 1, 8, 8)
    assert torch.allclose(fl.functional_forward(model, fl.flatten_params(model), x), model(x))


def test_local_update_is_seeded_and_leaves_the_global_model_alone():
    torch.manual_seed(0)
    model, x, y = fl.CNN(1, 8), torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    w = fl.flatten_params(model)
    w_copy = w.clone()
    g1 = fl.local_update(model, w, x, y, 0.1, torch.Generator().manual_seed(3))
    g2 = fl.local_update(model, w, x, y, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(w, w_copy)
    assert torch.equal(g1, g2) and g1.norm() > 0
    assert fl.local_steps(40) == 2 and fl.local_steps(64) == 2 and fl.local_steps(65) == 3


def test_fedavg_plain_weighted_and_empty():
    u = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert torch.equal(fl.fedavg(u), torch.tensor([2.0, 2.0]))
    assert torch.allclose(fl.fedavg(u, torch.tensor([3, 1])), torch.tensor([1.5, 1.0]))
    assert torch.equal(fl.fedavg(u[:0]), torch.zeros(2))


def test_finite_rows():
    u = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [0.0, float("inf")], [0.0, 0.0]])
    assert fl.finite_rows(u).tolist() == [True, False, False, True]


def test_detection_metrics_hand_computed():
    # 6 clients, 2 malicious (4, 5). Flagged: 1 (false positive) and 4 (true positive); 5 slips through.
    flagged = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    malicious = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
    m = fl.detection_metrics(flagged, malicious)
    assert m == {"dacc": 4 / 6, "fpr": 1 / 4, "fnr": 1 / 2}
    assert m["dacc"] == pytest.approx(1 - (1 + 1) / 6)  # DACC = 1 - (FP + FN) / n
    perfect = fl.detection_metrics(malicious, malicious)
    assert perfect == {"dacc": 1.0, "fpr": 0.0, "fnr": 0.0}
    assert fl.detection_metrics(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))["fnr"] is None


def test_malicious_rate_is_the_share_of_accepted_updates_that_are_malicious():
    malicious = torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)
    assert fl.malicious_rate(torch.ones(5, dtype=torch.bool), malicious) == 2 / 5  # accept-all: MR = q / n
    assert fl.malicious_rate(~malicious, malicious) == 0.0
    assert fl.malicious_rate(torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool), malicious) == 1 / 2
    assert fl.malicious_rate(torch.zeros(5, dtype=torch.bool), malicious) == 0.0


def test_asr_ignores_target_class_images():
    class Constant(torch.nn.Module):  # predicts class 0 for triggered images (x > 0), class 1 otherwise
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            hit = (x.flatten(1).amax(1) > 0).float()
            return torch.stack([hit, 1 - hit], 1) + self.b

    model = Constant()
    w = fl.flatten_params(model)
    x = -torch.ones(6, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    trigger = lambda imgs: torch.where(torch.arange(len(imgs))[:, None, None, None] % 2 == 0, -imgs, imgs)
    # non-target images are 2..5; the trigger lands on 2 and 4 only: ASR = 2 / 4, whatever class-0 images do
    assert fl.attack_success_rate(model, w, x, y, trigger, target=0) == 0.5


@pytest.mark.parametrize("channels, side", [(1, 28), (1, 8)])
def test_the_cnn_pooling_before_relu_is_table_5s_function_and_gradient(channels, side):
    """max_pool(ReLU(x)) (Table 5's order) and ReLU(max_pool(x)) agree in output and in every gradient."""
    fast, textbook = fl.CNN(channels, side), bench.TextbookCNN(channels, side)
    textbook.load_state_dict(fast.state_dict())
    x = torch.randn(6, channels, side, side, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    for model in (fast, textbook):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(fast(x), textbook(x))
    for a, b in zip(fast.parameters(), textbook.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_clients_trained_on_cores_in_channels_last_equal_the_plain_nchw_loop(monkeypatch):
    """run.py's local training (two worker threads, channels-last, fl.sgd_epoch) gives every client the update of
    the obvious code: the Table 5 CNN in NCHW, torch.optim.SGD, one client after another (1e-5 relative)."""
    monkeypatch.setattr(fl, "cores", lambda device: 2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 70, 1, 28, 28, generator=gen), torch.randint(0, 10, (5, 70), generator=gen)
    plain_model = bench.TextbookCNN(1, 28)
    w = fl.flatten_params(plain_model)
    plain = []
    for c in range(5):
        fl.load_params(plain_model, w)
        optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.05)
        for batch in torch.randperm(70, generator=torch.Generator().manual_seed(c)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(plain_model(x[c][batch]), y[c][batch]).backward()
            optimizer.step()
        plain.append(fl.flatten_params(plain_model) - w)
    model, x_fast = fl.in_fast_format(fl.CNN(1, 28), x.flatten(0, 1))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x_fast = x_fast.view(5, 70, 1, 28, 28)
    fast = fl.on_cores(lambda m, c: fl.local_update(m, w, x_fast[c], y[c], 0.05, torch.Generator().manual_seed(c)),
                       list(range(5)), model)
    for f, p in zip(fast, plain):
        assert (f - p).norm() <= 1e-5 * p.norm()


def test_predictions_on_cores_in_channels_last_equal_the_plain_nchw_model(monkeypatch):
    monkeypatch.setattr(fl, "cores", lambda device: 2)
    textbook = bench.TextbookCNN(1, 28)
    w = fl.flatten_params(textbook)
    x = torch.randn(700, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = textbook(x).argmax(1)
    model, x_fast = fl.in_fast_format(fl.CNN(1, 28), x)
    assert torch.equal(fl.predict(model, w, x_fast, batch_size=64), plain)


def authors_convnet_layers(channels, side):
    """(name, shape) of every parameter of the FedREDefense authors' ConvNet (codes/models.py:ConvNet with its
    defaults: width 128, depth 3, instancenorm = GroupNorm(128, 128, affine), relu, avgpooling), written from
    their definition: nn.Sequential of [conv, norm, relu, pool] x 3 as ``features``, then ``classifier``; the first
    conv pads 1-channel images by 3, the others by 1. Their classifier reads 128 x 4 x 4 features (28 -> 32 px);
    on 8x8 digits, 128 x 1 x 1."""
    final = {28: 4, 32: 4, 8: 1}[side]
    layers = []
    for block, c_in in enumerate((channels, 128, 128)):
        conv, norm = 4 * block, 4 * block + 1
        layers += [(f"features.{conv}.weight", (128, c_in, 3, 3)), (f"features.{conv}.bias", (128,)),
                   (f"features.{norm}.weight", (128,)), (f"features.{norm}.bias", (128,))]
    return layers + [("classifier.weight", (10, 128 * final * final)), ("classifier.bias", (10,))]


@pytest.mark.parametrize("channels, side, n_params", [(1, 28, 317_706), (3, 32, 320_010), (1, 8, 298_506)])
def test_convnet_is_the_authors_convnet_128(channels, side, n_params):
    model = fl.ConvNet(channels, side)
    assert [(name, tuple(p.shape)) for name, p in model.named_parameters()] == authors_convnet_layers(channels, side)
    assert sum(fl.param_sizes(model)) == n_params  # 317,706 and 320,010: the authors' FashionMNIST and CIFAR model
    assert list(model.buffers()) == [], "the flat vector w must hold the whole model"


def authors_convnet_forward(w, x):
    """The authors' ConvNet forward from its parameters ``w`` (a name -> tensor dict), written with torch's
    functional ops: conv (padding 3 on a 1-channel input's first, else 1), instance norm with affine parameters,
    ReLU, 2x2 average pooling, three times; then the classifier."""
    first_pad = 3 if x.shape[1] == 1 else 1
    for block in range(3):
        conv, norm = 4 * block, 4 * block + 1
        x = F.conv2d(x, w[f"features.{conv}.weight"], w[f"features.{conv}.bias"],
                     padding=first_pad if block == 0 else 1)
        x = F.instance_norm(x, weight=w[f"features.{norm}.weight"], bias=w[f"features.{norm}.bias"], eps=1e-5)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), w["classifier.weight"], w["classifier.bias"])


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32), (1, 8)])
def test_convnet_computes_the_authors_function_in_either_memory_format(channels, side):
    torch.manual_seed(0)
    model = fl.ConvNet(channels, side)
    with torch.no_grad():  # affine parameters away from PyTorch's initial 1 and 0, so that they count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))
    x = torch.randn(3, channels, side, side)
    expected = authors_convnet_forward(dict(model.named_parameters()), x)
    assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    fast, x_fast = fl.in_fast_format(model, x)
    assert fl.channels_last(fast) and fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(x_fast), expected, rtol=1e-4, atol=1e-5)
