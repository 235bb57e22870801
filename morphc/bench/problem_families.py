"""How each benchmark problem family makes its data and its model from a seed, and scores them.

Small, generated or shipped with scikit-learn, never downloaded. The problems built from these
(budgets, targets, optimizers) are in :mod:`morphc.bench.problems`; each family's docstrings say
why its data and initialisation are the way they are.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphc import zoo


class Data(NamedTuple):
    """float32 tensors; classification targets are int64 class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# --- metrics --------------------------------------------------------------------------------


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def test_mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    return "test_mse", F.mse_loss(_predict(model, x), y).item()


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    return "test_accuracy", (_predict(model, x).argmax(dim=1) == y).float().mean().item()


# --- teacher–student on a symmetric saddle ---------------------------------------------------

def teacher_student_data(seed: int) -> Data:
    """The symmetric-saddle problem's data (``morphc.zoo.teacher_student_data``)."""
    return Data(*zoo.teacher_student_data(seed))


# --- deep linear network ---------------------------------------------------------------------

DL_WIDTH, DL_DEPTH, DL_N, DL_INIT_STD = 8, 6, 256, 0.1


def deep_linear_data(seed: int) -> Data:
    """y = M x for a random M with unit-variance outputs; no noise."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(DL_WIDTH, DL_WIDTH, generator=g) / DL_WIDTH**0.5
    x = torch.randn(2 * DL_N, DL_WIDTH, generator=g)
    y = x @ m.T
    return Data(x[:DL_N], y[:DL_N], x[DL_N:], y[DL_N:])


def deep_linear_model(seed: int) -> nn.Module:
    """Six bias-free 8×8 linear layers, N(0, 0.1²) weights: the output starts ~1e-3 of the target.

    Adam then learns the target's singular values one at a time, with a plateau (a saddle) before
    each: the loss is a staircase 0.65 → 0.37 → 0.19 → 0.10 → 0.05 …
    """
    g = torch.Generator().manual_seed(seed + 10_000)
    layers = [nn.Linear(DL_WIDTH, DL_WIDTH, bias=False) for _ in range(DL_DEPTH)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(DL_INIT_STD * torch.randn(DL_WIDTH, DL_WIDTH, generator=g))
    return nn.Sequential(*layers)


# --- scikit-learn data -----------------------------------------------------------------------


@functools.cache
def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loaded = {"digits": datasets.load_digits, "diabetes": datasets.load_diabetes}[name]()
    return loaded.data, loaded.target


def _split_standardise(name: str, seed: int, standardise_y: bool) -> tuple[np.ndarray, ...]:
    """A seeded 75/25 split; inputs (and optionally targets) standardised with train stats."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = _sklearn_arrays(name)
    stratify = y if name == "digits" else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed,
                                              stratify=stratify)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    if standardise_y:
        mean, std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
    return x_tr, x_te, y_tr, y_te


def digits_data(seed: int, images: bool = False) -> Data:
    x_tr, x_te, y_tr, y_te = _split_standardise("digits", seed, standardise_y=False)
    shape = (-1, 1, 8, 8) if images else (-1, 64)
    return Data(torch.tensor(x_tr, dtype=torch.float32).reshape(shape),
                torch.tensor(y_tr, dtype=torch.int64),
                torch.tensor(x_te, dtype=torch.float32).reshape(shape),
                torch.tensor(y_te, dtype=torch.int64))


def diabetes_data(seed: int) -> Data:
    """Targets standardised with training statistics: test MSE is in units of target variance."""
    x_tr, x_te, y_tr, y_te = _split_standardise("diabetes", seed, standardise_y=True)
    as_col = functools.partial(torch.tensor, dtype=torch.float32)
    return Data(as_col(x_tr), as_col(y_tr).unsqueeze(1), as_col(x_te), as_col(y_te).unsqueeze(1))


def digits_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def diabetes_mlp(seed: int) -> nn.Module:
    """Small on purpose: 331 training rows; a 32-32 MLP reaches train MSE 1e-3 and test MSE 1.5."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))


# --- XOR with a 2-2-1 sigmoid network ---------------------------------------------------------

XOR_X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
XOR_SUCCESS = 0.01
# Why 0.01: a final MSE below 0.01 means every output is within 0.2 of its target (all four
# patterns right with margin), while every local minimum of this net sits at 0.125 or above
# (two patterns collapsed onto one hidden code, sigmoids saturated); solved runs reach ~2e-4.
# The threshold lies an order of magnitude from both, so no run is near it.


def xor_data(seed: int) -> Data:
    del seed
    return Data(XOR_X, XOR_Y, XOR_X, XOR_Y)


def xor_model(seed: int) -> nn.Module:
    """2-2-1, sigmoid hidden and output, torch's default init from the seed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1), nn.Sigmoid())


