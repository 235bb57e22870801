"""How a cycle is judged: on what data, against what, and what a verdict does.

A cycle is kept only if the contracted model beats, on the same data (``eval_closure``, else the
closures of the last ``judge_batches`` steps), the model from before it by more than plain
training's recent pace — and plain training run beside it (:mod:`~morphc.runtime.shadow`). A
free phase that found nothing ends the cycle early. A verdict against a cycle hands over the
plain-training copy (or restores the state from before the cycle) and makes the trigger back
off. Mixed into
:class:`~morphc.runtime.cycle_runner.CycleRunner`, whose state it reads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from morphc.compiler.contract import contract
from morphc.compiler.deviation import deterministic
from morphc.errors import MorphcError
from morphc.runtime.config import Accept, OnFailure, ReturnMode
from morphc.runtime.cycle import Cycle, back_off
from morphc.runtime.outside_buffers import outside_buffers_kept
from morphc.runtime.shadow import Probation, plain_catches_up, plain_leads
from morphc.runtime.snapshot import model_structure
from morphc.runtime.steps import Closure
from morphc.runtime.user_edits import edited_since
from morphc.runtime.wrapping import all_reduce_mean


class RecentBatches:
    """The mean loss of the last steps' closures: the data verdicts compare models on when the
    user gave no ``eval_closure``. Closures over one full batch give one value, returned as
    it is (a verdict on full-batch training is exactly what it was on one closure)."""

    def __init__(self, closures: tuple[Closure, ...]):
        self.closures = closures

    def __call__(self, model: nn.Module) -> float:
        values = [_as_float(closure(model)) for closure in self.closures]
        if all(v == values[0] for v in values):
            return values[0]
        return math.fsum(values) / len(values)


class Verdicts:
    """The acceptance side of a Bypass cycle."""

    _judge_with_grad = False   # set once the closure turned out to differentiate inside
    _judged_data: RecentBatches | None = None

    def _judged_on(self, closure: Closure | None) -> Closure | None:
        """What verdicts compare models on: ``eval_closure`` if given, else the closures of
        the last ``judge_batches`` steps of the cycle or probation in flight (``closure``, the
        current step's, among them). On one minibatch — an epoch's last may hold a handful of
        samples — which of two close runs is kept would be decided by that batch's noise."""
        if self.config.eval_closure is not None or closure is None:
            return self.config.eval_closure or closure
        recent = tuple(self._recent_closures)
        if not recent or recent[-1] is not closure:
            recent = (closure,)
        if len(recent) == 1:
            return closure
        cached = self._judged_data
        if cached is None or len(cached.closures) != len(recent) or \
                any(a is not b for a, b in zip(cached.closures, recent, strict=True)):
            self._judged_data = cached = RecentBatches(recent)
        return cached

    def _judge_replays(self, closure: Closure) -> bool:
        """Whether the acceptance test can compare models on the same data: it calls
        ``eval_closure`` (else the closure) again on the model before and after a cycle. A
        closure that draws the next batch (or a random augmentation) on each call gives two
        values on one model, and cycles would be kept or rolled back by the batches drawn.
        Two calls on the model as it is decide, before anything changes."""
        probe = self.config.eval_closure or closure
        if self.config.accept == Accept.ALWAYS:
            return True
        first, second = (self._loss_without_trace(probe, self._user_model) for _ in range(2))
        if first == second or math.isclose(first, second, rel_tol=1e-5) or \
                math.isnan(first) and math.isnan(second):
            return True
        which = "eval_closure" if self.config.eval_closure else "the closure"
        self._give_up(f"{which} gave two different losses on the same model ({first:.6g}, "
                      f"{second:.6g}): it draws new data on each call, so models before and "
                      "after a cycle cannot be compared on the same data",
                      "Pass eval_closure= a closure over fixed data (a held-out batch), or build "
                      "the closure over the step's batch: for x, y in loader: "
                      "bp.step(lambda m: loss_fn(m(x), y))")
        return False

    def _miss(self, before: float = math.nan, after: float = math.nan,
              cycle: Cycle | None = None) -> None:
        """A cycle that did not pay: the trigger backs off (:func:`back_off`), for longer
        after a ``cycle`` whose free phase grew."""
        spent = 0 if cycle is None else self.step_count - cycle.started_at
        self._unpaid, self._quiet_until = back_off(
            self.config, self.trigger, step=self.step_count, misses=self._unpaid,
            quiet=self._quiet_until, paid=False, before=before, after=after, spent=spent)

    def _free_losses(self, cycle: Cycle, probe: Closure) -> list[float]:
        """The extended model's loss on ``probe`` at s = 1 and at s = 0 — measured once per
        step: a growing free phase's last measure is also the found-nothing test's."""
        ext, key = cycle.ext, (self.step_count, id(probe))
        if cycle.free_measured is not None and cycle.free_measured[0] == key:
            return list(cycle.free_measured[1])
        homotopy, losses = ext.homotopy, []
        try:
            for s in (1.0, 0.0):
                ext.set_homotopy(s)
                losses.append(self._loss_without_trace(probe, ext))
        finally:
            ext.set_homotopy(homotopy)
        cycle.free_measured = (key, losses)
        return losses

    def _free_phase_grows(self, cycle: Cycle, closure: Closure) -> None:
        """After a free step: every ``free_window`` steps counted back from the free phase's end
        (an odd ``bypass_steps`` is no multiple of the window: counted from its start, no
        measurement fell on its last step and it never grew), measure the free phase (the
        better of s = 1 and s = 0 on the evaluation data); when it is due to end but still
        leaving the plateau by the trigger's own measure over the last window, let it go on for
        another window — up to ``max_bypass_steps`` and never past the run's budget. Only
        while the last cycle paid: after a miss, cycles keep their fixed length until one
        pays, so a run whose cycles cannot pay does not buy the longest ones."""
        cfg = self.config
        cap, done, window = cfg.free_steps_cap, cycle.phase_step + 1, cycle.free_window
        probe = self._judged_on(closure)
        escaped = getattr(self.trigger, "escaped", None)
        if cap <= cfg.bypass_steps or not callable(escaped) or probe is None or \
                cfg.accept == Accept.ALWAYS or self._unpaid or (cycle.free_len - done) % window:
            return
        free = min((v for v in self._free_losses(cycle, probe) if math.isfinite(v)),
                   default=math.nan)
        cycle.free_marks.append(free)
        if done < cycle.free_len or len(cycle.free_marks) < 2 or cycle.free_len + window > cap:
            return
        if cfg.total_steps is not None and \
                self.step_count + window + cycle.return_len > cfg.total_steps:
            return
        if math.isfinite(free) and escaped(cycle.free_marks[-2], free, window):
            cycle.free_len += window

    def _free_phase_found_nothing(self, cycle: Cycle, closure: Closure) -> bool:
        """At the end of the free phase: the extended model (s = 1 and s = 0) and the model from
        before the cycle on the same data; when the free phase found nothing, roll back now
        (:meth:`Cycle.found_something`) instead of running the return phase to learn it."""
        probe = self._judged_on(closure)
        if probe is None or self.config.accept == Accept.ALWAYS:
            return False
        losses = self._free_losses(cycle, probe)
        before = self._loss_before_cycle(cycle, probe)
        free = min((v for v in losses if math.isfinite(v)), default=math.nan)
        if cycle.found_something(before, free, self.trigger):
            return False
        self._miss(before, free, cycle)
        self._rollback(f"the free phase found nothing: loss {free:.4g} (the better of s = 1 "
                       f"and s = 0) vs {before:.4g} before the cycle; the return was skipped",
                       measures={"loss_before": before, "loss_free": losses[0],
                                 "loss_after": None, "survival": None, "snap_change": None,
                                 "loss_plain": self._shadow_loss(cycle, probe)},
                       verdict=True)
        return True

    def _fault(self, cycle: Cycle, closure: Closure, reason: str,
               exc: BaseException | None = None) -> torch.Tensor:
        """A cycle step failed: roll the cycle back. When the plain-training copy already took
        this batch's step (:meth:`_steps_beside_shadow`), hand its state over — the user is where
        plain training is, and the cycle's steps are not lost; otherwise restore the state from
        before the cycle (or raise, with ``on_failure="raise"``) and train the batch plainly."""
        plain = cycle.plain_loss
        if plain is None or self.config.on_failure is OnFailure.RAISE:
            self._rollback(reason, exc)
            return self._train_step(closure)
        self._rollback(reason, exc, to_plain=True)
        self._count_step(float(plain))
        return plain

    def _close_cycle(self, closure: Closure | None, finishing: bool = False) -> None:
        """return → contract → accept or roll back. ``finishing``: a cycle cut short by
        ``finish()`` snaps onto C (measured) instead of training further."""
        cycle = self._cycle
        ext = cycle.ext
        residual = ext.constraint_residual()
        # anneal and project end exactly on C: a residual there is a bug, rolled back, never
        # folded; a penalty return, a zero-step return or finish() snap onto C, measured.
        force = finishing or cycle.return_len == 0 or \
            self.config.return_mode is ReturnMode.PENALTY
        try:
            contract(ext, force=force)
        except MorphcError as exc:
            self._rollback(f"contraction failed: {exc}", exc)
            return
        snap = ext.contraction_report.snap_change
        limit = self.config.max_snap_change
        if limit is not None and snap is not None and not snap <= limit:
            self._rollback(f"the snap onto C changed the output by {snap:.3g} > "
                           f"max_snap_change={limit:g}; use more return_steps")
            return
        before, after = self._evaluate_both(cycle, closure)
        plain = self._shadow_loss(cycle, self._judged_on(closure))
        if not cycle.pays(before, after, plain):
            self._miss(before, after, cycle)
            self._rollback(f"the cycle did not pay: loss {after:.4g} after vs {before:.4g} "
                           f"before (needed < {cycle.needed(before, plain):.4g}"
                           + ("" if plain is None else f"; plain training: {plain:.4g}") + ")",
                           measures={**self._measures(cycle, before, after, snap),
                                     "loss_plain": plain},
                           verdict=True)
            return
        self._unpaid, self._quiet_until = back_off(
            self.config, self.trigger, step=self.step_count, misses=self._unpaid,
            quiet=self._quiet_until, paid=True, before=before, after=after)
        self._detach()
        self.cycle += 1
        if not finishing:
            self._start_probation(cycle, None if plain is None else plain - after)
        self._event("contract", residual=residual, deviation=ext.contraction_report.deviation,
                    sites=ext.extension_config.sites, finishing=finishing, loss_plain=plain,
                    **self._measures(cycle, before, after, snap))

    # -- probation: plain training goes on beside a kept cycle's run for a while --------------
    def _start_probation(self, cycle: Cycle, lead: float | None) -> None:
        """A kept cycle beat plain training at its end (by ``lead``); but plain training may
        have been about to leave a plateau the cycle left for a worse basin (XOR, parity: a
        cycle kept at the 0.125 minimum while plain training went on to solve it). So the
        shadow goes on for ``probation_steps`` — longer while it is catching up
        (:meth:`_end_probation`); no cycle starts meanwhile; then the better run is kept."""
        length = self.config.probation_len
        if cycle.shadow is not None and length > 0:
            self._probation = Probation(cycle.shadow, self.step_count + length, lead)
            cycle.shadow.keep_outside = not self.wrapping.compile   # the run's step moves them

    def _step_on_probation(self, closure: Closure) -> torch.Tensor:
        """The shadow's plain step, then the user's (its RNG draws from a fork, as in a
        cycle); at the end of the probation, the verdict. Returns plain training's loss, as a
        cycle step does: what the user's scheduler sees is what it sees without Bypass."""
        shadow = self._probation.shadow
        edited = edited_since(self._weight_versions)
        # a mode is no change here: the copy takes the user's modes before each step
        if edited or not shadow.follows(self.optimizer) or \
                model_structure(self._user_model)[0] != shadow.structure[0]:   # keep ours
            self._probation = None
            self._event("probation", loss_after=None, loss_plain=None, to="cycle",
                        reason="plain training beside the run cannot follow the optimizer's or "
                               "the model's change (a group, a dtype, a device, a layer, or "
                               "weights edited between steps)")
            if edited:
                self._warn_edited()
            return self._train_step(closure)
        try:
            plain = shadow.step(closure, self.optimizer, self.config.max_grad_norm)
            with shadow.rng_apart():
                self._train_step(closure)
        except BaseException:         # the copy may have moved where the run did not: it is
            if not shadow.skipped:    # never handed over then; the user's run is kept. One
                self._probation = None    # that skipped a non-finite batch (on_failure="raise"
            raise                     # raises for the run's skip) is still in step: go on
        if self.step_count >= self._probation.until:
            self._end_probation(closure)
        return plain

    def _end_probation(self, closure: Closure | None, final: bool = False) -> None:
        """Keep the cycle's run unless plain training beside it is now better on the same data
        (``eval_closure``, else the last steps' batches); then hand plain training's state over:
        the run is where it would be had the cycle never happened. If plain training is still
        behind but closed the gap fast enough to overtake within another probation, the
        probation goes on (not at ``final``, :meth:`finish`)."""
        probation, self._probation = self._probation, None
        shadow = probation.shadow
        probe = self._judged_on(closure)
        if probe is None:
            return
        if not shadow.follows(self.optimizer) or \
                model_structure(self._user_model)[0] != shadow.structure[0]:
            # converted or rebuilt since the last step (a load resolving the probation first,
            # finish()): plain training's copy cannot run the batches, nor be handed over
            self._event("probation", loss_after=None, loss_plain=None, to="cycle",
                        reason="plain training beside the run cannot follow the model's change")
            return
        shadow.follow_modes()                # judged from the modes the user's model is in
        mine = self._loss_without_trace(probe, self._user_model)
        with shadow.plain_values():
            plain = self._loss_without_trace(probe, shadow.model)
        to_plain = plain_leads(mine, plain)
        if to_plain:                  # the kept cycle did not pay in the end: a miss
            shadow.hand_over(self._user_model, self.optimizer)
            self.trigger.reset()
            self._miss()
        elif not final and plain_catches_up(probation.lead, plain - mine):
            self._probation = Probation(shadow, self.step_count + self.config.probation_len,
                                        plain - mine)
            self._event("probation", loss_after=mine, loss_plain=plain, to="longer")
            return
        self._event("probation", loss_after=mine, loss_plain=plain,
                    to="plain" if to_plain else "cycle")

    def _measures(self, cycle: Cycle, before: float, after: float, snap) -> dict:
        return {"loss_before": before, "loss_free": cycle.loss_free, "loss_after": after,
                "survival": cycle.survival(before, after), "snap_change": snap}

    def _evaluate_both(self, cycle: Cycle, closure: Closure | None) -> tuple[float, float]:
        """The contracted model and the model from before the cycle, on the same data:
        ``eval_closure`` if given, else the last steps' closures (:meth:`_judged_on`)."""
        probe = self._judged_on(closure)
        if probe is None:
            return math.nan, math.nan
        after = self._loss_without_trace(probe, self._user_model)
        return self._loss_before_cycle(cycle, probe), after

    def _shadow_loss(self, cycle: Cycle, probe: Closure | None) -> float | None:
        """``probe`` on the shadow: where plain training would be now (None: no shadow)."""
        if cycle.shadow is None or probe is None:
            return None
        with cycle.shadow.plain_values():
            return self._loss_without_trace(probe, cycle.shadow.model)

    def _loss_before_cycle(self, cycle: Cycle, probe: Closure) -> float:
        """``probe`` on the user's model with the weights from before the extension."""
        model = self._user_model
        current = cycle.snapshot.swap_params(model)
        try:
            return self._loss_without_trace(probe, model)
        finally:
            cycle.snapshot.put_back(model, current)

    def _loss_without_trace(self, probe: Closure, model: nn.Module, reduce: bool = True) -> float:
        """``probe(model)`` as a number to minimise (negated for a ``maximize=True`` optimizer),
        leaving the model, its buffers and the RNG as they were. Under no_grad (an evaluation
        keeps no graph), unless the closure differentiates inside (a gradient penalty, a
        physics-informed residual): autograd then says a tensor does not require grad, and from
        then on this run judges with autograd on, as in a training step."""
        try:     # modules run outside ``model`` (a head with BatchNorm) are left as found too
            with outside_buffers_kept(model, enabled=not self.wrapping.compile):
                value = _judged(probe, model, self._judge_with_grad)
        except RuntimeError as exc:
            if self._judge_with_grad or "require grad" not in str(exc):
                raise
            self._judge_with_grad = True
            with outside_buffers_kept(model, enabled=not self.wrapping.compile):
                value = _judged(probe, model, True)
        value *= self._sign
        if self.distributed and reduce:
            value = all_reduce_mean(value, next(model.parameters()).device)
        return value


def _judged(probe: Closure, model: nn.Module, with_grad: bool) -> float:
    """``probe(model)`` as a float, deterministically, with autograd on or off."""
    with deterministic(model), torch.set_grad_enabled(with_grad):
        return _as_float(probe(model))


def _as_float(loss) -> float:
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
