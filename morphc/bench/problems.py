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

import torch
import torch.nn.functional as F
from torch import nn

from morphc import zoo
from morphc.bench.problem_families import (
    XOR_SUCCESS,
    Data,
    deep_linear_data,
    deep_linear_model,
    diabetes_data,
    diabetes_mlp,
    digits_cnn,
    digits_data,
    digits_mlp,
    narrow_data,
    narrow_student,
    stationary_data,
    stationary_model,
    teacher_student_data,
    test_accuracy,
    test_mse,
    xor_accuracy,
    xor_data,
    xor_model,
)
from morphc.bench.reference_losses import reference_loss, width_best_loss

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
        name="xor_slow",
        description="XOR, 2-2-1 sigmoid net, full batch, SGD momentum 0.9 (lr 0.1), torch init: "
                    "plain training leaves the initial plateau slowly",
        make_data=xor_data, make_model=xor_model, loss_fn=F.mse_loss,
        steps=3000, quick_steps=400, target_loss=XOR_SUCCESS, lr=1e-2, sgd_lr=0.1,
        test_metric=xor_accuracy, higher_is_better=True, optimizer="sgd", seeds=50,
        quick_seeds=2, success_loss=XOR_SUCCESS),
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
        make_data=teacher_student_data, make_model=zoo.symmetric_student, loss_fn=F.mse_loss,
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
