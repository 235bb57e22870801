"""The morphc methods of the suite: Bypass, permanent growth, and the linear-bypass ablation.

All three are one :class:`morphc.Bypass` run with one knob changed, so they extend at the same
step, at the same sites, with the same branch initialisation:

- ``bypass``: ``morphc.Bypass`` with the library defaults (morphc/runtime/config.py), the
  bench's Plateau window and phases scaled to the step budget, and the whole training set as
  ``eval_closure`` (the accept-or-roll-back data); returns the user's own architecture.
- ``growth``: one cycle that never returns: the extension is kept (homotopy 1) for the rest of
  the budget and the *extended* model is evaluated — more parameters, what "just make it bigger
  at the plateau" buys.
- ``linear_bypass``: the ablation. The same cycles with ρ affine throughout (homotopy held at 0
  from the extension on, free phase on L(s=0) only): a LoRA-like branch ``B·(p·(Ax + a) + q)``,
  folded back exactly. At a
  stationary point its ``∂L/∂B`` is zero, so it opens no new descent direction (the check that
  the learnable non-linearity is what matters); ``docs/benchmarks.md`` reports what it does on
  each problem.

Budget: a cycle is not started when fewer than ``bypass_steps + return_steps`` steps remain, so
every run ends contracted inside its step budget (``finish()`` never trains extra steps).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

import morphc
from morphc.bench.baselines import register
from morphc.bench.cycles import cycle_events, default_window, full_train_loss, phase_steps
from morphc.bench.problem_families import Data
from morphc.bench.problems import Problem
from morphc.bench.training import adam, stepper_method

VARIANTS = ("bypass", "growth", "linear")

# The library defaults (morphc/runtime/config.py), nothing tuned here: only the trigger window
# and the phases are scaled to the budget, as for every other triggered method.
BYPASS_DEFAULTS: dict = {}


class BypassStepper:
    """A :class:`~morphc.bench.baselines.Stepper` around one ``morphc.Bypass`` run.

    ``variant``: ``"bypass"`` (as is), ``"growth"`` (one cycle, never returned, the extended
    model is the result) or ``"linear"`` (homotopy held at 0 from each extension on).
    ``options`` go to ``morphc.Bypass`` and override :data:`BYPASS_DEFAULTS`.
    """

    def __init__(self, problem: Problem, model: nn.Module, seed: int, steps: int, *,
                 variant: str = "bypass", phase: int | None = None,
                 options: Mapping | None = None, data: Data | None = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        phase = phase_steps(steps) if phase is None else phase
        config = {**BYPASS_DEFAULTS, "trigger": morphc.Plateau(window=default_window(steps)),
                  "bypass_steps": phase, "return_steps": phase,
                  **copy.deepcopy(dict(options or {}))}   # a fresh trigger state per run
        if data is not None:          # accept or roll back on the whole training set
            config.setdefault("eval_closure", full_train_loss(problem, data))
        if variant in ("linear", "growth"):   # one model trained: no joint s = 0 pass
            config["free_phase"] = "plain"
        if variant == "growth":       # its one cycle never ends: nothing to hand over
            config.update(bypass_steps=steps + 1, max_cycles=1, shadow=False)
        else:
            config.setdefault("total_steps", steps)   # no cycle that cannot end in the budget
        self.variant, self.steps, self.step_count = variant, steps, 0
        self.cycle_steps = config["bypass_steps"] + config["return_steps"]
        self.bp = morphc.Bypass(model, adam(problem), seed=seed, verbose=False, **config)

    @property
    def model(self) -> nn.Module:
        return self.bp.model

    def step(self, closure) -> torch.Tensor:
        self.bp.step(closure)       # returns plain training's loss while a copy runs beside
        loss = torch.tensor(self.bp.last_loss)   # the run's own: what the curves show
        self.step_count += 1
        if self.variant == "linear" and self.bp.extended is not None \
                and self.bp.extended.homotopy != 0.0:
            self.bp.extended.set_homotopy(0.0)   # ρ affine from the first extended step on
        return loss

    def finish(self) -> nn.Module:
        if self.variant == "growth" and self.bp.extended is not None:
            extended = self.bp.extended        # the extension is kept: more parameters;
            self.bp._cycle = None              # on purpose, so Bypass need not warn that a
            return extended                    # cycle was left in flight
        return self.bp.finish()

    @property
    def events(self) -> dict:
        """Cycle steps and measures for the report (see ``cycle_events``)."""
        return cycle_events(self.bp.history)


def bypass_method(name: str, variant: str, description: str, **stepper_options):
    """A suite method running :class:`BypassStepper` (``stepper_options``: ``phase``,
    ``options``); used for the registered methods and for settings sweeps."""
    def make(problem, model, seed, steps, data=None):
        return BypassStepper(problem, model, seed, steps, variant=variant, data=data,
                             **stepper_options)
    return stepper_method(name, make, description)


_SETTINGS = "plateau → extend (library defaults)"
MORPHC_METHODS = [
    register(bypass_method("bypass", "bypass",
                           "morphc.Bypass with the library defaults, at every plateau")),
    register(bypass_method("growth", "growth",
                           f"{_SETTINGS} at the first plateau, never contracted: the extended "
                           "model is kept (more parameters)")),
    register(bypass_method("linear_bypass", "linear",
                           "ablation: Bypass with ρ affine throughout (homotopy 0, a LoRA-like "
                           "branch), same trigger, sites, init and phases")),
]
