"""The cheap remedies a Bypass is compared with: noise on plateau and a warm restart on plateau.

Both run as a :class:`RemedyStepper` cycle with the same trigger, cycle length, budget rule,
acceptance test and rollback as ``morphc.Bypass``, so only the move differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from morphc.bench.cycles import cycle_events, default_window, full_train_loss, phase_steps
from morphc.bench.problems import Problem
from morphc.bench.training import Closure, Method, stepper_method


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
    before the cycle by more than plain training's recent pace would have made, and plain
    training run beside the cycle), the same hand-over of that plain training's state when it
    does not (``morphc``'s ``Shadow``), the same probation after a kept cycle (that plain
    training goes on beside the run for twice the cycle's length, no cycle starts, then the
    better run is kept) and the same back-off. ``remedy`` is
    ``"noise"`` (weights += noise of norm ``0.02·‖θ‖``) or ``"restart"`` (a warm restart:
    optimizer state cleared, learning rate raised ``3×`` and cosine-annealed back over the
    cycle).
    """

    def __init__(self, problem: Problem, model: nn.Module, seed: int, steps: int, *,
                 remedy: str, eval_closure: Closure | None = None, radius: float = 0.02,
                 kick: float = 3.0) -> None:
        import morphc
        from morphc.runtime.shadow import Shadow
        from morphc.runtime.snapshot import Snapshot

        self._snapshot_type, self._shadow_type = Snapshot, Shadow
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
        self.probation: tuple | None = None      # (plain training's copy, the step it ends)
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
        beside = cycle["shadow"] if cycle is not None else \
            self.probation[0] if self.probation is not None else None
        if beside is not None:         # plain training's step first, on the global RNG
            beside.step(closure, None, None)
            with beside.rng_apart():
                loss = self._plain_step(closure)
        else:
            loss = self._plain_step(closure)
        self.step_count += 1
        value = loss.item()
        if cycle is not None:
            cycle["done"] += 1
            if cycle["done"] >= self.cycle_steps:
                self._close(closure)
        elif self.probation is not None:
            self.trigger.update(value, step=self.step_count)
            if self.step_count >= self.probation[1]:
                self._end_probation(closure)
        elif self.trigger.update(value, step=self.step_count) \
                and self.step_count >= self.quiet_until \
                and self.step_count + self.cycle_steps <= self.total:
            self._open()
        return loss.detach()

    def _plain_step(self, closure: Closure) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure(self._model)
        loss.backward()
        self.optimizer.step()
        return loss

    def _open(self) -> None:
        self.cycle = {"done": 0, "at": self.step_count, "pace": self.trigger.pace(),
                      "snapshot": self._snapshot_type.take(self._model, self.optimizer),
                      "shadow": self._shadow_type(self._model, self.optimizer)}
        self.history.append({"event": "extend", "step": self.step_count})
        if self.remedy == "noise":
            with torch.no_grad():
                theta = torch.sqrt(sum((p.double() ** 2).sum() for p in self.params)).item()
            perturb_(self.params, self.radius * max(theta, 1e-3), self.generator)
        else:
            self.optimizer.state.clear()

    def _loss(self, closure: Closure, model: nn.Module | None = None) -> float:
        model = self._model if model is None else model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float((self.eval_closure or closure)(model))
        finally:
            model.train(was)

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
        plain = self._loss(closure, cycle["shadow"].model)
        required = abs(before) * cycle["pace"] * self.cycle_steps
        paid = math.isfinite(after) and after < min(before - required, plain)
        event = {"step": self.step_count, "loss_before": before, "loss_after": after,
                 "loss_plain": plain}
        if paid:
            self.unpaid = 0
            self.history.append({"event": "contract", **event})
            self.probation = (cycle["shadow"], self.step_count + 2 * self.cycle_steps)
        else:
            cycle["shadow"].hand_over(self._model, self.optimizer)
            self.unpaid += 1
            self.quiet_until = self.step_count + self.cycle_steps * 2 ** self.unpaid
            self.history.append({"event": "rollback", **event})
        self.trigger.reset()

    def _end_probation(self, closure: Closure) -> None:
        """Keep this run unless plain training beside it is now better: then hand it over."""
        from morphc.runtime.shadow import plain_leads

        shadow, self.probation = self.probation[0], None
        if plain_leads(self._loss(closure), self._loss(closure, shadow.model)):
            shadow.hand_over(self._model, self.optimizer)
            self.trigger.reset()

    def finish(self) -> nn.Module:
        """Like ``Bypass.finish()``: never trains; a cycle in flight is kept only if it pays,
        a probation in flight is judged."""
        if self.cycle is not None and self.eval_closure is not None:
            self._close(self.eval_closure)
        if self.probation is not None and self.eval_closure is not None:
            self._end_probation(self.eval_closure)
        return self._model

    @property
    def events(self) -> dict:
        return cycle_events(self.history)


def remedy_method(name: str, remedy: str, description: str) -> Method:
    def make(problem, model, seed, steps, data=None):
        closure = None if data is None else full_train_loss(problem, data)
        return RemedyStepper(problem, model, seed, steps, remedy=remedy, eval_closure=closure)
    return stepper_method(name, make, description)
