"""Probation after a kept trainer cycle, as :class:`morphc.Bypass` has one.

A cycle is kept when it beats plain training beside it *at its end*; on a plateau plain training
is about to leave that can divert the run into a worse minimum (measured: a Lightning
saturated-MLP run ended +0.8 % worse than plain training after a correctly kept cycle). So after
a kept cycle the :class:`~morphc.integrations.plain.PlainBeside` goes on taking plain training's
step on each trainer step's replayed micro-batches for ``probation_steps`` (default 2 × the
cycle's length); then both are judged on the cycle verdict's data — the mean training loss of
the run's last ``window`` steps vs plain training's on the same steps — and if plain training is
better its state (weights, buffers, optimizer state) is handed over. If plain training is behind
but closed the gap by more than what is left, the probation goes on for another
``probation_steps`` (:func:`~morphc.runtime.shadow.plain_catches_up`). No cycle starts meanwhile.
Weights edited in place between steps (a callback's clamp or ``copy_``; a ``load_state_dict``
resolves the probation first instead) end the probation keeping the run: plain training's copy
never got the edit, and handing it over would undo it (as ``morphc.Bypass`` does).

Cost while a probation runs, as during a cycle: one more copy of the parameters, buffers and
optimizer state, each step's micro-batches held until the step's end, and one more
forward/backward/optimizer step per trainer step (the replay) — so about twice a plain step's
time for ``probation_steps`` steps after each kept cycle (more while plain training closes in).

Whatever resolves a cycle — a checkpoint or an evaluation, the end of training, weights loaded
into the model, :meth:`~morphc.integrations.core.TrainerBypass.resolve` — judges a probation in
flight at once (never longer), so a checkpoint never holds a state a later hand-over replaces.
"""

from __future__ import annotations

import dataclasses
import warnings

from morphc.integrations.plain import PlainBeside
from morphc.runtime.cycle import back_off
from morphc.runtime.shadow import plain_catches_up, plain_leads
from morphc.runtime.user_edits import edited_since, weight_versions

EDITED = ("the model's weights were changed in place between the trainer's optimizer steps while "
          "plain training ran beside a kept cycle's run (its probation: a callback's clamp, "
          "projection or copy_ into a weight): plain training cannot follow such edits, so the "
          "probation ends here and your run is kept. To keep the guarantee, constrain weights "
          "inside the model (torch.nn.utils.parametrize), or load them with load_state_dict, "
          "which morphc sees")


@dataclasses.dataclass
class TrainerProbation:
    """Plain training beside a kept cycle's run, the step its verdict is due, by how much the
    run led when it began (None: not measured), and the (run, plain) loss of each step judged
    (from the cycle's last return steps on)."""

    beside: PlainBeside
    until: int
    lead: float | None
    pairs: list[tuple[float, float]]


