"""The problems of ``python -m morphc.bench.unseen``: what a user would try first.

Each takes a seed and returns a :class:`Case` — a textbook network with PyTorch's default init
drawn from that seed, a stock optimizer (and schedule), the data (shipped with scikit-learn or
generated) and a step budget. None of them chose a Bypass default; the last five were added
after the first 16 were published, to test those claims on plateaus of other kinds, and the
two after them (minibatch spirals, a digits autoencoder) after an outside-in probe found them;
the last two (a Huber loss under Nesterov SGD, a per-batch warmup-then-decay schedule) come
from a second outside-in round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_moons
from torch import nn

Tensors = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Case:
    """One training run's ingredients, made from a seed."""

    model: nn.Module
    optimizer: Callable[..., torch.optim.Optimizer]
    train: Tensors                                   # the whole training set
    loss_fn: Callable
    steps: int
    test: Tensors | None = None
    batch: int | None = None                         # minibatch size (None: full batch)
    schedule: Callable | None = None                 # optimizer -> lr scheduler


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-8)


def _split(x, y, seed: int, train: float = 0.7):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    n = int(train * len(x))
    return (x[order[:n]], y[order[:n]]), (x[order[n:]], y[order[n:]])


def _model(seed: int, layers: Callable[[], list[nn.Module]]) -> nn.Module:
    """PyTorch's default init drawn from ``seed``; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(*layers())


def _sgd(lr: float, momentum: float = 0.9):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def _adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


_XOR = (torch.tensor([[0.0, 0], [0, 1], [1, 0], [1, 1]]), torch.tensor([[0.0], [1], [1], [0]]))


def xor_tanh(seed: int) -> Case:
    """XOR, 2-2-1 tanh, BCE on logits, momentum SGD: collapses to ln 2 / 2 on some inits."""
    model = _model(seed, lambda: [nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)])
    return Case(model, _sgd(0.1), _XOR, F.binary_cross_entropy_with_logits, 2000)


def xor_adam(seed: int) -> Case:
    """XOR, 2-2-1 sigmoid, MSE, Adam."""
    model = _model(seed, lambda: [nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1), nn.Sigmoid()])
    return Case(model, _adam(0.01), _XOR, F.mse_loss, 3000)


def parity3(seed: int) -> Case:
    """3-bit parity, 3-3-1 sigmoid, MSE, momentum SGD."""
    x = torch.tensor([[a, b, c] for a in (0.0, 1) for b in (0.0, 1) for c in (0.0, 1)])
    model = _model(seed, lambda: [nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()])
    return Case(model, _sgd(0.5), (x, x.sum(1, keepdim=True) % 2), F.mse_loss, 3000)


def encoder_838(seed: int) -> Case:
    """The 8-3-8 encoder: one-hot in, its class out, through 3 sigmoid units."""
    model = _model(seed, lambda: [nn.Linear(8, 3), nn.Sigmoid(), nn.Linear(3, 8)])
    return Case(model, _sgd(0.5), (torch.eye(8), torch.arange(8)), F.cross_entropy, 3000)


def _spiral(seed: int, n: int = 300) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * math.pi)
    x = torch.stack([r * torch.cos(t + math.pi * label), r * torch.sin(t + math.pi * label)], 1)
    return x + 0.02 * torch.randn(n, 2, generator=g), label


def spiral(seed: int) -> Case:
    """Two spirals, 2-16-16-2 tanh, Adam."""
    model = _model(seed, lambda: [nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                  nn.Linear(16, 2)])
    return Case(model, _adam(1e-2), _spiral(seed), F.cross_entropy, 2000,
                test=_spiral(seed + 500))


def cancer_minibatch(seed: int) -> Case:
    """load_breast_cancer, 30-16-1 ReLU, Adam, minibatches of 64."""
    data = load_breast_cancer()
    x = _standardise(torch.tensor(data.data, dtype=torch.float32))
    train, test = _split(x, torch.tensor(data.target, dtype=torch.float32)[:, None], seed)
    model = _model(seed, lambda: [nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1)])
    return Case(model, _adam(1e-3), train, F.binary_cross_entropy_with_logits, 1500,
                test=test, batch=64)


def digits_cosine(seed: int) -> Case:
    """load_digits, 64-32-10 tanh, momentum SGD with a cosine schedule, minibatches of 64."""
    data = load_digits()
    train, test = _split(torch.tensor(data.data, dtype=torch.float32) / 16,
                         torch.tensor(data.target), seed)
    model = _model(seed, lambda: [nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)])
    return Case(model, _sgd(0.1), train, F.cross_entropy, 1500, test=test, batch=64,
                schedule=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500))


def digits_cnn_dropout(seed: int) -> Case:
    """load_digits as images, conv-BN-ReLU-conv-ReLU-dropout-linear, Adam, minibatches."""
    data = load_digits()
    train, test = _split(torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16,
                         torch.tensor(data.target), seed)
    model = _model(seed, lambda: [
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(16 * 4 * 4, 10)])
    return Case(model, _adam(1e-3), train, F.cross_entropy, 800, test=test, batch=64)


def teacher_relu(seed: int) -> Case:
    """A random 10-6-1 ReLU teacher, a 10-3-1 ReLU student, Adam, full batch."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x, x_test = torch.randn(500, 10, generator=g), torch.randn(500, 10, generator=g)
        train, test = (x, teacher(x)), (x_test, teacher(x_test))
    model = _model(seed, lambda: [nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 1)])
    return Case(model, _adam(1e-2), train, F.mse_loss, 3000, test=test)


