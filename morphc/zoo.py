"""Built-in models: the architectures morphc is tested, demonstrated and benchmarked on.

Each factory takes keyword sizes and returns ``(model, example_inputs)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_features=16, hidden=32, out_features=4, batch=8):
    model = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, out_features))
    return model, (torch.randn(batch, in_features),)


class ConvBN(nn.Module):
    """A small CNN with BatchNorm and bias-free convs (the common pattern)."""

    def __init__(self, channels=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def cnn_bn(channels=8, batch=4, size=12):
    return ConvBN(channels), (torch.randn(batch, 3, size, size),)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block: 1×1 → 3×3 (stride) → 1×1, BatchNorm, projection shortcut."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), width=64, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for stage, count in enumerate(blocks):
            mid = width * 2 ** stage
            for i in range(count):
                layers.append(Bottleneck(cin, mid, mid * 4, stride=2 if i == 0 and stage else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def resnet_small(batch=2, size=16):
    return ResNet(blocks=(1, 1), width=8, classes=10), (torch.randn(batch, 3, size, size),)


def resnet50(batch=1, size=64):
    """ResNet-50-shaped (3-4-6-3 bottlenecks, 25.6 M parameters)."""
    return ResNet(), (torch.randn(batch, 3, size, size),)


def depthwise(channels=8, multiplier=2, batch=2, size=10):
    model = nn.Sequential(
        nn.Conv2d(channels, channels * multiplier, 3, padding=1, groups=channels),
        nn.ReLU(), nn.Conv2d(channels * multiplier, channels, 1))
    return model, (torch.randn(batch, channels, size, size),)


def grouped(batch=2, size=9):
    model = nn.Sequential(
        nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(12, 6, 3, padding=1, groups=3, padding_mode="reflect"))
    return model, (torch.randn(batch, 8, size, size),)


def conv1d(batch=3, length=20):
    model = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2), nn.GELU(),
                          nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular", groups=2))
    return model, (torch.randn(batch, 4, length),)


def conv3d(batch=2, size=6):
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 2, 2), bias=False))
    return model, (torch.randn(batch, 2, size, size, size),)


def transformer(d_model=16, heads=2, layers=2, batch=3, seq=5, dropout=0.0):
    layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=dropout,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), \
        (torch.randn(batch, seq, d_model),)


def transformer12(batch=2, seq=32):
    """A 12-layer, 256-wide encoder (BERT-small-shaped)."""
    return transformer(d_model=256, heads=4, layers=12, batch=batch, seq=seq)


class TiedMLP(nn.Module):
    """Two uses of one square weight (``dec`` reuses ``enc``'s Parameter), plus a matmul site."""

    def __init__(self, width=12):
        super().__init__()
        self.enc = nn.Linear(width, width)
        self.dec = nn.Linear(width, width)
        self.dec.weight = self.enc.weight
        self.proj = nn.Parameter(torch.randn(width, 3) / width ** 0.5)

    def forward(self, x):
        return torch.tanh(self.dec(torch.tanh(self.enc(x)))) @ self.proj


def tied(width=12, batch=5):
    return TiedMLP(width), (torch.randn(batch, width),)


class Functional(nn.Module):
    """Sites written functionally: ``F.linear`` and ``P @ x`` against a parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) / 5 ** 0.5)
        self.b = nn.Parameter(torch.zeros(6))
        self.left = nn.Parameter(torch.randn(4, 6) / 6 ** 0.5)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w, self.b))    # [batch, 6]
        return (self.left @ h.T).T                      # [batch, 4]


def functional(batch=7):
    return Functional(), (torch.randn(batch, 5),)


ZOO = {
    "mlp": mlp, "cnn_bn": cnn_bn, "resnet_small": resnet_small, "depthwise": depthwise,
    "grouped": grouped, "conv1d": conv1d, "conv3d": conv3d, "transformer": transformer,
    "tied": tied, "functional": functional,
}


# -- the symmetric saddle: a teacher–student problem plain optimizers never leave ----------------
TS_IN, TS_TEACHER_HIDDEN, TS_STUDENT_HIDDEN, TS_N = 8, 6, 8, 512
# The student's hidden width (8) and the sample count (a multiple of 16) are chosen so that every
# hidden unit goes through the same BLAS / vectorised kernel path: with a width such as 6, MKL's
# remainder kernel computes the last columns of `x @ W.T` in a different order, the units drift
# apart by ~1e-8 and the "exact" saddle leaks. tests/bench/test_bench_problems.py guards this.


def teacher_student_data(seed: int) -> tuple[torch.Tensor, ...]:
    """A random tanh teacher with orthogonal, saturating units and alternating output signs.

    Targets are normalised to unit variance on the training set. Used by the demo and the
    bench (``teacher_student`` problem), so both train on the same data.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(TS_IN, TS_IN, generator=g))
    w1 = 2.0 * q[:TS_TEACHER_HIDDEN]
    b1 = 0.5 * torch.randn(TS_TEACHER_HIDDEN, generator=g)
    w2 = torch.tensor([(-1.0) ** j for j in range(TS_TEACHER_HIDDEN)]).unsqueeze(0)
    x = torch.randn(2 * TS_N, TS_IN, generator=g)
    y = torch.tanh(x @ w1.T + b1) @ w2.T
    y = y / y[:TS_N].std()
    return x[:TS_N], y[:TS_N], x[TS_N:], y[TS_N:]     # train x, y; test x, y


def symmetric_student(seed: int) -> nn.Module:
    """An 8→8→1 tanh MLP whose hidden units are all identical (the symmetric saddle).

    Every row of the first weight is the same random row, the first biases are equal and the
    second-layer columns are equal, so every hidden unit receives the same gradient and plain
    optimizers never tell them apart.
    """
    g = torch.Generator().manual_seed(seed + 10_000)
    model = nn.Sequential(nn.Linear(TS_IN, TS_STUDENT_HIDDEN), nn.Tanh(),
                          nn.Linear(TS_STUDENT_HIDDEN, 1))
    with torch.no_grad():
        row = torch.randn(TS_IN, generator=g) / TS_IN**0.5
        model[0].weight.copy_(row.expand(TS_STUDENT_HIDDEN, TS_IN))
        model[0].bias.fill_(0.0)
        model[2].weight.fill_(1.0 / TS_STUDENT_HIDDEN)
        model[2].bias.fill_(0.0)
    return model


def hidden_units_identical(model: nn.Module) -> bool:
    """True when the student's hidden units are still bit-for-bit the same unit."""
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    return bool((w1 == w1[0]).all() and (b1 == b1[0]).all() and (w2 == w2[:, :1]).all())