class TrainerProbationSide:
    """The probation side of :class:`~morphc.integrations.core.TrainerBypass` (mixed in)."""

    @property
    def on_probation(self) -> bool:
        """Whether plain training still runs beside a kept cycle's run."""
        return self._probation is not None

    def _start_probation(self, beside: PlainBeside | None, run: list[float]) -> None:
        """After a kept cycle that ended at a step (not resolved early): keep its plain
        training beside the run, seeded with the verdict's (run, plain) pairs."""
        length = self.config.probation_len
        if beside is None or length <= 0 or not run or len(beside.losses) < len(run):
            return
        pairs = list(zip(run, beside.losses[-len(run):], strict=True))
        self._probation = TrainerProbation(beside, self.step_count + length,
                                           self._lead(pairs), pairs)
        self._beside, self._inputs = beside, []

    def _lead(self, pairs: list[tuple[float, float]]) -> float:
        """Plain training's mean loss minus the run's over the last ``window`` steps."""
        recent = pairs[-self.window:]
        return (sum(p for _, p in recent) - sum(r for r, _ in recent)) / len(recent)

    def _count_versions(self) -> None:
        """On probation, each weight's version now: what the next check compares against (the
        optimizer's step, the fold and plain training's replay change them; a user's edit
        between those points is what :meth:`_ended_by_edit` looks for)."""
        self._versions = None if self._probation is None else weight_versions(self.model)

    def _ended_by_edit(self) -> bool:
        """Weights edited in place since :meth:`_count_versions`: plain training beside the run
        never got the edit, so handing its state over would undo it. The probation ends, the
        run is kept (warned once per run)."""
        if self._probation is None or not edited_since(self._versions):
            return False
        self._probation, self._beside, self._inputs, self._versions = None, None, [], None
        self._event("probation", loss_after=None, loss_plain=None, to="cycle",
                    reason="weights edited in place between steps")
        if not self._warned_edited:
            self._warned_edited = True
            warnings.warn(EDITED, stacklevel=4)
        return True

    def _probation_step(self, value: float, inputs: list) -> None:
        """Plain training's step beside the run, the run's own (the trigger watches, no cycle
        starts), and at the end of the probation its verdict."""
        if self._ended_by_edit():
            self._plain_step(value)
            return
        probation = self._probation
        self._step_beside(inputs)
        if self._beside is None:
            self._replay_failed()
        else:
            probation.pairs.append((value, probation.beside.losses[-1]))
        self._plain_step(value)
        if self._probation is not None and self.step_count >= probation.until:
            self._end_probation()

    def _replay_failed(self) -> None:
        """Plain training beside the run could not be replayed (``_step_beside`` warned):
        the probation ends and the run is kept."""
        self._probation = None
        self._event("probation", loss_after=None, loss_plain=None, to="cycle",
                    reason="plain training beside the run could not be replayed")

    def _resolve_probation(self, reason: str) -> None:
        """Judge a probation in flight now. Between the trainer's ``optimizer.step()`` and the
        step's end (a load from a callback) plain training takes that step first, so a
        hand-over is where a run without morphc is now, not one step behind."""
        if self._ended_by_edit():
            return
        if self._stepped:
            inputs, self._inputs = self._inputs, []
            self._step_beside(inputs)
            if self._beside is None:
                self._replay_failed()
                return
            value = self._pending_value() if len(self._pending) == len(inputs) else None
            if value is not None:
                self._probation.pairs.append((value, self._probation.beside.losses[-1]))
            else:                         # the run's loss is not known yet: judge without
                self._probation.beside.losses.pop()    # plain training's for this step too
        if self._end_probation(reason) and self._stepped:
            self._ended_early = True      # after_step only moves the count

    def _end_probation(self, reason: str | None = None) -> bool:
        """Keep the run unless plain training beside it is better on the same steps; then hand
        its state over. Plain training behind but closing in fast enough to overtake within
        another probation goes on (not when resolved: ``reason``). Returns whether it was
        handed over."""
        probation, self._probation = self._probation, None
        beside = probation.beside
        recent = probation.pairs[-self.window:]
        mine = sum(r for r, _ in recent) / len(recent)
        plain = sum(p for _, p in recent) / len(recent)
        to_plain = plain_leads(mine, plain)
        if not to_plain and reason is None and plain_catches_up(probation.lead, plain - mine):
            self._probation = TrainerProbation(beside, self.step_count + self.config.probation_len,
                                               plain - mine, probation.pairs)
            self._event("probation", loss_after=mine, loss_plain=plain, to="longer")
            return False
        self._beside, self._inputs = None, []
        if to_plain:                      # the kept cycle did not pay in the end: a miss
            beside.hand_over(self.optimizer)
            self.trigger.reset()
            self._plain.clear()
            self._unpaid, self._quiet_until = back_off(
                self.config, self.trigger, step=self.step_count, misses=self._unpaid,
                quiet=self._quiet_until, paid=False, before=plain, after=mine)
        self._event("probation", loss_after=mine, loss_plain=plain,
                    to="plain" if to_plain else "cycle", reason=reason, window=len(recent))
        return to_plain
