"""Benchmark problems: small, generated or shipped with scikit-learn, never downloaded.

Each :class:`Problem` says how to make its data and its model from a seed, how to score a
prediction, how long to train, and which loss level counts as "got there" (``target_loss``), so
every method in :mod:`morphc.bench.baselines` runs on it under the same budget.

    >>> from morphc.bench.problems import PROBLEMS
    >>> p = PROBLEMS["teacher_student"]
    >>> data = p.make_data(0)
    >>> model = p.make_model(0)
    >>> p.loss_fn(model(data.x_train), data.y_train).item() > 0
    True

Problems, and what each one probes:

- ``teacher_student``: a student MLP that starts on an exact symmetric saddle (all hidden units
  identical). Plain gradient methods keep the units identical forever, so the student is a
  one-unit network and stalls; any symmetry-breaking move escapes.
- ``deep_linear``: a deep linear network started near the origin, the classic saddle-plateau of
  deep learning (gradients scale with the product of the small layers).
- ``digits_mlp`` / ``digits_cnn``: real data (``load_digits``), minibatch training, test accuracy.
- ``diabetes``: real regression data (``load_diabetes``), full batch, test MSE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Data(NamedTuple):
    """float32 tensors; classification targets are int64 class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


Metric = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[str, float]]


@dataclass(frozen=True)
class Problem:
    """One training problem, fully determined by a seed.

    ``batch_size=None`` means full-batch training (the per-step loss is then the exact training
    loss). ``lr`` is the learning rate for Adam-based methods, ``sgd_lr`` for SGD with momentum.
    ``higher_is_better`` describes the test metric (accuracy: True, MSE: False).
    """

    name: str
    description: str
    make_data: Callable[[int], Data]
    make_model: Callable[[int], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    quick_steps: int
    target_loss: float
    lr: float
    sgd_lr: float
    batch_size: int | None = None
    test_metric: Metric | None = None
    higher_is_better: bool = False

    def info(self) -> dict:
        """The JSON-friendly facts a report needs about this problem."""
        return {
            "name": self.name, "description": self.description, "steps": self.steps,
            "quick_steps": self.quick_steps, "target_loss": self.target_loss, "lr": self.lr,
            "sgd_lr": self.sgd_lr, "batch_size": self.batch_size,
            "higher_is_better": self.higher_is_better,
        }


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

TS_IN, TS_TEACHER_HIDDEN, TS_STUDENT_HIDDEN, TS_N = 8, 6, 8, 512
# The student's hidden width (8) and the sample count (a multiple of 16) are chosen so that every
# hidden unit goes through the same BLAS / vectorised kernel path: with a width such as 6, MKL's
# remainder kernel computes the last columns of `x @ W.T` in a different order, the units drift
# apart by ~1e-8 and the "exact" saddle leaks. tests/test_bench_problems.py guards this.


def teacher_student_data(seed: int) -> Data:
    """A random tanh teacher with orthogonal, saturating units and alternating output signs.

    Targets are normalised to unit variance on the training set.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(TS_IN, TS_IN, generator=g))
    w1 = 2.0 * q[:TS_TEACHER_HIDDEN]
    b1 = 0.5 * torch.randn(TS_TEACHER_HIDDEN, generator=g)
    w2 = torch.tensor([(-1.0) ** j for j in range(TS_TEACHER_HIDDEN)]).unsqueeze(0)
    x = torch.randn(2 * TS_N, TS_IN, generator=g)
    y = torch.tanh(x @ w1.T + b1) @ w2.T
    y = y / y[:TS_N].std()
    return Data(x[:TS_N], y[:TS_N], x[TS_N:], y[TS_N:])


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


# --- the registry ----------------------------------------------------------------------------

PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    Problem(
        name="teacher_student",
        description="8→8→1 tanh student on an exact symmetric saddle, 6-unit tanh teacher",
        make_data=teacher_student_data, make_model=symmetric_student, loss_fn=F.mse_loss,
        steps=2000, quick_steps=300, target_loss=0.02, lr=1e-2, sgd_lr=0.1,
        test_metric=test_mse),
    Problem(
        name="deep_linear",
        description="6-layer width-8 linear net, small init (saddle at the origin)",
        make_data=deep_linear_data, make_model=deep_linear_model, loss_fn=F.mse_loss,
        steps=2000, quick_steps=200, target_loss=0.1, lr=3e-3, sgd_lr=0.05,
        test_metric=test_mse),
    Problem(
        name="digits_mlp",
        description="load_digits, 64→64→10 ReLU MLP, minibatch 128",
        make_data=digits_data, make_model=digits_mlp, loss_fn=F.cross_entropy,
        steps=1000, quick_steps=100, target_loss=0.05, lr=3e-3, sgd_lr=0.05, batch_size=128,
        test_metric=test_accuracy, higher_is_better=True),
    Problem(
        name="digits_cnn",
        description="load_digits as 1×8×8 images, 2-conv CNN with BatchNorm2d, minibatch 128",
        make_data=functools.partial(digits_data, images=True), make_model=digits_cnn,
        loss_fn=F.cross_entropy, steps=800, quick_steps=80, target_loss=0.05, lr=3e-3,
        sgd_lr=0.05, batch_size=128, test_metric=test_accuracy, higher_is_better=True),
    Problem(
        name="diabetes",
        description="load_diabetes, 10→16→1 tanh MLP, full batch, standardised targets",
        make_data=diabetes_data, make_model=diabetes_mlp, loss_fn=F.mse_loss,
        steps=1000, quick_steps=100, target_loss=0.4, lr=1e-3, sgd_lr=0.05,
        test_metric=test_mse),
]}


def get_problems(names=None) -> list[Problem]:
    """Problems by name (all when ``names`` is None); unknown names raise, listing what exists."""
    if names is None:
        return list(PROBLEMS.values())
    unknown = [n for n in names if isinstance(n, str) and n not in PROBLEMS]
    if unknown:
        raise KeyError(f"unknown problem(s) {unknown}; available: {sorted(PROBLEMS)}")
    return [PROBLEMS[n] if isinstance(n, str) else n for n in names]
