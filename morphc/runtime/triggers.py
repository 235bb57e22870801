"""Stagnation triggers: when should Bypass extend the model?

A trigger watches one scalar per training step and says "now". Bypass calls
``trigger.update(loss, step=..., grad_norm=...)`` once per step of the normal (unextended) phase
and ``trigger.reset()`` after every extend/contract cycle, so a trigger only ever looks at the
model it will extend. Every built-in trigger is O(1) per step and keeps its state as plain numbers
and lists (``state_dict()``), so a checkpoint loads with ``torch.load(weights_only=True)``.

Write your own by subclassing :class:`Trigger` and overriding ``update`` (and ``reset`` /
``state_dict`` / ``load_state_dict`` if it keeps state)::

    class EveryEpoch(morphc.Trigger):
        def __init__(self, steps_per_epoch):
            self.steps_per_epoch = steps_per_epoch

        def update(self, loss, *, step, grad_norm=None):
            return step > 0 and step % self.steps_per_epoch == 0

Triggers combine with ``|`` (any fires) and ``&`` (all fire on the same step).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Iterable

from morphc.errors import BypassError


class InvalidTrigger(BypassError, ValueError):
    """A trigger setting out of range: a morphc error, and a ValueError as it always was."""


def _positive_int(value, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InvalidTrigger(f"{what} must be an int >= {least}, got {value!r}")
    return int(value)


def _non_negative(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value < 0:
        raise InvalidTrigger(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


class Trigger:
    """Base class / protocol of a stagnation trigger.

    ``needs_grad_norm``: whether ``update`` reads ``grad_norm``. True by default, so a trigger
    that does not say gets the gradient norm of the user's parameters after every backward; set
    it to False when ``update`` ignores it, and Bypass checks the gradients for NaN/Inf with one
    fused kernel instead of a norm (``grad_norm`` is then ``None``) — on a small model the norm
    costs more than the rest of what Bypass adds to a step. The trainer integrations, where the
    trainer owns the backward, always pass ``None``.
    """

    needs_grad_norm = True

    def update(self, loss: float, *, step: int, grad_norm: float | None = None) -> bool:
        """Observe one training step; return True to start a bypass cycle now."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(loss, *, step, "
                                  "grad_norm=None) -> bool")

    def reset(self) -> None:
        """Forget what was observed (called after each cycle: the model has changed)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def __or__(self, other: Trigger) -> AnyOf:
        return AnyOf(self, other)

    def __and__(self, other: Trigger) -> AllOf:
        return AllOf(self, other)


class _Combined(Trigger):
    """Several triggers observed together; every member sees every step."""

    def __init__(self, *triggers: Trigger) -> None:
        wrong = [type(t).__name__ for t in triggers if not isinstance(t, Trigger)]
        if wrong or not triggers:
            raise InvalidTrigger(f"{type(self).__name__} combines morphc.Trigger objects (at "
                                 f"least one), got {wrong or 'none'}")
        self.triggers = list(triggers)
        self.needs_grad_norm = any(t.needs_grad_norm for t in self.triggers)

    def _votes(self, loss, step, grad_norm) -> list[bool]:
        return [bool(t.update(loss, step=step, grad_norm=grad_norm)) for t in self.triggers]

    def reset(self) -> None:
        for t in self.triggers:
            t.reset()

    def state_dict(self) -> dict:
        return {"triggers": [t.state_dict() for t in self.triggers]}

    def load_state_dict(self, state: dict) -> None:
        for t, s in zip(self.triggers, state["triggers"], strict=True):
            t.load_state_dict(s)


class AnyOf(_Combined):
    """Fires when any member fires (``a | b``)."""

    def update(self, loss, *, step, grad_norm=None) -> bool:
        return any(self._votes(loss, step, grad_norm))


class AllOf(_Combined):
    """Fires when every member fires on the same step (``a & b``)."""

    def update(self, loss, *, step, grad_norm=None) -> bool:
        return all(self._votes(loss, step, grad_norm))


class Plateau(Trigger):
    """Fires when the loss has stopped improving — beyond doubt, noise included.

    Compares the mean loss of the last ``window`` steps with the mean of the ``window`` steps
    before them. It fires when even an optimistic estimate of the improvement — the measured
    gain plus ``confidence`` standard errors of the difference of the two means — is below
    ``threshold`` (relative to the current mean). Full-batch training on a plateau fires after
    two windows; noisy minibatch training that still improves, or whose noise hides whether it
    does, stays quiet. A loss *spike* does not fire either: when the newer window's mean is up
    by more than ``threshold`` and its spread is over ``spike_spread`` times the older window's,
    a step threw training off and it is recovering — unstable, not stuck — and it stays quiet
    until the spike has left both windows (measured: momentum SGD on a deep tanh net fired on
    40× spikes, and cycles started there were accepted against the spiked loss, then trailed
    plain training). Running sums make it O(1) per step. Losses below ``floor`` never fire (a
    converged model is not stuck; by default no loss is too low: a negative log-likelihood can
    plateau below 0); non-finite losses are ignored.

    >>> t = Plateau(window=3, threshold=1e-2)
    >>> [t.update(1.0, step=i) for i in range(7)]
    [False, False, False, False, False, True, True]
    """

    needs_grad_norm = False
    spike_spread = 3.0   # noise leaves two windows' spreads alike: F(99, 99) > 9 has p ≈ 5e-24

    def __init__(self, window: int = 100, threshold: float = 1e-3, confidence: float = 2.0,
                 floor: float = -math.inf) -> None:
        self.window = _positive_int(window, "Plateau window (steps)", 2)
        self.threshold = _non_negative(threshold, "Plateau threshold")
        self.confidence = _non_negative(confidence, "Plateau confidence")
        if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or math.isnan(floor):
            raise InvalidTrigger(f"Plateau floor must be a number, got {floor!r}")
        self.floor = float(floor)
        self.reset()

    def reset(self) -> None:
        self._losses: deque[float] = deque(maxlen=2 * self.window)
        self._sums = [0.0, 0.0, 0.0, 0.0]   # Σ, Σ² of the older window, then the newer one
        self._spike_hold = 0                # steps until a spike seen has left both windows

    def _push(self, loss: float) -> None:
        w = self.window
        if len(self._losses) == 2 * w:                  # the oldest leaves the older window
            old = self._losses[0]
            self._sums[0] -= old
            self._sums[1] -= old * old
        if len(self._losses) >= w:                      # the newer window's oldest moves over
            mid = self._losses[-w]
            self._sums[0] += mid
            self._sums[1] += mid * mid
            self._sums[2] -= mid
            self._sums[3] -= mid * mid
        self._losses.append(loss)
        self._sums[2] += loss
        self._sums[3] += loss * loss

    def _windows(self) -> tuple[float, float, float, float] | None:
        """(older mean, newer mean, older variance, newer variance) once both are full."""
        if len(self._losses) < 2 * self.window:
            return None
        w = self.window
        older, newer = self._sums[0] / w, self._sums[2] / w
        var_old = max(self._sums[1] / w - older * older, 0.0) * w / (w - 1)
        var_new = max(self._sums[3] / w - newer * newer, 0.0) * w / (w - 1)
        return older, newer, var_old, var_new

    def _stats(self) -> tuple[float, float, float] | None:
        """(older mean, newer mean, standard error of their difference) once both are full."""
        windows = self._windows()
        if windows is None:
            return None
        older, newer, var_old, var_new = windows
        return older, newer, math.sqrt((var_old + var_new) / self.window)

    def improvement(self) -> float | None:
        """Relative improvement of the mean loss over one window (None until two are full)."""
        stats = self._stats()
        if stats is None:
            return None
        older, newer, _ = stats
        return (older - newer) / max(abs(newer), 1e-30)

    def pace(self) -> float:
        """Plain training's recent relative gain per step (≥ 0): what a cycle must beat."""
        gain = self.improvement()
        return max(gain, 0.0) / self.window if gain is not None else 0.0

    def escaped(self, before: float, after: float, steps: int) -> bool:
        """Did a cycle of ``steps`` steps that took the loss from ``before`` to ``after`` leave
        the plateau, by this trigger's own measure? (Its relative gain is at least what would
        not count as stagnation over that many steps.) A kept cycle that did not escape makes
        Bypass back off as after one that did not pay."""
        gain = (before - after) / max(abs(after), 1e-30)
        return gain >= self.threshold * steps / self.window

    def update(self, loss, *, step, grad_norm=None) -> bool:
        loss = float(loss)
        if not math.isfinite(loss):
            return False
        self._push(loss)
        windows = self._windows()
        if windows is None:
            return False
        older, newer, var_old, var_new = windows
        limit = self.threshold * abs(newer)
        if newer - older > limit and var_new > self.spike_spread ** 2 * var_old:
            self._spike_hold = 2 * self.window            # a spike: recovering, not stuck
        if self._spike_hold > 0:
            self._spike_hold -= 1
            return False
        if newer < self.floor:
            return False
        optimistic = (older - newer) + self.confidence * math.sqrt((var_old + var_new) /
                                                                   self.window)
        return optimistic < limit

    def state_dict(self) -> dict:
        return {"losses": list(self._losses), "spike_hold": self._spike_hold}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for value in state["losses"]:
            self._push(float(value))
        self._spike_hold = int(state.get("spike_hold", 0))


