"""The cycle side of :class:`~morphc.integrations.core.TrainerBypass`: start, step, judge, fold
or hand over — with plain training beside the cycle (:mod:`~morphc.integrations.plain`) when the
callback can replay its micro-batches. Mixed into ``TrainerBypass``, whose state it reads."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from morphc.compiler.contract import diverged
from morphc.errors import BypassError, MorphcError
from morphc.integrations.extension import InPlaceExtension
from morphc.integrations.plain import PlainBeside
from morphc.integrations.trainer_probation import TrainerProbationSide
from morphc.runtime.config import Accept, OnFailure, Phase
from morphc.runtime.cycle import Cycle, back_off
from morphc.runtime.optimizer_group import ExtensionGroup
from morphc.runtime.snapshot import Snapshot


class TrainerCycle(TrainerProbationSide):
    """Starting, stepping and ending one Bypass cycle inside someone else's training loop."""

    # -- the start of a cycle -------------------------------------------------------------------
    def _start_cycle(self) -> None:
        cfg = self.config
        snapshot = Snapshot.take(self.model, self.optimizer)
        try:
            ext = InPlaceExtension(self.model, self._chosen, self._modules, width=cfg.width,
                                   activation=cfg.activation, overrides=cfg.overrides,
                                   seed=cfg.seed + self.cycle + self.failures,
                                   init_scale=cfg.init_scale)
        except Exception as exc:
            self._disabled = f"extension failed: {type(exc).__name__}: {exc}"
            self._event("failure", reason=self._disabled)
            if cfg.on_failure is OnFailure.RAISE:
                raise BypassError(f"morphc could not extend the model ({exc}); nothing was "
                                  "changed") from exc
            return
        group = ExtensionGroup(self.optimizer, ext.parameters(), cfg.extension_options)
        pace = getattr(self.trigger, "pace", None)
        self._cycle_losses, self._micro = [], 0
        self._beside, self._inputs = self._take_beside(snapshot), []
        self._cycle = Cycle(ext, snapshot, group, cfg, started_at=self.step_count,
                            pace=pace() if callable(pace) else 0.0)
        self._cycle.loss_before = sum(self._plain) / len(self._plain)
        self._event("extend", sites=[s.name for s in ext.sites],
                    widths={n: b.width for n, b in ext.branches.items()})
        self._set_return_homotopy()

    def _take_beside(self, snapshot: Snapshot) -> PlainBeside | None:
        """Plain training beside the cycle whenever a verdict can hand it over and the
        callback can replay micro-batches (taken before the extension: from the snapshot's
        values, which are the model's now)."""
        cfg = self.config
        if not cfg.shadow or cfg.accept is Accept.ALWAYS or self._replay is None:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            return None        # the replay runs the bare model: no all-reduce, ranks diverge
        try:
            return PlainBeside(self.model, self.optimizer)
        except Exception as exc:
            cfg.shadow = False
            warnings.warn(f"morphc could not copy the optimizer to train plainly beside its "
                          f"cycles ({type(exc).__name__}: {exc}); a cycle that does not pay "
                          "restores the state from before it instead (its steps are lost)",
                          stacklevel=2)
            return None

    # -- steps of a cycle ---------------------------------------------------------------------
    def _cycle_step(self, value: float) -> None:
        cycle = self._cycle
        if not math.isfinite(value):
            self._lr_scale *= 0.5
            self._rollback(f"non-finite loss {value} at {cycle.phase} step {cycle.phase_step}; "
                           f"the next cycle's extension lr is halved (scale {self._lr_scale:g})")
            return
        self._cycle_losses.append(value)
        was_free = cycle.phase is Phase.BYPASS
        cycle.advance()
        if was_free and cycle.phase is Phase.RETURN:
            cycle.loss_free = value
            self._cycle_losses = []          # the acceptance window is the return phase's
            self._event("return", mode=self.config.return_mode, steps=cycle.return_len)
        if cycle.return_done:
            self._close()
        else:
            self._set_return_homotopy()

    def _set_return_homotopy(self) -> None:
        s = self._cycle.homotopy_now()
        if s is not None:
            self._cycle.ext.set_homotopy(s)

    def resolve(self, reason: str) -> None:
        """Leave no extension behind (a checkpoint is due, or training ended): fold a cycle on C
        that has return steps to judge it by, roll back any other; judge a probation in flight
        now (a later hand-over would replace what a checkpoint holds)."""
        if self._probation is not None:
            self._resolve_probation(reason)
            return
        cycle = self._cycle
        if cycle is None:
            return
        if self._stepped:
            self._end_mid_step(reason)
            return
        if self.step_count == cycle.started_at:
            self._withdraw(reason)
            return
        if self._diverged(f"{reason} during the {cycle.phase} phase"):
            return
        on_c = cycle.ext.constraint_residual() == 0.0
        if cycle.phase is Phase.RETURN and self._cycle_losses and on_c:
            self._close(reason)
        elif not on_c:
            self._rollback(f"{reason} during the {cycle.phase} phase (step {cycle.phase_step}), "
                           "off the constraint set: nothing to fold exactly")
        else:
            self._rollback(f"{reason} before any return step: no training loss of the model "
                           "a fold would keep to judge it by")

    def _close(self, reason: str | None = None) -> None:
        """return → accept or roll back → fold (exact, verified) → training goes on, with plain
        training beside it on probation (not when resolved early: ``reason``)."""
        cycle = self._cycle
        if self._diverged(f"{reason} during the {cycle.phase} phase" if reason else None):
            return
        before = cycle.loss_before
        recent = self._cycle_losses[-self.window:]
        after = sum(recent) / len(recent)
        plain = None
        if self._beside is not None and len(self._beside.losses) >= len(recent):
            same_steps = self._beside.losses[-len(recent):]
            plain = sum(same_steps) / len(same_steps)
        measures = {"loss_before": before, "loss_free": cycle.loss_free, "loss_after": after,
                    "loss_plain": plain, "survival": cycle.survival(before, after),
                    "window": len(recent)}
        if not (cycle.pays(before, after) and (plain is None or after < plain)):
            self._unpaid, self._quiet_until = back_off(
                self.config, self.trigger, step=self.step_count, misses=self._unpaid,
                quiet=self._quiet_until, paid=False, before=before, after=after)
            needed = before - cycle.required_gain(before)
            needed = needed if plain is None else min(needed, plain)
            self._rollback(f"the cycle did not pay: mean training loss {after:.4g} over its last "
                           f"{len(recent)} steps vs {before:.4g} before"
                           + ("" if plain is None else f" and {plain:.4g} for plain training "
                              "beside it") + f" (needed < {needed:.4g})", measures=measures,
                           backoff=True)
            return
        residual = cycle.ext.constraint_residual()
        try:
            deviation = cycle.ext.fold()
        except MorphcError as exc:
            self._rollback(f"contraction failed: {exc}", exc)
            return
        self._unpaid, self._quiet_until = back_off(
            self.config, self.trigger, step=self.step_count, misses=self._unpaid,
            quiet=self._quiet_until, paid=True, before=before, after=after)
        beside = self._beside
        self._end_cycle()
        self.cycle += 1
        self._event("contract", residual=residual, deviation=deviation, reason=reason,
                    sites=[s.name for s in cycle.ext.sites], **measures)
        if reason is None and plain is not None:
            self._start_probation(beside, recent)

    def _diverged(self, when: str | None) -> bool:
        """Parameters that went NaN/inf at the cycle's last optimizer step, whose loss (taken
        before the step) was finite: rolled back as a non-finite loss is, and said as
        ``morphc.contract`` says it (a NaN α used to read "off the constraint set (residual
        nan)")."""
        cycle = self._cycle
        why = diverged(cycle.ext.branches, self.model)
        if why is None:
            return False
        self._lr_scale *= 0.5
        self._rollback(f"{when or 'at the end of the return phase'} (step {cycle.phase_step}): "
                       f"{why}; the next cycle's extension lr is halved (scale "
                       f"{self._lr_scale:g})")
        return True

    def _end_mid_step(self, reason: str) -> None:
        """Resolved between the trainer's ``optimizer.step()`` and the step's end (weights loaded,
        or ``resolve`` called, from a callback that runs before morphc's ``on_step_end``): the
        cycle has taken this step but not yet seen its loss. Plain training takes its step on the
        step's micro-batches first and its state is handed over — where a run without morphc is
        now — instead of a state one step behind (or, for the cycle's first step, from before
        it). ``after_step`` then only moves the count."""
        self._ended_early = True
        inputs, self._inputs = self._inputs, []
        with torch.enable_grad():
            self._step_beside(inputs)
        self._rollback(f"{reason} between an optimizer step of the {self._cycle.phase} phase "
                       "and the step's end: its loss is not known yet to judge it by")

    def _withdraw(self, reason: str) -> None:
        """A cycle resolved at the step it started (a checkpoint or an evaluation was due
        there): nothing has trained yet, so it is taken back, bit for bit, without counting as
        a miss or resetting the trigger — a trigger that still fires starts it at the next step
        (a reset made a Plateau wait two windows of fresh losses)."""
        snapshot = self._cycle.snapshot
        self._end_cycle(keep_watch=True)
        snapshot.restore(self.model, self.optimizer)
        self._event("rollback", reason=f"{reason} at the step the cycle started: withdrawn "
                    "before its first step", to="before", withdrawn=True)

    def _end_cycle(self, keep_watch: bool = False) -> None:
        self._restore_free_buffers()
        cycle, self._cycle = self._cycle, None
        self._beside, self._inputs = None, []
        if cycle.group.attached:
            cycle.group.detach()
        cycle.ext.remove()
        if not keep_watch:
            self.trigger.reset()
            self._plain.clear()

    def _rollback(self, reason: str, exc: BaseException | None = None, *,
                  measures: dict | None = None, backoff: bool = False) -> None:
        """Hand over plain training's state from beside the cycle (where the user would be
        now without morphc), or without one restore the user's weights, buffers and optimizer
        state from before the extension, bit for bit."""
        snapshot, beside = self._cycle.snapshot, self._beside
        self._end_cycle()
        if beside is not None:
            beside.hand_over(self.optimizer)
        else:
            snapshot.restore(self.model, self.optimizer)
        self.failures += 1
        self._event("rollback", reason=reason, to="plain" if beside is not None else "before",
                    **(measures or {}))
        if self.config.on_failure is OnFailure.RAISE and not backoff and beside is None:
            raise BypassError(f"{reason}. The model, its buffers and the optimizer state were "
                              "restored to their values before this cycle's extension.") from exc

    # -- plain training beside the cycle ---------------------------------------------------------
    def _step_beside(self, inputs: list) -> None:
        """Plain training's step on this step's micro-batches. A replay that fails (a
        ``training_step`` that needs the trainer's loop) ends plain training beside cycles for
        the run, with a warning: a miss then restores the state from before the cycle."""
        beside = self._beside
        if beside is None:
            return
        try:
            if not inputs:
                raise BypassError("no micro-batch was recorded for this step")
            with self._extension_off():
                beside.step(inputs, self._replay, self._step_groups,
                            self._clip or (lambda: None))
        except Exception as exc:
            self._beside = None
            self.config.shadow = False
            warnings.warn(f"morphc could not train plainly beside its cycle ({type(exc).__name__}: "
                          f"{exc}); a cycle that does not pay restores the state from before it "
                          "instead (its steps are lost). shadow=False silences this",
                          stacklevel=2)

    @contextlib.contextmanager
    def _extension_off(self):
        if self._cycle is None:          # on probation: the cycle is folded, nothing to turn off
            yield
            return
        ext = self._cycle.ext
        was, ext.active = ext.active, False
        try:
            yield
        finally:
            ext.active = was
