"""One Bypass cycle — extend → bypass → return → contract → accept or roll back — as an object.

It owns the extension, the snapshot a rollback restores, the extension's optimizer group, the phase
and its schedule, and what the cycle measured. The facade (:class:`~morphc.Bypass`) drives it.

Why the default cycle looks the way it does (measured; docs/benchmarks.md):

- **Joint free phase.** Trained at s = 1 alone, the user's weights co-adapt to the branch's
  non-linear part, so the model at s = 0 (the one a fold keeps) ends *worse* than before the
  cycle, and no return schedule recovers it. Training ``L(s=1) + L(s=0)`` on every free step keeps
  the foldable model good while the s = 1 term still opens the escape directions.
- **A free phase that still gains goes on** (``max_bypass_steps``, by default up to 4 ×
  ``bypass_steps``): kept cycles were cut while still gaining. Opt-in while one longer free phase
  broke a run plain training solves; since the probation goes on while plain training closes
  in, no measured seed is worse with it, and escapes are deeper (docs/benchmarks.md).
- **Project, then train in the linear space.** s = 0 at once (the branch is linear, residual 0),
  then ordinary training of the user's weights and the now-linear branch before the exact fold:
  the paper's train → opt₁ → projection → opt₂ → train. Annealed returns measured worse.
- **Accept only what pays.** The contracted model must beat the model from before the cycle on
  the same data by more than plain training's own recent pace would have made in the same
  number of steps; otherwise everything is restored bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from morphc.compiler.extended import ExtendedModel
from morphc.ir.settings import SettingsWatch, live_modules
from morphc.runtime.config import BypassConfig, Phase, ReturnMode
from morphc.runtime.optimizer_group import ExtensionGroup
from morphc.runtime.shadow import Shadow
from morphc.runtime.snapshot import Snapshot


class Cycle:
    """The state of one cycle in flight."""

    def __init__(self, ext: ExtendedModel, snapshot: Snapshot, group: ExtensionGroup,
                 config: BypassConfig, *, started_at: int, pace: float = 0.0) -> None:
        self.ext, self.snapshot, self.group, self.config = ext, snapshot, group, config
        self.shadow: Shadow | None = None   # plain training beside the cycle, if kept
        self.plain_loss: torch.Tensor | None = None   # its loss on this step's batch, once taken
        self.started_at, self.pace = started_at, pace   # pace: plain's relative gain per step
        self.phase, self.phase_step = Phase.BYPASS, 0
        self.return_from, self.return_len = 1.0, config.return_steps
        self.loss_free: float | None = None
        self.free_len = config.bypass_steps      # grows while the free phase still gains
        self.free_marks: list[float] = []        # its loss every `free_window` steps
        self.free_measured: tuple | None = None  # ((step, probe id), [s = 1, s = 0 losses])
        self.saw_extension_grad = False
        self.structure: tuple | None = None   # the user's layers it was built on (the runner's)
        self._outside: tuple[int, list] | None = None   # :meth:`outside_ext`
        self.watch: SettingsWatch | None = None   # the user's layers' settings (Dropout.p)
        self.settings: tuple = ()                  # ... as the cycle follows them
        self.ran_modes: tuple | None = None   # the modes its graph ran the last step in
        self._live: set[int] | None = None    # the layers its symbolic graph calls live
        if config.bypass_steps == 0:
            self.enter_return(config.return_steps)

    def watch_settings(self, model: nn.Module) -> None:
        """From now on, follow the settings of ``model``'s layers (see ``CycleRunner``)."""
        self.watch = SettingsWatch(model)
        self.settings = self.watch.read()

    def live_layers(self) -> set[str]:
        """The user's layers the extended graph calls as modules, reading their settings live
        (none once a shape retraced it: the extra graphs are torch.export's)."""
        traced = self.ext.extension_traced
        return set() if self.ext.retraces else live_modules(traced.graph_module, traced.frontend)

    def graph_modes(self, modules: list[nn.Module]) -> tuple[bool, ...] | None:
        """The mode the extended graph ran each of the user's ``modules`` in, as it stands
        after a step (None: it cannot tell). A symbolically traced graph calls the user's own
        leaf layers (Dropout, BatchNorm) as modules, which read their flag live; what it traced
        through keeps the traced mode, flipped with the graph's own flag where
        :func:`~morphc.ir.mode_flags.follow_mode` made it read that. An exported graph bakes
        every mode in: the traced ones, or all in the extension's mode where it runs a graph
        exported again in the other (``ShapeGraphs.call_in_mode``); so do the graphs exported
        for other shapes, in the traced root's mode."""
        ext, traced, baked = self.ext, self.ext.extension_traced, self.structure[1]
        if ext.retraces:
            uniform = all(flag == traced.training for flag in baked)
            return baked if uniform and ext.training == traced.training else None
        if traced.frontend != "symbolic_trace":
            return baked if ext.training == traced.training else (ext.training,) * len(baked)
        gm = ext.graph_module
        if self._live is None:
            self._live = {id(gm.get_submodule(str(node.target))) for node in gm.graph.nodes
                          if node.op == "call_module"}
        live = self._live
        flips = gm.training != traced.training and \
            not any("self.training" in note for note in traced.notes)
        return tuple(module.training if id(module) in live else flag != flips
                     for module, flag in zip(modules, baked, strict=True))

    def outside_ext(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Of ``params``, those the extended model does not hold (found again only when the
        optimizer's parameters change: a group added mid-cycle)."""
        if self._outside is None or self._outside[0] != len(params):
            held = {id(p) for p in self.ext.parameters()}
            self._outside = (len(params), [p for p in params if id(p) not in held])
        return self._outside[1]

    # -- the schedule ---------------------------------------------------------------------------
    def enter_return(self, steps: int) -> None:
        self.phase, self.phase_step = Phase.RETURN, 0
        self.return_from, self.return_len = self.ext.homotopy, int(steps)
        if self.config.return_mode is ReturnMode.PROJECT:
            self.ext.set_homotopy(0.0)

    def homotopy_now(self) -> float | None:
        """s for the step about to run (None: leave it). Anneal: linear from where the return
        began to exactly 0 at its last step, so that step already trains on C."""
        if self.phase is not Phase.RETURN or self.config.return_mode is not ReturnMode.ANNEAL:
            return None
        done = min(self.phase_step + 1, self.return_len)
        return 0.0 if done >= self.return_len else \
            self.return_from * (1.0 - done / self.return_len)

    def advance(self) -> None:
        """After a completed step: bypass → return when the free phase is over."""
        self.phase_step += 1
        if self.phase is Phase.BYPASS and self.phase_step >= self.free_len:
            self.enter_return(self.config.return_steps)

    @property
    def free_window(self) -> int:
        """How often a free phase that may grow is measured, and by how much it grows."""
        return max(1, self.config.bypass_steps // 2)

    @property
    def steps(self) -> int:
        """The cycle's length as it stands (the free phase may have grown)."""
        return self.free_len + self.return_len

    @property
    def return_done(self) -> bool:
        return self.phase is Phase.RETURN and self.phase_step >= self.return_len

    @property
    def needs_force(self) -> bool:
        """A penalty return or a cut-short cycle ends with a measured snap onto C."""
        return self.ext.constraint_residual() != 0.0

    # -- the penalty return: a proximal step, stable for any learning rate ----------------------
    def shrink_towards_c(self, lr: float) -> None:
        """``α ← α_C + (α − α_C)/(1 + 2·lr·λ)``: the exact proximal step of ``λ‖α − α_C‖²``
        (λ growing as (i/N)²). The explicit gradient of that penalty diverges under momentum
        once ``lr·2λ > 2(1 + β)``; the proximal step never does."""
        weight = self.config.penalty * ((self.phase_step + 1) / max(self.return_len, 1)) ** 2
        factor = 1.0 / (1.0 + 2.0 * lr * weight)
        with torch.no_grad():
            for branch in self.ext.extension_branches.values():
                on_c = branch.compiled.project(branch.alpha)
                branch.alpha.copy_(on_c + factor * (branch.alpha - on_c))

    # -- acceptance -----------------------------------------------------------------------------
    def required_gain(self, loss_before: float) -> float:
        """What plain training would have gained over this cycle's steps at its recent pace."""
        return abs(loss_before) * max(self.pace, 0.0) * self.steps

    def needed(self, loss_before: float, loss_plain: float | None = None) -> float:
        """The loss a cycle must beat: the model from before it, less what plain training would
        have gained at its recent pace — or, when plain training ran beside the cycle
        (``loss_plain``, :mod:`~morphc.runtime.shadow`), where it is now, if that is lower."""
        needed = loss_before - self.required_gain(loss_before)
        return needed if loss_plain is None else min(needed, loss_plain)

    def pays(self, loss_before: float, loss_after: float,
             loss_plain: float | None = None) -> bool:
        if not math.isfinite(loss_after):
            return False
        if self.config.accept == "always":
            return True
        return loss_after < self.needed(loss_before, loss_plain)

    def found_something(self, loss_before: float, loss_free: float, trigger) -> bool:
        """Did the free phase find anything for the return to keep? ``loss_free`` (the better of
        s = 1 and s = 0) must beat the loss from before the cycle by the trigger's own measure
        of leaving a plateau over the free phase's steps (``trigger.escaped``), or at all for a
        trigger without one. A cycle that found nothing is rolled back at once: its return
        phase could only train at plain training's pace, which a cycle must beat to be kept,
        at a higher cost per step. (``accept="always"`` keeps every cycle: the runner does not
        ask.)"""
        if not math.isfinite(loss_free):
            return False
        escaped = getattr(trigger, "escaped", None)
        if callable(escaped):
            return bool(escaped(loss_before, loss_free, self.free_len))
        return loss_free < loss_before

    def survival(self, loss_before: float, loss_after: float) -> float | None:
        """Share of the free phase's gain still there after contraction (None: no gain)."""
        if self.loss_free is None or not loss_before > self.loss_free:
            return None
        return (loss_before - loss_after) / (loss_before - self.loss_free)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"phase": str(self.phase), "phase_step": self.phase_step,
                "return_from": self.return_from, "return_len": self.return_len,
                "started_at": self.started_at, "pace": self.pace, "loss_free": self.loss_free,
                "free_len": self.free_len, "free_marks": list(self.free_marks),
                "saw_extension_grad": self.saw_extension_grad}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.phase_step = Phase(state["phase"]), int(state["phase_step"])
        self.return_from, self.return_len = float(state["return_from"]), int(state["return_len"])
        self.started_at, self.pace = int(state["started_at"]), float(state["pace"])
        self.loss_free = state["loss_free"]
        self.free_len = int(state.get("free_len", self.config.bypass_steps))
        self.free_marks = [float(v) for v in state.get("free_marks", [])]
        self.saw_extension_grad = bool(state["saw_extension_grad"])


def quiet_until(config: BypassConfig, *, step: int, misses: int, spent: int = 0) -> int:
    """The first step a new cycle may start after ``misses`` consecutive cycles that did not pay:
    the trigger backs off for 2^misses times the steps the last one ran (``spent``; at least a
    cycle's length), so a free phase that grew and missed buys a longer wait, and runs of
    misses cost at most a fixed share of the steps (shared by Bypass and the integrations)."""
    return step + max(config.cycle_steps, spent) * 2 ** misses


def back_off(config: BypassConfig, trigger, *, step: int, misses: int, quiet: int, paid: bool,
             before: float, after: float, spent: int = 0) -> tuple[int, int]:
    """``(misses, quiet_until)`` once a cycle closes (shared by Bypass and the integrations).

    A cycle that did not pay is a miss. A kept one resets the count, unless by the trigger's own
    measure (``trigger.escaped``, e.g. :meth:`~morphc.Plateau.escaped`) it did not leave the
    plateau — then it is a miss too, so tiny gains do not buy cycle after cycle. After a miss the
    trigger waits 2^misses times the missed cycle's length (:func:`quiet_until`)."""
    escaped = getattr(trigger, "escaped", None)
    if paid and not (callable(escaped) and not escaped(before, after, config.cycle_steps)):
        return 0, quiet
    misses += 1
    return misses, quiet_until(config, step=step, misses=misses, spent=spent)


def may_start(config: BypassConfig, trigger, *, step: int, cycles: int, quiet_until: int,
              lr: float, peak_lr: float, lr_changed_at: int = 0) -> bool:
    """When a fired trigger may start a cycle now (shared by Bypass and the trainer
    integrations). Below ``min_lr_fraction`` of its peak the lr is in a schedule's tail, where
    the loss flattens because the lr goes to zero — unless it held still (since
    ``lr_changed_at``) over all the losses the trigger judged (a step decay,
    ``ReduceLROnPlateau``): then the flat loss is the model's own plateau, at that lr."""
    if config.max_cycles is not None and cycles >= config.max_cycles:
        return False
    if step < quiet_until:                           # backing off after cycles that did not pay
        return False
    if config.total_steps is not None and step + config.cycle_steps > config.total_steps:
        return False                                 # it could not end inside the budget
    if lr >= config.min_lr_fraction * peak_lr:
        return True
    window = getattr(trigger, "window", None)    # Plateau compares two windows of losses
    judged = 2 * int(window) if isinstance(window, int) and window > 0 else config.cycle_steps
    return lr > 0 and step - lr_changed_at >= judged