def wine(seed: int) -> Case:
    """load_wine, 13-4-3 tanh, plain SGD, full batch."""
    data = load_wine()
    train, test = _split(_standardise(torch.tensor(data.data, dtype=torch.float32)),
                         torch.tensor(data.target), seed)
    model = _model(seed, lambda: [nn.Linear(13, 4), nn.Tanh(), nn.Linear(4, 3)])
    return Case(model, _sgd(0.05, momentum=0.0), train, F.cross_entropy, 2000, test=test)


def sine_deep(seed: int) -> Case:
    """sin(2x) by a 1-4-4-4-1 tanh net under momentum SGD: the loss spikes now and then."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(200, 1, generator=g) * 6 - 3
    x_test = torch.linspace(-3, 3, 200)[:, None]
    model = _model(seed, lambda: [nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                                  nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)])
    return Case(model, _sgd(0.05), (x, torch.sin(2 * x)), F.mse_loss, 3000,
                test=(x_test, torch.sin(2 * x_test)))


def step_schedule(seed: int) -> Case:
    """y = x0·x1 + sin x2 by a 5-12-1 tanh net, momentum SGD with StepLR."""
    g = torch.Generator().manual_seed(seed)
    x, x_test = torch.randn(400, 5, generator=g), torch.randn(400, 5, generator=g)

    def target(v):
        return v[:, :1] * v[:, 1:2] + torch.sin(v[:, 2:3])

    model = _model(seed, lambda: [nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 1)])
    return Case(model, _sgd(0.05), (x, target(x)), F.mse_loss, 2000, test=(x_test, target(x_test)),
                schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 700, 0.3))


def moons(seed: int) -> Case:
    """Two moons, 2-3-3-2 tanh, plain SGD, full batch."""
    a, b = make_moons(400, noise=0.1, random_state=seed)
    a_test, b_test = make_moons(400, noise=0.1, random_state=seed + 99)
    model = _model(seed, lambda: [nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(),
                                  nn.Linear(3, 2)])
    return Case(model, _sgd(0.1, momentum=0.0),
                (torch.tensor(a, dtype=torch.float32), torch.tensor(b)), F.cross_entropy, 3000,
                test=(torch.tensor(a_test, dtype=torch.float32), torch.tensor(b_test)))


def linear_autoencoder(seed: int) -> Case:
    """A 12-4-12 linear autoencoder from a small init (a saddle at the origin), momentum SGD."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g) * 0.5
    model = _model(seed, lambda: [nn.Linear(12, 4, bias=False), nn.Linear(4, 12, bias=False)])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.01)
    return Case(model, _sgd(0.01), (x, x), F.mse_loss, 2000)


