"""The cycle rules every triggered method shares, so a Bypass cycle and a remedy cycle differ only
in their move: the Plateau window, the phase length, the accept-or-roll-back data, and what a
cycle history reports."""

from __future__ import annotations

import torch
from torch import nn

from morphc.bench.problem_families import Data
from morphc.bench.problems import Problem
from morphc.bench.training import Closure


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