def xor_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    return "test_accuracy", ((_predict(model, x) > 0.5).float() == y).float().mean().item()


# --- an under-parameterised teacher–student ----------------------------------------------------

NARROW_IN, NARROW_TEACHER, NARROW_STUDENT, NARROW_N = 8, 8, 4, 256


class ClipReLU(nn.Module):
    """min(max(t, 0), 1): the teacher's and the student's hidden activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def narrow_data(seed: int) -> Data:
    """A clipped-ReLU teacher of width 8 (random weights), targets at unit variance."""
    g = torch.Generator().manual_seed(seed)
    w = 2.0 * torch.randn(NARROW_TEACHER, NARROW_IN, generator=g) / NARROW_IN**0.5
    b = 0.5 * torch.randn(NARROW_TEACHER, generator=g)
    v = torch.randn(1, NARROW_TEACHER, generator=g)
    x = torch.randn(2 * NARROW_N, NARROW_IN, generator=g)
    y = (x @ w.T + b).clamp(0.0, 1.0) @ v.T
    y = (y - y[:NARROW_N].mean()) / y[:NARROW_N].std()
    return Data(x[:NARROW_N], y[:NARROW_N], x[NARROW_N:], y[NARROW_N:])


def narrow_student(seed: int, init_seed: int | None = None) -> nn.Module:
    """Half the teacher's width: it cannot fit the teacher, and plain SGD often stops short of
    what this width can reach."""
    torch.manual_seed(seed + 777 if init_seed is None else init_seed)
    return nn.Sequential(nn.Linear(NARROW_IN, NARROW_STUDENT), ClipReLU(),
                         nn.Linear(NARROW_STUDENT, 1))


# --- an exactly stationary point: a poor local minimum only a non-linear branch leaves --------

STAT_WIDTH = 4
STAT_POINTS = {0.25: (8, 1.0), 0.75: (8, -1.0), 2.0: (16, 0.0)}   # |x|: (count per sign, y)


def stationary_data(seed: int) -> Data:
    """1-D inputs ±¼, ±¾, ±2 with targets +1, −1, 0 (64 points). Every value is dyadic, so every
    sum in the gradient is exact in float32 and the stationary point is exact, not approximate."""
    del seed
    xs, ys = [], []
    for magnitude, (count, target) in STAT_POINTS.items():
        for sign in (1.0, -1.0):
            xs += [sign * magnitude] * count
            ys += [target] * count
    x, y = torch.tensor(xs).unsqueeze(1), torch.tensor(ys).unsqueeze(1)
    return Data(x, y, x.clone(), y.clone())


def stationary_model(seed: int) -> nn.Module:
    """1→4→1 with Hardtanh, at an exactly stationary point that is a (poor) local minimum.

    Every hidden unit is u(x) = hardtanh(x) (weights 1, biases 0), the output weights and bias
    are 0, so the network outputs 0 and δ = ∂L/∂out = −2y/n. Then ∂L/∂b₂ = Σδ = 0 (the targets
    sum to zero), ∂L/∂W₂ = Σδ·u = 0 (y is even in x, u odd), and the first layer gets no gradient
    because W₂ = 0: the gradient is exactly zero. Second order: the W₂–W₁ and W₂–b₁ blocks are
    Σδ·u'·x = 0 and Σδ·u' = −(2/n)(16·1 − 16·1) = 0, so no noise-sized move lowers the loss (the
    units are linear on |x| < 1 and saturated at |x| = 2). The width-4 net can fit the targets
    (a bump made of shifted hardtanh units), so the minimum is poor.

    A *linear* branch B·(p(Ah + a) + q) at the output site gets ∂L/∂B = Σδ·(pA·1·u + c) = 0 (a
    reparameterisation of W₂, b₂; at the first site its gradient is multiplied by W₂ = 0). A
    tanh branch gets Σδ·tanh(α·u + a) ∝ g(α/4) − g(3α/4) ≠ 0, g(β) = tanh(a+β) + tanh(a−β):
    u takes four values, and tanh of them is not affine in u.
    """
    del seed
    model = nn.Sequential(nn.Linear(1, STAT_WIDTH), nn.Hardtanh(), nn.Linear(STAT_WIDTH, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.zero_()
        model[2].bias.zero_()
    return model
