"""Plain training under :class:`~morphc.Bypass`: one checked step of the user's own model, and
whether the trigger may start a cycle after it.

Kept apart from the cycle (:mod:`~morphc.runtime.cycle_runner`) because this is what runs on
almost every step, and it needs nothing of extensions: a step that a bad batch cannot harm, the
inputs recorded for tracing later, the learning rate watched. Mixed into
:class:`~morphc.runtime.cycle_runner.CycleRunner`, whose state it reads.
"""

from __future__ import annotations

import torch

from morphc.compiler.extended import floating_dtype_device
from morphc.errors import BypassError
from morphc.runtime.config import OnFailure
from morphc.runtime.cycle import may_start
from morphc.runtime.optimizer_group import training_group
from morphc.runtime.steps import (
    Closure,
    NonFinite,
    backward_checked,
    broken_weight,
    check_finite,
    clip,
    grad_norm,
    loss_of,
    no_backward_yet,
    put_back,
    zero_grads,
)
from morphc.runtime.wrapping import all_reduce_mean


class PlainTraining:
    """The plain-training side of a Bypass run: its steps, and the trigger asked after each."""

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

        module = self.model     # compiled, when asked, as every later step is: the same bits
        watched = self.wrapping.compiled_user    # not `or`: bool() of it asks its len()
        if watched is None:
            watched = self._user_model
        handle = watched.register_forward_pre_hook(hook, with_kwargs=True)
        called: list[str] = []      # submodules the closure ran (not when compiled: hooks
        handles = [] if watched is not self._user_model else [   # there would recompile it;
            sub.register_forward_pre_hook(lambda *_, name=name: called.append(name))  # nor on
            for name, sub in self._user_model.named_modules()              # TorchScript)
            if name and not isinstance(sub, torch.jit.ScriptModule)]
        try:
            result = loss_of(closure, module, self._reduce())
        finally:
            handle.remove()
            for each in handles:
                each.remove()
        if not captured:
            raise BypassError(_never_called(called))
        args, kwargs = captured[0]
        self.example_inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in args)
        self.example_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v
                               for k, v in kwargs.items()}
        self._inputs_as = floating_dtype_device(self._user_model)
        return result


def _never_called(submodules: list[str]) -> str:
    """Why a closure that never ran the model cannot be morphed, and what to write instead.
    One that ran its submodules (``m.decoder(m.encoder(x))``) would, given ``example_inputs``,
    fail every cycle: a cycle extends ``forward`` and hands the closure the extended model,
    which has no submodules to call."""
    if not submodules:
        return ("the closure never called the model it was given: write it as closure(module) "
                "-> loss with module(...) inside, or pass example_inputs=")
    outer = [n for n in dict.fromkeys(submodules)        # m.encoder, not also m.encoder.0
             if not any(n.startswith(f"{o}.") for o in submodules)]
    names = ", ".join(f"m.{n}" for n in outer)
    return (f"the closure called {names} but never the model itself: a cycle extends the "
            "model's forward and gives the closure the extended model, which runs forward "
            "only. Let forward compute what the loss needs (return a tuple or dict) and call "
            "m(...), or pass Bypass a Module whose forward does these calls")
