"""The mechanics behind :class:`~morphc.Bypass`: plain steps, cycle steps, and the morphs between.

Kept apart from the facade so that ``bypass.py`` reads as the user's API and this file as the
algorithm: train → trigger → extend → (joint) bypass → return → contract → accept or roll back.
"""

from __future__ import annotations

import contextlib

import torch

from morphc.compiler.escape import escape_scores, random_direction_probe, rank_sites
from morphc.compiler.extend import extend
from morphc.compiler.extended import converted_like, floating_dtype_device
from morphc.errors import BypassError, MorphcError, ShapeError
from morphc.ir.trace import trace
from morphc.runtime.config import Accept, FreePhase, OnFailure, Phase, ReturnMode
from morphc.runtime.cycle import Cycle, may_start
from morphc.runtime.lookahead import lookahead_scores
from morphc.runtime.optimizer_group import ExtensionGroup, training_group
from morphc.runtime.shadow import Shadow, edited_since
from morphc.runtime.snapshot import Snapshot, model_structure
from morphc.runtime.steps import (
    Closure,
    NonFinite,
    add_back,
    backward_checked,
    broken_weight,
    check_finite,
    clip,
    grad_norm,
    loss_of,
    no_backward_yet,
    put_back,
    set_aside,
    zero_grads,
)
from morphc.runtime.verdicts import Verdicts
from morphc.runtime.wrapping import all_reduce_mean, all_reduce_sum