class GradientNorm(Trigger):
    """Fires when the smoothed gradient norm stays below ``threshold`` for ``patience`` steps.

    Near a stationary point the gradient vanishes while the loss may still be far from good:
    that is what this trigger looks for. With ``relative=True`` the threshold is a fraction of
    the largest smoothed norm seen since the last reset (scale-free, useful when the gradient's
    size is unknown in advance).
    """

    needs_grad_norm = True

    def __init__(self, threshold: float = 1e-3, patience: int = 20, smoothing: float = 0.9,
                 relative: bool = False) -> None:
        self.threshold = _non_negative(threshold, "GradientNorm threshold")
        self.patience = _positive_int(patience, "GradientNorm patience", 1)
        if not _non_negative(smoothing, "GradientNorm smoothing") < 1:
            raise InvalidTrigger(f"GradientNorm smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing, self.relative = float(smoothing), bool(relative)
        self.reset()

    def reset(self) -> None:
        self._ema, self._count, self._below, self._peak = 0.0, 0, 0, 0.0

    def update(self, loss, *, step, grad_norm=None) -> bool:
        if grad_norm is None:
            raise InvalidTrigger("GradientNorm needs grad_norm; Bypass passes it because "
                             "needs_grad_norm is True — pass it when calling update yourself")
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            return False
        self._count += 1
        self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * grad_norm
        smoothed = self._ema / (1.0 - self.smoothing ** self._count)
        self._peak = max(self._peak, smoothed)
        limit = self.threshold * self._peak if self.relative else self.threshold
        self._below = self._below + 1 if smoothed < limit else 0
        return self._below >= self.patience

    def state_dict(self) -> dict:
        return {"ema": self._ema, "count": self._count, "below": self._below, "peak": self._peak}

    def load_state_dict(self, state: dict) -> None:
        self._ema, self._count = float(state["ema"]), int(state["count"])
        self._below, self._peak = int(state["below"]), float(state["peak"])


class Schedule(Trigger):
    """Fires on a fixed schedule of global training steps, whatever the loss does.

    ``every=N`` fires at steps N, 2N, … (offset by ``start``); ``at=[...]`` at exactly those
    steps. A step that falls inside a bypass cycle (when the trigger is not consulted) fires
    at the first normal step after it, so no scheduled cycle is silently skipped.

    >>> t = Schedule(every=3)
    >>> [t.update(0.0, step=i) for i in range(1, 8)]
    [False, False, True, False, False, True, False]
    """

    needs_grad_norm = False

    def __init__(self, every: int | None = None, *, at: Iterable[int] = (), start: int = 0
                 ) -> None:
        if every is None and not at:
            raise InvalidTrigger("Schedule needs every=N or at=[steps]")
        if every is not None:
            _positive_int(every, "Schedule every", 1)
        self.every, self.start = every, int(start)
        self.at = sorted(int(s) for s in at)
        self._fired: int = 0   # how many scheduled steps were consumed

    def _due(self) -> int | None:
        """The next scheduled step not yet fired."""
        if self.at:
            return self.at[self._fired] if self._fired < len(self.at) else None
        return self.start + (self._fired + 1) * self.every

    def update(self, loss, *, step, grad_norm=None) -> bool:
        due = self._due()
        if due is None or step < due:
            return False
        while (nxt := self._due()) is not None and nxt <= step:
            self._fired += 1   # several due steps passed during a cycle: fire once
        return True

    def state_dict(self) -> dict:
        return {"fired": self._fired}

    def load_state_dict(self, state: dict) -> None:
        self._fired = int(state["fired"])