class _CountEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def count_transformer(seed: int) -> Case:
    """Are there more 3s than 5s among 12 tokens? A 2-layer encoder, AdamW, minibatches."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        tokens = torch.randint(0, 8, (n, 12), generator=g)
        return tokens, ((tokens == 3).sum(1) > (tokens == 5).sum(1)).long()

    train, test = sample(512), sample(256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CountEncoder()
    return Case(model, lambda params: torch.optim.AdamW(params, lr=1e-3), train,
                F.cross_entropy, 600, test=test, batch=64)


def _gaussian_nll(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.gaussian_nll_loss(out[:, :1], target, F.softplus(out[:, 1:]) + 1e-4)


def gaussian_nll(seed: int) -> Case:
    """Mean and variance of sin 3x + noise, 1-16-2 tanh, Adam: a loss that plateaus below 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(300, 1, generator=g) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(300, 1, generator=g)
    model = _model(seed, lambda: [nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2)])
    return Case(model, _adam(1e-2), (x, y), _gaussian_nll, 2000)


# -- a second batch, added after the table above was published: classic plateaus of other kinds --
def deep_sigmoid(seed: int) -> Case:
    """Concentric circles by a 2-(8×6)-1 sigmoid net, momentum SGD: vanishing gradients."""
    from sklearn.datasets import make_circles
    a, b = make_circles(400, noise=0.05, factor=0.5, random_state=seed)
    a_test, b_test = make_circles(400, noise=0.05, factor=0.5, random_state=seed + 99)

    def layers():
        hidden = [m for _ in range(5) for m in (nn.Linear(8, 8), nn.Sigmoid())]
        return [nn.Linear(2, 8), nn.Sigmoid(), *hidden, nn.Linear(8, 1)]

    def as_xy(u, v):
        return torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)[:, None]

    return Case(_model(seed, layers), _sgd(0.5), as_xy(a, b), F.binary_cross_entropy_with_logits,
                3000, test=as_xy(a_test, b_test))