class CycleRunner(Verdicts):
    """Mixin of :class:`~morphc.Bypass` holding its step and cycle logic (the verdicts on a
    cycle: :class:`~morphc.runtime.verdicts.Verdicts`)."""

    # -- plain training ------------------------------------------------------------------------
    def _reduce(self):
        return all_reduce_mean if self.distributed else None

    def _train_step(self, closure: Closure) -> torch.Tensor:
        """One step of the user's model; a non-finite loss or gradient skips it, untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        buffers, backup = self._back_up_buffers()      # a bad batch moves BN stats in forward
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            loss, value = (self._capture_inputs(closure) if self.example_inputs is None else
                           loss_of(closure, self.model, self._reduce()))
            if self.step_count == 0:            # a closure that runs backward does so at once
                no_backward_yet(params)
            backward_checked(loss, value)
            norm = grad_norm(params) if self.trigger.needs_grad_norm else check_finite(params)
        except NonFinite as exc:
            zero_grads(params)
            put_back(buffers, backup)
            self._count_step(value)
            cause = broken_weight(self._user_model)
            advice = (f"; the weight {cause!r} is itself not finite, so every step will be "
                      "skipped: restore a checkpoint and lower the learning rate (in float16, "
                      "raise the optimizer's eps)" if cause else "; check this batch")
            self._event("skip", reason=f"{exc}; the optimizer step was skipped, weights "
                        f"untouched{advice}")
            if self.config.on_failure is OnFailure.RAISE:
                raise BypassError(f"{exc} at step {self.step_count}: the optimizer step was "
                                  f"skipped and the weights are untouched{advice}, or pass "
                                  "on_failure='rollback' to skip such steps") from None
            return loss.detach()
        except BaseException:     # the closure raised, or has no autograd: nothing moved
            put_back(buffers, backup)
            raise
        clip(params, self.config.max_grad_norm)
        self.optimizer.step()
        self._count_step(value)
        if self._trigger_fires(value, norm, self._observe_lr()):
            self._start_cycle(closure)
        return loss.detach()

    def _back_up_buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copy the user's buffers into storage kept across steps (one fused copy a step)."""
        modules = getattr(self, "_buffer_modules", None)
        if modules is None:         # walking the module tree each step costs more than the copy
            modules = self._buffer_modules = list(self._user_model.modules())
        buffers = [b for m in modules for b in m._buffers.values() if b is not None]
        key = tuple(map(id, buffers))
        if getattr(self, "_buffer_key", None) != key:    # new or replaced buffers: reallocate
            self._buffer_key = key
            self._buffer_backup = [b.detach().clone() for b in buffers]
            return buffers, self._buffer_backup
        backup = self._buffer_backup
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(backup, buffers)
        return buffers, backup

    def _observe_lr(self) -> float:
        """The training group's lr now (group 0's, unless that is held at lr 0 or frozen:
        :func:`training_group`); the peak seen so far is what the extension trains at."""
        lr = float(training_group(self.optimizer).get("lr", 0.0))
        self._peak_lr = max(self._peak_lr, lr)
        if lr != self._lr_seen:
            self._lr_seen, self._lr_changed_at = lr, self.step_count
        return lr

    def _count_step(self, value: float) -> None:
        self.step_count += 1
        self._last_loss = value

    def _trigger_fires(self, value: float, norm: float, lr: float) -> bool:
        """Ask the trigger every step; act on it only when a cycle may start now."""
        fired = self.trigger.update(self._sign * value, step=self.step_count, grad_norm=norm)
        if not fired or self._disabled is not None or self._probation is not None:
            return False
        return may_start(self.config, self.trigger, step=self.step_count, cycles=self.cycle,
                         quiet_until=self._quiet_until, lr=lr, peak_lr=self._peak_lr,
                         lr_changed_at=self._lr_changed_at)

    def _capture_inputs(self, closure: Closure):
        """First step: record the model's inputs (for tracing later) from the closure's call."""
        captured: list = []

        def hook(module, args, kwargs):
            if not captured:
                captured.append((args, kwargs))

        handle = self._user_model.register_forward_pre_hook(hook, with_kwargs=True)
        module = self.wrapping.around(self._user_model, None, compile=False) \
            if self.wrapping.compile else self.model
        try:
            result = loss_of(closure, module, self._reduce())
        finally:
            handle.remove()
        if not captured:
            raise BypassError("the closure never called the model it was given: write it as "
                              "closure(module) -> loss with module(...) inside, or pass "
                              "example_inputs=")
        args, kwargs = captured[0]
        self.example_inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in args)
        self.example_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v
                               for k, v in kwargs.items()}
        self._inputs_as = floating_dtype_device(self._user_model)
        return result

    # -- a cycle -------------------------------------------------------------------------------
    def _start_cycle(self, closure: Closure) -> None:
        """trigger → extend: snapshot, trace (once), choose sites, extend, join the optimizer."""
        if not self._judge_replays(closure):
            return
        snapshot = Snapshot.take(self._user_model, self.optimizer)
        shadow = self._take_shadow() if self._keeps_shadow() else None
        try:
            self._trace()
            sites, scores = self._choose_sites(closure)
            ext = self._extend(sites)
        except Exception as exc:
            self._give_up(f"extension failed: {type(exc).__name__}: {exc}",
                          f"morphc could not extend the model ({exc}); nothing was changed. "
                          "Choose other sites=", exc)
            return
        if scores is not None:
            ext.config.escape_scores, ext.config.selection = scores, "auto"
        group = ExtensionGroup(self.optimizer, list(ext.extension_parameters()),
                               self.config.extension_options)
        pace = getattr(self.trigger, "pace", None)
        self._cycle = Cycle(ext, snapshot, group, self.config, started_at=self.step_count,
                            pace=pace() if callable(pace) else 0.0)
        self._cycle.shadow = shadow
        self._cycle.structure = self._traced_structure
        self._module = None
        self._event("extend", sites=ext.config.sites, widths=ext.config.widths, scores=scores)

    def _keeps_shadow(self) -> bool:
        """Plain training beside the cycle (:mod:`~morphc.runtime.shadow`) whenever a verdict
        can hand it over: not with ``accept="always"`` (no verdict), not across processes (the
        copy would train without the all-reduce)."""
        return self.config.shadow and self.config.accept != Accept.ALWAYS and \
            not self.distributed

    def _take_shadow(self) -> Shadow | None:
        """The copy, or None when the model or optimizer cannot be deep-copied (a handle or a
        lock among its attributes): then a miss restores the state from before the cycle."""
        try:
            return Shadow(self._user_model, self.optimizer)
        except Exception as exc:
            self.config.shadow = False               # it would fail the same way next time
            self._warn(f"morphc.Bypass could not copy the model and optimizer to train plainly "
                       f"beside its cycles ({type(exc).__name__}: {exc}); a cycle that does not "
                       "pay restores the state from before it instead (its steps are lost)")
            return None

    def _give_up(self, reason: str, advice: str, exc: BaseException | None = None) -> None:
        """No cycle for the rest of the run: recorded, warned once, or raised as a BypassError
        with ``on_failure="raise"``. Called before anything changed."""
        self._disabled = reason
        self._event("failure", reason=reason)
        if self.config.on_failure is OnFailure.RAISE:
            raise BypassError(f"{advice}, or pass on_failure='rollback' to train on without "
                              "Bypass.") from exc
        self._warn(f"morphc.Bypass trains on without cycles: {reason}. {advice}.")

    def _trace(self) -> None:
        """Trace once per run (and trace() caches per model): a cycle never re-exports —
        unless the model was converted (``model.double()``, ``.to(device)``) since its inputs
        were recorded (they are converted the same way and the model traced again), or the user
        replaced or added a layer since the trace (a stale graph would train the old layers)."""
        now = floating_dtype_device(self._user_model)
        if self._inputs_as is not None and now is not None and now != self._inputs_as:
            self.example_inputs, self.example_kwargs = converted_like(
                (tuple(self.example_inputs), dict(self.example_kwargs or {})),
                self._inputs_as, now)
            self._inputs_as, self._traced = now, None
        structure = model_structure(self._user_model)
        if self._traced is None or structure != self._traced_structure:
            self._traced = trace(self._user_model, self.example_inputs,
                                 kwargs=self.example_kwargs or None,
                                 dynamic_shapes=self.config.dynamic_shapes)
            self._traced_structure = structure

    def _choose_sites(self, closure: Closure):
        """Resolve ``sites``. ``"auto"``: rank by a short joint look-ahead per site, scored on
        ``probe`` (default: ``eval_closure`` or the closure) — what survives at s = 0; with
        ``probe=None``, by ``‖∂L/∂B‖`` along a random output direction (no training). Scores
        are agreed across ranks."""
        spec = self.config.sites
        if not (isinstance(spec, str) and spec == "auto"):
            return spec, None
        full = self._extend("all")
        names = list(full.config.sites)
        probe = self.config.probe
        if probe is None:
            scores = escape_scores(full, random_direction_probe(self.example_inputs,
                                                                self.config.seed))
            if self.distributed:
                scores = dict(zip(scores, all_reduce_sum(list(scores.values())), strict=True))
            return rank_sites(scores, self.config.top_k), scores
        if probe == "closure":
            probe = self.config.eval_closure or closure
        options = {"lr": self._lr_scale * self._peak_lr, **self.config.extension_options}
        device = next(self._user_model.parameters()).device
        scores = lookahead_scores(
            lambda name: self._extend([name]), names, self.optimizer, self._user_model,
            closure, lambda m: self._loss_without_trace(probe, m, reduce=False),
            steps=self.config.lookahead_steps, group_options=options,
            reduce=(lambda v: all_reduce_mean(v, device)) if self.distributed else float)
        return rank_sites(scores, self.config.top_k), scores

    def _extend(self, sites):
        cfg = self.config
        if isinstance(sites, list):   # exact names: never let a name act as a suffix / regex
            wanted = set(sites)
            sites = lambda site: site.name in wanted  # noqa: E731
        return extend(self._user_model, self.example_inputs, sites=sites, width=cfg.width,
                      activation=cfg.activation, exclude=cfg.exclude, overrides=cfg.overrides,
                      seed=cfg.seed + self.cycle + self.failures, init_scale=cfg.init_scale,
                      traced=self._traced)

    def _cycle_step(self, closure: Closure) -> torch.Tensor:
        """One step of the extended model; any fault rolls the cycle back."""
        cycle = self._cycle
        if self._changed_since(cycle):
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
            self._warn(f"morphc.Bypass rolled a cycle back, the extended graph refused a batch: "
                       f"{exc}")
            return self._fault(cycle, closure, f"the extended graph refused this batch: {exc}")
        except MorphcError:
            self._rollback("an error in the cycle")
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
            self._rollback("interrupted", raises=False)
            raise
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

    def _changed_since(self, cycle: Cycle) -> bool:
        """The user replaced or added a layer since the cycle began: the extended graph still
        runs the old layers and can never fold into the new ones. End the cycle — plain
        training's state from the copy beside it (the layers the user put in keep their own
        values), else the state from before it — and tell the caller to train plainly."""
        if cycle.structure is None or model_structure(self._user_model) == cycle.structure:
            return False
        self._buffer_modules = None
        self._rollback("the model changed during the cycle (a layer replaced or added): the "
                       "extended graph runs the old layers, so the cycle ends here and the next "
                       "one extends the new model", to_plain=True, raises=False)
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
        if shadow is not None and edited_since(self._weight_versions):
            shadow = cycle.shadow = None             # weights edited between steps: a miss
            self._warn_edited()                      # restores the state from before the cycle
        if shadow is None:
            return self._extended_step(cycle, closure)
        cycle.plain_loss = shadow.step(closure, self.optimizer, self.config.max_grad_norm)
        with shadow.rng_apart():
            return self._extended_step(cycle, closure)

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
        if joint:
            ext.set_homotopy(0.0)                       # the model a fold would keep ...
            loss, value = loss_of(closure, self.model, self._reduce())
            if first:
                no_backward_yet(params)
            backward_checked(loss, value)
            grads = set_aside(params)                   # safe from a closure's zero_grad()
            ext.set_homotopy(1.0)                       # ... and the free one, whose forward
            buffers, kept = self._back_up_buffers()     # must not move BN statistics: they
        loss, value = loss_of(closure, self.model, self._reduce())      # belong to s = 0
        if first and not joint:
            no_backward_yet(params)
        backward_checked(loss, value)
        if joint:                                       # after backward: autograd saved them
            put_back(buffers, kept)
            add_back(params, grads)
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
