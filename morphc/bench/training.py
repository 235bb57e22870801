"""The driver every method shares: a stepper protocol and one training loop that measures it.

Most methods only differ in how one training step is taken, so they are written as a *stepper*
— any object with ``step(closure) -> loss``, ``model`` and ``finish() -> nn.Module``, the same
interface as ``morphc.Bypass`` — and :func:`train` supplies everything else (seeding, data,
minibatches, timing, evaluation), so every method is measured the same way.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from morphc.bench.problem_families import Data
from morphc.bench.problems import Problem

OnStep = Callable[[int, float], None] | None
Closure = Callable[[nn.Module], torch.Tensor]


@dataclass
class RunResult:
    """Everything measured in one (problem, method, seed) run.

    ``losses[i]`` is the training loss the optimizer saw at step ``i`` (the minibatch loss for
    minibatch problems). ``final_loss`` is the loss on the whole training set with the returned
    model in eval mode. ``steps_to_target`` counts steps until the (EMA-smoothed, for minibatch
    problems) loss first reached the problem's target; ``None`` if it never did.
    """

    problem: str
    method: str
    seed: int
    losses: list[float]
    final_loss: float
    seconds: float
    params: int
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    metric_name: str | None = None
    metric_value: float | None = None
    extra: dict = field(default_factory=dict)


RunFn = Callable[[Problem, int, int, OnStep], RunResult]


@dataclass(frozen=True)
class Method:
    name: str
    run: RunFn
    description: str = ""


class Stepper(Protocol):
    """One training step at a time; ``morphc.Bypass`` satisfies this protocol as is."""

    @property
    def model(self) -> nn.Module: ...

    def step(self, closure: Closure) -> torch.Tensor: ...

    def finish(self) -> nn.Module: ...


StepperFactory = Callable[[Problem, nn.Module, int, int], Stepper]


# --- the shared driver -----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Batches:
    """Seeded minibatches: a fresh permutation per epoch; full batch when ``batch_size`` is None.

    For a given seed every method sees the same sequence of batches.
    """

    def __init__(self, data: Data, batch_size: int | None, seed: int):
        self.x, self.y, self.batch_size = data.x_train, data.y_train, batch_size
        self.generator = torch.Generator().manual_seed(seed + 20_000)
        self.order: list[torch.Tensor] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_size is None:
            return self.x, self.y
        if not self.order:
            perm = torch.randperm(len(self.x), generator=self.generator)
            self.order = list(perm.split(self.batch_size))[::-1]
        idx = self.order.pop()
        return self.x[idx], self.y[idx]


class Smoother:
    """Bias-corrected EMA of the loss (identity when ``beta`` is 0)."""

    def __init__(self, beta: float):
        self.beta, self.value, self.weight = beta, 0.0, 0.0

    def update(self, loss: float) -> float:
        self.value = self.beta * self.value + (1 - self.beta) * loss
        self.weight = self.beta * self.weight + (1 - self.beta)
        return self.value / self.weight


def smoothing_beta(problem: Problem) -> float:
    """Minibatch losses are noisy: smooth them before asking whether a target was reached."""
    return 0.0 if problem.batch_size is None else 0.9


def evaluate(problem: Problem, model: nn.Module,
             data: Data) -> tuple[float, str | None, float | None]:
    """(full training-set loss in eval mode, metric name, metric value)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        final_loss = problem.loss_fn(model(data.x_train), data.y_train).item()
    model.train(was_training)
    if problem.test_metric is None:
        return final_loss, None, None
    name, value = problem.test_metric(model, data.x_test, data.y_test)
    return final_loss, name, value


def train(problem: Problem, seed: int, steps: int, on_step: OnStep,
          make_stepper: StepperFactory, method: str) -> RunResult:
    """Run ``steps`` steps of ``make_stepper(problem, model, seed, steps)`` and measure them.

    A non-finite loss stops the run; the rest of the curve is NaN and ``extra['diverged_at']``
    says when.
    """
    seed_everything(seed)
    data = problem.make_data(seed)
    model = problem.make_model(seed)
    if "data" in inspect.signature(make_stepper).parameters:   # cycle methods evaluate on it
        stepper = make_stepper(problem, model, seed, steps, data=data)
    else:
        stepper = make_stepper(problem, model, seed, steps)
    batches, smoother = Batches(data, problem.batch_size, seed), Smoother(smoothing_beta(problem))
    losses: list[float] = []
    reached: tuple[int, float] | None = None
    extra: dict = {}
    start = time.perf_counter()
    for step in range(steps):
        x, y = batches.next()
        loss = float(stepper.step(lambda m, x=x, y=y: problem.loss_fn(m(x), y)))
        losses.append(loss)
        if not math.isfinite(loss):
            extra["diverged_at"] = step
            losses += [math.nan] * (steps - step - 1)
            break
        if reached is None and smoother.update(loss) <= problem.target_loss:
            reached = (step + 1, time.perf_counter() - start)
        if on_step is not None:
            on_step(step, loss)
    seconds = time.perf_counter() - start
    final = stepper.finish()
    final_loss, metric_name, metric_value = evaluate(problem, final, data)
    extra.update(getattr(stepper, "events", {}))
    if problem.success_loss is not None:
        extra["success"] = bool(final_loss < problem.success_loss)
    if problem.reference is not None:
        extra["reference_loss"] = problem.reference(seed)
    return RunResult(
        problem=problem.name, method=method, seed=seed, losses=losses, final_loss=final_loss,
        seconds=seconds, params=sum(p.numel() for p in final.parameters()),
        steps_to_target=reached[0] if reached else None,
        seconds_to_target=reached[1] if reached else None,
        metric_name=metric_name, metric_value=metric_value, extra=extra)


def stepper_method(name: str, make_stepper: StepperFactory, description: str = "") -> Method:
    """A :class:`Method` from a stepper factory ``(problem, model, seed, steps) -> Stepper``."""
    def run(problem: Problem, seed: int, steps: int, on_step: OnStep = None) -> RunResult:
        return train(problem, seed, steps, on_step, make_stepper, name)
    return Method(name, run, description)


# --- steppers --------------------------------------------------------------------------------


class OptimizerStepper:
    """zero_grad → closure → backward → optimizer step → scheduler step → ``after_step(loss)``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                 after_step: Callable[[float], None] | None = None):
        self._model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.after_step = after_step
        self.events: dict = {}

    @property
    def model(self) -> nn.Module:
        return self._model

    def step(self, closure: Closure) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure(self._model)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.after_step is not None:
            self.after_step(loss.item())
        return loss.detach()

    def finish(self) -> nn.Module:
        return self._model


def adam(problem: Problem) -> Callable[[object], torch.optim.Optimizer]:
    """The factory of the problem's own optimizer (Adam or SGD+momentum, see ``Problem``):
    ``adam(problem)(params)``. Kept under its old name; every method trains with it."""
    return problem.make_optimizer
