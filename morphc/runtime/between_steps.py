"""What the user's model holds between ``bp.step`` calls, and what the user did to it there.

While plain training runs beside a cycle, the user's tensors show plain training's values
between steps and the cycle's are set aside (:meth:`Shadow.show_plain`): a validation metric, an
EMA, early stopping or a checkpoint the user takes there reads what it would read without Bypass,
so the decisions taken on it are plain training's too (the optimizer's per-parameter state
too: a checkpoint of model and optimizer is plain training's), and an edit (a clamp, a load into a
layer, statistics moved by a forward in training mode) is done to plain training, which keeps it.
On probation the run is the user's: edits there are seen by version counters
(:func:`~morphc.runtime.user_edits.edited_since`) and warned about. Mixed into
:class:`~morphc.Bypass`.
"""

from __future__ import annotations

import warnings

from morphc.runtime import user_edits as beside
from morphc.runtime.steps import grads_dropped, grads_left, watched_for_grads
from morphc.runtime.user_edits import edited_since


class BetweenSteps:
    """The model the user sees between steps (a mixin of :class:`~morphc.Bypass`)."""

    def _show_plain(self) -> None:
        """Between the steps of a cycle with plain training beside it, the user's model shows
        plain training's values (:meth:`Shadow.show_plain`)."""
        if self._cycle is not None and self._cycle.shadow is not None:
            self._cycle.shadow.show_plain(self.optimizer)

    def _show_run(self) -> bool:
        """The cycle's values back for a step or a verdict; whether plain's were showing (what
        the user changed meanwhile went to plain training: :meth:`Shadow.show_run`)."""
        shadow = None if self._cycle is None else self._cycle.shadow
        if shadow is None or not shadow.showing:
            return False
        shadow.show_run(self.optimizer, edited_since(self._weight_versions) or
                        edited_since(self._buffer_versions))
        self._count_versions()          # our copies are no edit of the user's
        return True

    def _run_state(self) -> dict:
        """The user's model's state_dict with the run's values where plain's are showing."""
        run = {} if self._cycle is None or self._cycle.shadow is None else \
            self._cycle.shadow.run_values()
        return {k: run.get(id(v), v) for k, v in self._own_state_dict().items()}

    def _own_state_dict(self) -> dict:
        """``state_dict()`` of the user's model for a checkpoint of Bypass, which holds the
        cycle too: no warning (:meth:`_state_dict_taken`)."""
        self._reading = True
        try:
            return self._user_model.state_dict()
        finally:
            self._reading = False

    def _state_dict_taken(self) -> None:
        """Once per run: a checkpoint of the model alone mid-cycle, with no plain training's
        values to show (:class:`~morphc.runtime.user_edits.WarnHalfCheckpoint`)."""
        if self._cycle is not None and self._cycle.shadow is None and \
                not getattr(self, "_reading", False) and not self._warned_half:
            self._warned_half = True
            self._warn(beside.HALF_CHECKPOINT)

    def _run_optimizer_state(self) -> dict:
        """The user's optimizer's state_dict with the run's state where plain's is showing."""
        shadow = None if self._cycle is None else self._cycle.shadow
        return self.optimizer.state_dict() if shadow is None else \
            shadow.run_optimizer_state(self.optimizer)

    def _count_versions(self) -> None:
        """While plain training runs beside the run, what the next step compares against."""
        now = self._cycle is not None or self._probation is not None
        self._weight_versions = beside.weight_versions(self._user_model) if now else None
        self._buffer_versions = beside.buffer_versions(self._user_model) if now else None

    def _warn_edited(self) -> None:
        """Once per run: weights edited between steps on probation end it, keeping the user's
        run (plain training beside it never got the edit)."""
        if not self._warned_edited:
            self._warned_edited = True
            self._warn(beside.EDITED)

    def _check_buffers(self) -> None:
        """Once per run: buffers moved between steps (a forward in training mode); warned only:
        restoring the state from before a cycle would cost more than one forward's statistics."""
        if not self._warned_buffers and edited_since(self._buffer_versions):
            self._warned_buffers = True
            self._warn(beside.BUFFERS_MOVED)

    def _warn_grads_dropped(self) -> None:
        """A backward between steps left gradients no optimizer step took (accumulation by
        hand): ``bp.step``'s ``zero_grad`` drops them as a plain loop's does — say so once."""
        if not self._warned_grads and grads_dropped(self._grads_left):
            self._warned_grads = True
            warnings.warn(
                "a backward ran between bp.step calls and left gradients on the model that no "
                "optimizer step took: bp.step does zero_grad, backward and the optimizer step, so "
                "it drops them, as a plain loop's zero_grad would. To accumulate micro-batches, "
                "do it inside one closure — lambda m: sum(F.mse_loss(m(x), y) for x, y in micro) "
                "/ len(micro) — one bp.step per optimizer step; for gradients not meant for a "
                "step (a diagnostic), call optimizer.zero_grad() before bp.step to silence this",
                UserWarning, stacklevel=3)

    def _note_grads_left(self) -> None:
        """What :meth:`_warn_grads_dropped` compares at the next step: the gradients as this
        step leaves them, on the parameters :func:`grads_left` reads (found again when a
        group grew or joined)."""
        groups = self.optimizer.param_groups
        sizes = tuple(len(g["params"]) for g in groups)
        if sizes != self._grads_watched[0]:
            self._grads_watched = (sizes, watched_for_grads(groups))
        self._grads_left = grads_left(self._grads_watched[1])
