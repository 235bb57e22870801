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
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    optimizer: str = "adam"               # "adam" (at lr) or "sgd" (momentum 0.9, at sgd_lr)
    seeds: int | None = None              # full-run seeds when the default (5) is too few
    quick_seeds: int | None = None
    success_loss: float | None = None     # a run "succeeds" when its final loss is below this
    reference: Callable[[int], float] | None = None   # best loss this architecture reaches

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The problem's own optimizer: what "plain training" means on it."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.sgd_lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.lr)

    def info(self) -> dict:
        """The JSON-friendly facts a report needs about this problem."""
        return {
            "name": self.name, "description": self.description, "steps": self.steps,
            "quick_steps": self.quick_steps, "target_loss": self.target_loss, "lr": self.lr,
            "sgd_lr": self.sgd_lr, "batch_size": self.batch_size,
            "higher_is_better": self.higher_is_better, "optimizer": self.optimizer,
            "success_loss": self.success_loss,
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


REFERENCE_RESTARTS, REFERENCE_STEPS = 10, 4000


def width_best_loss(seed: int, restarts: int = REFERENCE_RESTARTS,
                    steps: int = REFERENCE_STEPS) -> float:
    """The best training loss a width-4 student reaches on seed's data: the best of ``restarts``
    random inits, each trained ``steps`` full-batch Adam steps with a cosine decay (lr 1e-2 →
    1e-4). An estimate from above of the width's optimum; cached (see :func:`reference_loss`)."""
    data = narrow_data(seed)
    best = math.inf
    for r in range(restarts):
        model = narrow_student(seed, init_seed=100_000 + 1000 * seed + r)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(data.x_train), data.y_train).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            best = min(best, F.mse_loss(model(data.x_train), data.y_train).item())
    return best


_REFERENCE_FILE = Path(__file__).with_name("reference_losses.json")


def reference_loss(problem: str, seed: int, compute: Callable[[int], float]) -> float:
    """A problem's reference loss for a seed, from ``reference_losses.json`` beside this file
    (shipped, and extended by any run that had to compute a missing seed)."""
    key = f"{problem}/{seed}"
    try:
        table = json.loads(_REFERENCE_FILE.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = compute(seed)
        try:
            _REFERENCE_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass
    return float(table[key])


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


# --- the registry ----------------------------------------------------------------------------

PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    Problem(
        name="xor",
        description="XOR, 2-2-1 sigmoid net, full batch, SGD momentum 0.9 (lr 0.5), torch init",
        make_data=xor_data, make_model=xor_model, loss_fn=F.mse_loss,
        steps=1500, quick_steps=400, target_loss=XOR_SUCCESS, lr=1e-2, sgd_lr=0.5,
        test_metric=xor_accuracy, higher_is_better=True, optimizer="sgd", seeds=50,
        quick_seeds=4, success_loss=XOR_SUCCESS),
    Problem(
        name="teacher_student_narrow",
        description="8→4→1 clipped-ReLU student of an 8-unit clipped-ReLU teacher "
                    "(under-parameterised), full batch, SGD momentum 0.9 (lr 0.05)",
        make_data=narrow_data, make_model=narrow_student, loss_fn=F.mse_loss,
        steps=3000, quick_steps=600, target_loss=0.1, lr=1e-2, sgd_lr=0.05,
        test_metric=test_mse, optimizer="sgd",
        reference=lambda seed: reference_loss("teacher_student_narrow", seed,
                                              width_best_loss)),
    Problem(
        name="teacher_student",
        description="symmetric saddle: 8→8→1 tanh student, all hidden units identical, 6-unit "
                    "tanh teacher, full batch, Adam",
        make_data=teacher_student_data, make_model=symmetric_student, loss_fn=F.mse_loss,
        steps=2000, quick_steps=300, target_loss=0.02, lr=1e-2, sgd_lr=0.1,
        test_metric=test_mse),
    Problem(
        name="stationary",
        description="exactly stationary poor local minimum: 1→4→1 Hardtanh net, identical "
                    "units, zero output layer, full batch, SGD momentum 0.9 (lr 0.1)",
        make_data=stationary_data, make_model=stationary_model, loss_fn=F.mse_loss,
        steps=1000, quick_steps=300, target_loss=0.1, lr=1e-2, sgd_lr=0.1, test_metric=test_mse,
        optimizer="sgd"),
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


def by_name(registry: dict, names, what: str) -> list:
    """Entries of ``registry`` by name (all when ``names`` is None); objects pass through;
    unknown names raise, listing what exists."""
    if names is None:
        return list(registry.values())
    unknown = [n for n in names if isinstance(n, str) and n not in registry]
    if unknown:
        raise KeyError(f"unknown {what}(s) {unknown}; available: {sorted(registry)}")
    return [registry[n] if isinstance(n, str) else n for n in names]


def get_problems(names=None) -> list[Problem]:
    """Problems by name (all when ``names`` is None)."""
    return by_name(PROBLEMS, names, "problem")
