"""The mechanics behind :class:`~morphc.Bypass`: the steps of a cycle, and its rollback.

Kept apart from the facade so that ``bypass.py`` reads as the user's API and this file as the
algorithm: train → trigger → extend → (joint) bypass → return → contract → accept or roll back.
Plain steps are :mod:`~morphc.runtime.plain_training`, a cycle's start
:mod:`~morphc.runtime.cycle_start`, its verdicts :mod:`~morphc.runtime.verdicts`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from morphc.errors import BypassError, MorphcError, ShapeError
from morphc.ir.python_numbers import BakedNumber
from morphc.runtime.config import FreePhase, OnFailure, Phase, ReturnMode
from morphc.runtime.cycle import Cycle
from morphc.runtime.cycle_start import CycleStart
from morphc.runtime.outside_buffers import outside_buffers_kept
from morphc.runtime.plain_training import PlainTraining
from morphc.runtime.snapshot import model_structure
from morphc.runtime.steps import (
    Closure,
    NonFinite,
    add_back,
    backward_checked,
    check_finite,
    clip,
    loss_of,
    no_backward_yet,
    put_back,
    set_aside,
)
from morphc.runtime.verdicts import Verdicts
from morphc.runtime.wrapping import all_reduce_grads


class CycleRunner(PlainTraining, CycleStart, Verdicts):
    """Mixin of :class:`~morphc.Bypass` holding its cycle logic (plain steps:
    :class:`~morphc.runtime.plain_training.PlainTraining`; a cycle's start:
    :class:`~morphc.runtime.cycle_start.CycleStart`; the verdicts on a cycle:
    :class:`~morphc.runtime.verdicts.Verdicts`)."""

    # -- a cycle's steps -----------------------------------------------------------------------
    def _cycle_step(self, closure: Closure) -> torch.Tensor:
        """One step of the extended model; any fault rolls the cycle back."""
        cycle = self._cycle
        if cycle.shadow is not None and not cycle.shadow.follows(self.optimizer):
            cycle.shadow = None                      # a param group added mid-cycle
        # with plain training's copy beside, a mode is judged as the closure leaves it
        # (:meth:`_modes_followed`): a validation's model.eval() between steps is no change
        if self._changed_since(cycle, modes=cycle.shadow is None):
            return self._train_step(closure)
        try:
            loss, value = self._steps_beside_shadow(cycle, closure)
        except NonFinite as exc:
            self._last_loss = exc.value
            self._lr_scale *= 0.5            # the extension's steps were too long: next cycle
            return self._fault(cycle, closure, f"{exc} at {cycle.phase} step {cycle.phase_step}"
                               f"; the next cycle's extension lr is halved (scale "
                               f"{self._lr_scale:g})")
        except ShapeError as exc:        # a batch the traced graph cannot take: train on
            what = "an input" if isinstance(exc, BakedNumber) else "a batch"
            self._warn(f"morphc.Bypass rolled a cycle back, the extended graph refused {what}: "
                       f"{exc}")
            return self._fault(cycle, closure, f"the extended graph refused {what}: {exc}")
        except MorphcError:          # a typed error in the closure (no_grad, a tuple): plain
            # training beside the cycle failed on it too, and is where plain training is — a
            # user who catches the error and trains on keeps the steps since the cycle began
            self._rollback("an error in the cycle", to_plain=cycle.plain_loss is None)
            raise
        except Exception as exc:
            reason = (f"the extended model failed at {cycle.phase} step {cycle.phase_step}: "
                      f"{type(exc).__name__}: {exc}")
            self._miss()            # the same closure / optimizer fails the next cycle too
            self._warn(f"morphc.Bypass rolled a cycle back, {reason}. During a cycle the "
                       "closure's module is the extended model (morphc.ExtendedModel): call it, "
                       "and read layers or weights from your own model (the Parameters are the "
                       "same objects); the optimizer must take the extension's parameters")
            return self._fault(cycle, closure, reason, exc)
        except BaseException:            # KeyboardInterrupt: leave the user whole, then stop
            # plain training's state: its copy either took this batch's step or, interrupted
            # itself, put everything back — a user who catches it and trains on keeps the
            # cycle's steps, as without Bypass
            self._rollback("interrupted", raises=False, to_plain=True)
            raise
        if cycle.shadow is not None and not self._modes_followed(cycle):
            self._count_step(float(cycle.plain_loss))
            return cycle.plain_loss
        self._count_step(value)
        was_free = cycle.phase is Phase.BYPASS
        with self._whole_on_error(cycle):
            if was_free:
                self._free_phase_grows(cycle, closure)
        cycle.advance()
        with self._whole_on_error(cycle):
            if was_free and cycle.phase is Phase.RETURN:
                cycle.loss_free = self._sign * value
                if self._free_phase_found_nothing(cycle, closure):
                    return self._reported(cycle, loss)
                self._event("return", mode=self.config.return_mode, steps=cycle.return_len,
                            free_steps=cycle.free_len)
            if cycle.return_done:
                self._close_cycle(closure)
        return self._reported(cycle, loss)

    @staticmethod
    def _reported(cycle: Cycle, loss: torch.Tensor) -> torch.Tensor:
        """What ``bp.step`` returns during a cycle: plain training's loss on the batch when it
        runs beside the cycle. A scheduler (``ReduceLROnPlateau``) or an early stop fed the
        extended model's losses acted on a run that may be handed over, and cut the lr of the
        plain run the user then gets; fed plain training's, they act as without Bypass."""
        return cycle.plain_loss if cycle.plain_loss is not None else loss.detach()

    def _changed_since(self, cycle: Cycle, modes: bool = True, settings: bool = True) -> bool:
        """The user replaced or added a layer since the cycle began (or, with ``modes``, put
        one in another train/eval mode than the graph was traced in): the extended graph still
        runs the old layers and can never fold into the new ones. End the cycle — plain
        training's state from the copy beside it (the layers the user put in keep their own
        values), else the state from before it — and tell the caller to train plainly. With
        ``settings``, a layer's setting the graph holds as a number too."""
        now = model_structure(self._user_model)
        if cycle.structure is None or now == cycle.structure or \
                not modes and now[0] == cycle.structure[0]:
            return settings and self._settings_baked(cycle)
        self._buffer_modules = None
        what = "a layer replaced or added" if now[0] != cycle.structure[0] else \
            "a layer put in another train/eval mode"
        self._rollback(f"the model changed during the cycle ({what}): the extended graph runs "
                       "it as it was, so the cycle ends here and the next one extends the model "
                       "as it is now", to_plain=True, raises=False)
        return True

    def _modes_followed(self, cycle: Cycle) -> bool:
        """After a step beside plain training's copy: whether the extended graph ran every
        layer in the mode the closure ran plain training's model in (from the user's modes,
        :meth:`Shadow.follow_modes`), as each first call found them. A closure's ``m.train()``
        after a validation's ``model.eval()``, or a layer the graph calls live put in eval
        mode, is followed. A mode the graph has baked in (torch.export; what symbolic_trace
        traced through) is not: the cycle ends with plain training's state, which took this
        batch's step. Either way the user's layers are left in the modes the closure left
        plain training's model in, as without Bypass."""
        shadow = cycle.shadow
        users = [user for user, _ in shadow.modules]
        ran = cycle.ran_modes if cycle.ran_modes is not None else cycle.graph_modes(users)
        ran, plain = ran or None, shadow.modes()          # (): the graph could not tell
        followed = ran == plain
        if not followed:
            where = "its graphs traced again for other shapes" if ran is None else ", ".join(
                [name or "the model" for (name, _), flag, mine in zip(
                    self._user_model.named_modules(), ran, plain, strict=True)
                 if flag != mine][:3])
            self._rollback(f"the model changed during the cycle (a layer put in another "
                           f"train/eval mode than the extended graph "
                           f"({cycle.ext.extension_traced.frontend}) runs it in: {where}): the "
                           "cycle ends here with plain training's state, and the next one "
                           "extends the model as it is now", to_plain=True, raises=False)
        for user, mine in shadow.modules:
            user.training = mine.training
        return followed

    def _settings_baked(self, cycle: Cycle) -> bool:
        """The user changed a layer's setting since the last step (a dropout schedule's
        ``model.drop.p = 0.1``). A layer the graph calls reads it live, and plain training's
        copy takes it (:meth:`Shadow.step`): followed. One the graph has as a number
        (torch.export writes ``aten.dropout(x, 0.3, True)``) cannot follow: end the cycle as
        for a replaced layer, with plain training's state, and say why."""
        if cycle.watch is None:
            return False
        now = cycle.watch.read()
        if now == cycle.settings:
            return False
        live = cycle.live_layers()
        baked = [text for name, text in cycle.watch.changed(cycle.settings, now)
                 if name not in live]
        if not baked:
            cycle.settings = now
            return False
        self._rollback(f"a layer's setting changed during the cycle ({', '.join(baked[:3])}), "
                       f"which the extended graph ({cycle.ext.extension_traced.frontend}) "
                       "holds as a number: the cycle ends here with plain training's state, and "
                       "the next one traces the model as it is now", to_plain=True, raises=False)
        warnings.warn(f"morphc.Bypass ended a cycle: {self.history[-1]['reason']}",
                      RuntimeWarning, stacklevel=5)    # the user's bp.step
        return True

    @contextlib.contextmanager
    def _whole_on_error(self, cycle: Cycle):
        """While a cycle is judged, an error or interrupt from the probe (a bug, StopIteration,
        Ctrl-C) would leave it half closed — an unjudged fold in the user's weights, a spent
        extension as ``bp.model``: roll back, then let the error go on as it was."""
        try:
            yield
        except BaseException as exc:
            if self._cycle is cycle:
                self._rollback(f"interrupted while the cycle was judged: {type(exc).__name__}: "
                               f"{exc}", raises=False)
            raise

    def _steps_beside_shadow(self, cycle: Cycle, closure: Closure):
        """The shadow's plain step, then the extended one. The shadow draws from the global RNG
        (dropout) exactly as plain training would; the extended step draws from a fork of it, so
        a handed-over shadow leaves the RNG where plain training would have it too."""
        shadow, cycle.plain_loss = cycle.shadow, None
        if shadow is not None and not shadow.follows(self.optimizer):
            shadow = cycle.shadow = None             # a param group added mid-cycle
        if shadow is None:
            return self._extended_step(cycle, closure)
        cycle.plain_loss = shadow.step(closure, self.optimizer, self.config.max_grad_norm)
        users, cycle.ran_modes = [user for user, _ in shadow.modules], None

        def note_modes(*_):               # the modes the graph runs in, at its first call
            if cycle.ran_modes is None:
                cycle.ran_modes = cycle.graph_modes(users) or ()
        noted = cycle.ext.register_forward_pre_hook(note_modes)    # (compiled: not called)
        try:
            with shadow.rng_apart():
                return self._extended_step(cycle, closure)
        finally:
            noted.remove()

    def _extended_step(self, cycle: Cycle, closure: Closure):
        ext, cfg = cycle.ext, self.config
        s = cycle.homotopy_now()
        if s is not None:
            ext.set_homotopy(s)
        self.optimizer.zero_grad(set_to_none=True)
        cycle.group.zero_grad()
        joint = cycle.phase is Phase.BYPASS and cfg.free_phase is FreePhase.JOINT
        params = [p for g in self.optimizer.param_groups for p in g["params"]] + \
            cycle.group.params
        first = not cycle.saw_extension_grad
        # modules the closure runs outside the model (a head, a GAN's other net): their
        # statistics move once a step, in plain training's step when its copy runs beside
        eager, beside = not self.wrapping.compile, cycle.shadow is not None
        roots = (self._user_model, ext)
        if joint:
            ext.set_homotopy(0.0)                       # the model a fold would keep ...
            with outside_buffers_kept(*roots, enabled=eager and beside):
                loss, value = loss_of(closure, self.model, self._reduce())
                if first:
                    no_backward_yet(params)
                backward_checked(loss, value)
            grads = set_aside(params)                   # safe from a closure's zero_grad()
            ext.set_homotopy(1.0)                       # ... and the free one, whose forward
            buffers, kept = self._back_up_buffers()     # must not move BN statistics: they
        with outside_buffers_kept(*roots, enabled=eager and (beside or joint)):  # belong to s = 0
            loss, value = loss_of(closure, self.model, self._reduce())
            if first and not joint:
                no_backward_yet(params)
            backward_checked(loss, value)
        if joint:                                       # after backward: autograd saved them
            put_back(buffers, kept)
            add_back(params, grads)
        if self.distributed and self.wrapping.ddp:
            all_reduce_grads(cycle.outside_ext(params))
        check_finite(params)
        if not cycle.saw_extension_grad:
            if all(p.grad is None for p in cycle.group.params):
                raise BypassError(
                    "no extension parameter got a gradient: the closure does not call the module "
                    "it is given (it calls your model directly?). Write it as "
                    "lambda m: loss_fn(m(x), y) — during a cycle m is the extended model.")
            cycle.saw_extension_grad = True
        clip(params, cfg.max_grad_norm)
        self._observe_lr()
        lr = float(cfg.extension_options.get("lr", self._lr_scale * self._peak_lr))
        if "lr" not in cfg.extension_options:
            cycle.group.group["lr"] = lr
        cycle.group.step()
        if cycle.phase is Phase.RETURN and cfg.return_mode is ReturnMode.PENALTY:
            cycle.shrink_towards_c(lr)
        return loss, value

    def _detach(self) -> None:
        """Drop the extension: its param group and state leave the optimizer."""
        self._cycle = None
        self._module = None
        self.trigger.reset()

    def _rollback(self, reason: str, exc: BaseException | None = None, *,
                  measures: dict | None = None, raises: bool = True,
                  verdict: bool = False, to_plain: bool = False) -> None:
        """Restore the pre-extension state bit for bit — or, after a ``verdict`` on a cycle with
        a shadow (or ``to_plain``: a failed step the shadow took), hand over the shadow: plain
        training's state now, so the cycle's steps are not lost. Then carry on, or raise a
        BypassError with on_failure="raise" (never after a verdict or a hand-over;
        ``raises=False``: an error that goes on as is)."""
        cycle, step = self._cycle, self.step_count
        self._detach()
        to_plain = (verdict or to_plain) and cycle.shadow is not None
        if to_plain:
            cycle.shadow.hand_over(self._user_model, self.optimizer)
        else:
            cycle.snapshot.restore(self._user_model, self.optimizer)
        self.failures += 1
        self._event("rollback", reason=reason, to="plain" if to_plain else "before",
                    **(measures or {}))
        if self.config.on_failure is OnFailure.RAISE and raises and not to_plain and \
                not verdict:
            raise BypassError(f"{reason}. The model, its buffers and the optimizer state were "
                              f"restored to their values before this cycle's extension; "
                              f"training can continue from step {step}, or pass "
                              "on_failure='rollback' to do that automatically.") from exc

    # -- events and checkpoints ----------------------------------------------------------------
    def _event(self, kind: str, **fields) -> None:
        cycle = self._cycle
        if cycle is not None and "residual" not in fields:
            fields["residual"] = cycle.ext.constraint_residual()
        self.log.add(kind, step=self.step_count, phase=self.phase, cycle=self.cycle,
                     loss=self._last_loss, **fields)