def relu_regression(seed: int) -> Case:
    """|x|·sin 3x by a 1-8-8-8-1 ReLU net, momentum SGD: units die and stay dead."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, generator=g) * 4 - 2
    x_test = torch.linspace(-2, 2, 200)[:, None]

    def target(v):
        return v.abs() * torch.sin(3 * v)

    model = _model(seed, lambda: [nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                  nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)])
    return Case(model, _sgd(0.02), (x, target(x)), F.mse_loss, 3000,
                test=(x_test, target(x_test)))


class _Elman(nn.Module):
    """A tanh RNN unrolled over a fixed length: one Linear cell used at every time step."""

    def __init__(self, length: int = 8, hidden: int = 8) -> None:
        super().__init__()
        self.length = length
        self.inp, self.rec, self.out = nn.Linear(1, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(seq[:, 0]))
        for t in range(1, self.length):
            h = torch.tanh(self.inp(seq[:, t]) + self.rec(h))
        return self.out(h)


def rnn_first_bit(seed: int) -> Case:
    """Recall the sign of the first of 8 noisy inputs: a long-range plateau, Adam."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        seq = torch.randn(n, 8, 1, generator=g)
        return seq, (seq[:, 0] > 0).float()

    train, test = sample(256), sample(256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Elman()
    return Case(model, _adam(3e-3), train, F.binary_cross_entropy_with_logits, 1500, test=test)


def tanh_bottleneck(seed: int) -> Case:
    """A 10-2-10 tanh autoencoder of points on a curved 2-D sheet, momentum SGD."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(300, 2, generator=g) * 2 - 1
    lift = torch.randn(3, 10, generator=g)
    x = torch.cat([u, u[:, :1] * u[:, 1:]], 1) @ lift
    model = _model(seed, lambda: [nn.Linear(10, 2), nn.Tanh(), nn.Linear(2, 10)])
    return Case(model, _sgd(0.05), (x, x), F.mse_loss, 3000)


def circles_onecycle(seed: int) -> Case:
    """Concentric circles, 2-6-1 ReLU, AdamW under OneCycleLR, minibatches of 32."""
    from sklearn.datasets import make_circles
    a, b = make_circles(500, noise=0.1, factor=0.4, random_state=seed)
    x, y = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)[:, None]
    train, test = _split(x, y, seed)
    model = _model(seed, lambda: [nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)])
    return Case(model, lambda params: torch.optim.AdamW(params, lr=1e-3), train,
                F.binary_cross_entropy_with_logits, 1500, test=test, batch=32,
                schedule=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, 1500))


def spiral_minibatch(seed: int) -> Case:
    """Two spirals, 2-10-10-2 tanh, Adam, minibatches of 64: plateaus on the way down."""
    model = _model(seed, lambda: [nn.Linear(2, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                                  nn.Linear(10, 2)])
    return Case(model, _adam(1e-2), _spiral(seed), F.cross_entropy, 3000,
                test=_spiral(seed + 500), batch=64)


def digits_autoencoder(seed: int) -> Case:
    """load_digits through a 64-32-2-32-64 tanh bottleneck, Adam, minibatches of 64."""
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    train, test = _split(x, x, seed)
    model = _model(seed, lambda: [nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 2), nn.Tanh(),
                                  nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 64)])
    return Case(model, _adam(1e-3), train, F.mse_loss, 3000, test=test, batch=64)


# -- a third batch, from a second outside-in round: losses and schedules the others lack --
def huber_nesterov(seed: int) -> Case:
    """sin 2x + 0.3 sin 7x by a 1-4-4-1 tanh net, Huber loss, Nesterov SGD, full batch."""
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.rand(256, 1, generator=g) * 6 - 3
    x_test = torch.linspace(-3, 3, 200)[:, None]

    def target(v):
        return torch.sin(2 * v) + 0.3 * torch.sin(7 * v)

    model = _model(seed, lambda: [nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                                  nn.Linear(4, 1)])
    return Case(model, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9,
                                                      nesterov=True),
                (x, target(x)), F.huber_loss, 2000, test=(x_test, target(x_test)))


def _warmup_then_linear(steps: int, warmup: int):
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, max(0.0, (steps - i) / (steps - warmup))))


def spiral_warmup(seed: int) -> Case:
    """Two spirals, 2-8-8-2 tanh, AdamW with weight decay, a per-batch LambdaLR: 200 steps of
    warmup, then linear decay to 0; minibatches of 32."""
    model = _model(seed, lambda: [nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                  nn.Linear(8, 2)])
    return Case(model, lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-3),
                _spiral(seed), F.cross_entropy, 2500, test=_spiral(seed + 500), batch=32,
                schedule=_warmup_then_linear(2500, 200))


PROBLEMS: dict[str, Callable[[int], Case]] = {f.__name__: f for f in (
    xor_tanh, xor_adam, parity3, encoder_838, spiral, cancer_minibatch, digits_cosine,
    digits_cnn_dropout, teacher_relu, wine, sine_deep, step_schedule, moons, linear_autoencoder,
    count_transformer, gaussian_nll, deep_sigmoid, relu_regression, rnn_first_bit,
    tanh_bottleneck, circles_onecycle, spiral_minibatch, digits_autoencoder,
    huber_nesterov, spiral_warmup)}
