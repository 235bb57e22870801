"""Training methods compared by ``morphc bench``: the usual remedies, and a slot for Bypass.

A method is a :class:`Method`: a name, a description and a ``run(problem, seed, steps, on_step)``
callable that returns a :class:`RunResult`. Most methods only differ in how one training step is
taken, so they are written as a *stepper* — any object with ``step(closure) -> loss``, ``model``
and ``finish() -> nn.Module``, the same interface as ``morphc.Bypass`` — and :func:`train`
supplies everything else (seeding, data, minibatches, timing, evaluation). Adding a method is one
line::

    register(stepper_method(
        "bypass", lambda problem, model, seed, steps: morphc.Bypass(model, adam(problem)),
        "Adam + Bypass (extend on plateau, contract back)"))

Baselines here, all under the same step budget, seeds and optimizer (the problem's own:
Adam or SGD with momentum, see ``Problem.optimizer``):

- ``plain``: the problem's optimizer alone (the reference every ratio is taken against);
- ``perturb``: noise on plateau; ``warm_restarts``: a warm restart on plateau. Both are
  :class:`RemedyStepper` cycles: the same ``morphc.Plateau`` trigger, cycle length, budget rule,
  acceptance test and rollback as ``morphc.Bypass``, so only the move differs.
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

from morphc.bench.problems import Data, Problem, by_name

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


def default_window(steps: int) -> int:
    """The Plateau window every triggered method uses: 100 steps (the library default) within
    budgets of ≥ 2000 steps, 1/20 of the budget below."""
    return min(100, max(10, steps // 20))


def phase_steps(steps: int) -> int:
    """100 steps per phase (the library default) within budgets of ≥ 2000 steps, less below."""
    return max(10, min(100, steps // 20))


def full_train_loss(problem: Problem, data: Data) -> Closure:
    """The evaluation closure every cycle's accept-or-roll-back test uses: the whole training
    set (for full-batch problems this is the training closure itself)."""
    def closure(model: nn.Module) -> torch.Tensor:
        return problem.loss_fn(model(data.x_train), data.y_train)
    return closure


@torch.no_grad()
def perturb_(params: list[torch.Tensor], radius: float, generator: torch.Generator) -> None:
    """Add a Gaussian-direction perturbation of norm exactly ``radius`` across all ``params``."""
    noise = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
             for p in params]
    norm = torch.sqrt(sum((n.double() ** 2).sum() for n in noise)).item()
    for p, n in zip(params, noise, strict=True):
        p.add_(n, alpha=radius / max(norm, 1e-30))


class RemedyStepper:
    """A cheap remedy run exactly like a Bypass cycle, so only the move differs.

    The same trigger (``morphc.Plateau`` with the bench's window), the same cycle length
    (``2·phase_steps``), no cycle that cannot end in the budget, the same accept-or-roll-back
    rule on the same evaluation data (the contracted/perturbed model must beat the model from
    before the cycle by more than plain training's recent pace would have made), the same
    bit-identical rollback (``morphc``'s ``Snapshot``) and the same back-off. ``remedy`` is
    ``"noise"`` (weights += noise of norm ``0.02·‖θ‖``) or ``"restart"`` (a warm restart:
    optimizer state cleared, learning rate raised ``3×`` and cosine-annealed back over the
    cycle).
    """

    def __init__(self, problem: Problem, model: nn.Module, seed: int, steps: int, *,
                 remedy: str, eval_closure: Closure | None = None, radius: float = 0.02,
                 kick: float = 3.0) -> None:
        import morphc
        from morphc.runtime.snapshot import Snapshot

        self._snapshot_type = Snapshot
        self._model, self.remedy, self.radius, self.kick = model, remedy, radius, kick
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = problem.make_optimizer(self.params)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.trigger = morphc.Plateau(window=default_window(steps))
        self.cycle_steps, self.total = 2 * phase_steps(steps), steps
        self.eval_closure = eval_closure
        self.generator = torch.Generator().manual_seed(seed + 30_000)
        self.step_count, self.unpaid, self.quiet_until = 0, 0, 0
        self.cycle: dict | None = None
        self.history: list[dict] = []

    @property
    def model(self) -> nn.Module:
        return self._model

    def step(self, closure: Closure) -> torch.Tensor:
        cycle = self.cycle
        if cycle is not None and self.remedy == "restart":
            t = cycle["done"] / self.cycle_steps
            scale = 1.0 + (self.kick - 1.0) * 0.5 * (1.0 + math.cos(math.pi * t))
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure(self._model)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        value = loss.item()
        if cycle is not None:
            cycle["done"] += 1
            if cycle["done"] >= self.cycle_steps:
                self._close(closure)
        elif self.trigger.update(value, step=self.step_count) \
                and self.step_count >= self.quiet_until \
                and self.step_count + self.cycle_steps <= self.total:
            self._open()
        return loss.detach()

    def _open(self) -> None:
        self.cycle = {"done": 0, "at": self.step_count, "pace": self.trigger.pace(),
                      "snapshot": self._snapshot_type.take(self._model, self.optimizer)}
        self.history.append({"event": "extend", "step": self.step_count})
        if self.remedy == "noise":
            with torch.no_grad():
                theta = torch.sqrt(sum((p.double() ** 2).sum() for p in self.params)).item()
            perturb_(self.params, self.radius * max(theta, 1e-3), self.generator)
        else:
            self.optimizer.state.clear()

    def _loss(self, closure: Closure) -> float:
        was = self._model.training
        self._model.eval()
        try:
            with torch.no_grad():
                return float((self.eval_closure or closure)(self._model))
        finally:
            self._model.train(was)

    def _close(self, closure: Closure) -> None:
        cycle, self.cycle = self.cycle, None
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr
        snapshot = cycle["snapshot"]
        after = self._loss(closure)
        current = snapshot.swap_params(self._model)
        try:
            before = self._loss(closure)
        finally:
            snapshot.put_back(self._model, current)
        required = abs(before) * cycle["pace"] * self.cycle_steps
        paid = math.isfinite(after) and after < before - required
        event = {"step": self.step_count, "loss_before": before, "loss_after": after}
        if paid:
            self.unpaid = 0
            self.history.append({"event": "contract", **event})
        else:
            snapshot.restore(self._model, self.optimizer)
            self.unpaid += 1
            self.quiet_until = self.step_count + self.cycle_steps * 2 ** self.unpaid
            self.history.append({"event": "rollback", **event})
        self.trigger.reset()

    def finish(self) -> nn.Module:
        """Like ``Bypass.finish()``: never trains; a cycle in flight is kept only if it pays."""
        if self.cycle is not None and self.eval_closure is not None:
            self._close(self.eval_closure)
        return self._model

    @property
    def events(self) -> dict:
        return cycle_events(self.history)


def cycle_events(history: list[dict]) -> dict:
    """What the report needs from a cycle history (``morphc.Bypass.history`` or a remedy's):
    when cycles started and were kept, rollbacks, and each closed cycle's measures."""
    closed = [e for e in history if e["event"] in ("contract", "rollback")
              and "loss_before" in e]
    return {"extended_at": [e["step"] for e in history if e["event"] == "extend"],
            "contracted_at": [e["step"] for e in history if e["event"] == "contract"],
            "rollbacks": sum(e["event"] == "rollback" for e in history),
            "cycles": [{k: e.get(k) for k in ("event", "step", "loss_before", "loss_free",
                                              "loss_after", "survival")} for e in closed]}


def remedy_method(name: str, remedy: str, description: str) -> Method:
    def make(problem, model, seed, steps, data=None):
        closure = None if data is None else full_train_loss(problem, data)
        return RemedyStepper(problem, model, seed, steps, remedy=remedy, eval_closure=closure)
    return stepper_method(name, make, description)


# --- the registry ----------------------------------------------------------------------------

PLAIN = "plain"

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method under its name; returns it, so it can be used inline."""
    METHODS[method.name] = method
    return method


BASELINES = [
    register(stepper_method(
        PLAIN, lambda problem, model, seed, steps: OptimizerStepper(
            model, problem.make_optimizer(model.parameters())),
        "plain training with the problem's optimizer")),
    register(remedy_method(
        "perturb", "noise",
        "noise on plateau: weights += noise of norm 0.02·‖θ‖, kept only if it pays")),
    register(remedy_method(
        "warm_restarts", "restart",
        "warm restart on plateau: optimizer state cleared, lr 3× cosine-annealed back, kept "
        "only if it pays")),
]


def get_methods(names=None) -> list[Method]:
    """Methods by name (all registered when ``names`` is None); Method objects pass through."""
    return by_name(METHODS, names, "method")
