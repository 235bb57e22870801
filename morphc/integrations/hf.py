"""``BypassCallback`` for the Hugging Face ``Trainer`` (``pip install 'morphc[hf]'``).

>>> from morphc.integrations.hf import BypassCallback                      # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=ds,             # doctest: +SKIP
...                   callbacks=[BypassCallback(bypass_steps=50, return_steps=50)])
>>> trainer.train()                                                          # doctest: +SKIP

Where it acts, in the Trainer's order per optimizer step (transformers 5.23)::

    on_step_begin → micro-batch → on_substep_end → micro-batch … → clip(model.parameters())
      → on_pre_optimizer_step → optimizer.step() → on_optimizer_step → scheduler.step()
      → zero_grad → on_step_end → save (if control.should_save) → on_save

- micro-batch starts (``on_step_begin``, ``on_substep_end``): the joint free phase alternates s;
- the training loss: the one the Trainer trains, read where it computes it — the callback
  wraps the Trainer's ``compute_loss`` (found on the call stack of ``on_train_begin``: callbacks
  are not given the Trainer) and records what it returns, so label smoothing,
  ``compute_loss_func`` and a ``compute_loss`` override are judged on their own loss (the
  model's ``.loss`` is another objective there, or absent). A share of the step's loss when
  the Trainer says it is already normalised for accumulation (``loss_is_scaled_for_ga``, or
  ``num_items_in_batch`` given to the model / ``compute_loss_func``), else one of the
  micro-batches' losses the step averages. Without the Trainer, a forward hook reads
  ``output.loss`` (a share when ``num_items_in_batch`` is passed);
- plain training beside a cycle: each training micro-batch's inputs (and the RNG state it draws
  from) are kept; after the step ``compute_loss`` runs again on them with plain training's values
  (``Trainer.log`` silenced), clipped as the Trainer clips (``args.max_grad_norm`` over
  ``model.parameters()``). Any other side effect of a ``compute_loss`` override (a counter, a
  direct ``wandb.log``) runs twice per micro-batch while a cycle runs (``shadow=False``: once).
  A ``training_step`` override is not replayed: plain training beside cycles is then off, with
  one warning (a miss restores the state from before the cycle);
- ``optimizer.step()``: the extension's group joins the AcceleratedOptimizer's torch optimizer
  inside the step only, its gradients clipped to ``args.max_grad_norm`` (the Trainer clips
  ``model.parameters()``, which do not include the extension);
- ``on_step_end``: gradients are gone and the scheduler has stepped, so the cycle moves here;
  ``control.should_evaluate`` / ``should_save`` are already decided, so a cycle in flight is
  resolved (folded if on C, else rolled back; a probation after a kept cycle judged at once)
  *before* the evaluation and the checkpoint
  (``on_save`` runs after it; ``save_strategy="best"`` decides after the evaluation). Give
  cycles room: ``eval_steps`` / ``save_steps`` longer than ``bypass_steps + return_steps``.
- a ``trainer.evaluate()`` / ``predict()`` / ``save_model()`` you call yourself mid-cycle (from a
  callback) is not seen: it evaluates the extended model, and ``save_model`` saves the weights
  without the branch (a warning says so; resolve first with ``callback.bypass.resolve(why)``).
"""

from __future__ import annotations

try:
    import transformers
except ImportError as exc:   # pragma: no cover - exercised without the extra
    raise ImportError("morphc.integrations.hf needs transformers: pip install 'morphc[hf]'"
                      ) from exc

import sys
import warnings

import torch

from morphc.errors import BypassError
from morphc.integrations.core import TrainerBypass
from morphc.runtime.triggers import Trigger


def _find_trainer():
    """The ``Trainer`` whose ``on_train_begin`` is running (callbacks are not given it): the
    nearest ``self`` up the call stack that is one, or None."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, transformers.Trainer):
            return owner
        frame = frame.f_back
    return None


def _scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether ``compute_loss``'s loss is already a share of the step's, as the Trainer's own
    ``training_step`` decides (else it divides it by the micro-batches)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is not None:
        return bool(scaled)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False)
                 and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


class BypassCallback(transformers.TrainerCallback):
    """Run Bypass cycles inside ``transformers.Trainer``; settings as
    :class:`~morphc.integrations.core.TrainerBypass`. ``callback.history`` lists the events."""

    def __init__(self, trigger: Trigger | None = None, **options) -> None:
        self.bypass = TrainerBypass(trigger, **options)
        self._hooks: list = []
        self._replaying = False
        self._trainer = None      # the Trainer whose compute_loss is wrapped

    @property
    def history(self) -> list[dict]:
        """Every cycle event, as ``morphc.Bypass.history`` (``callback.bypass.history``)."""
        return self.bypass.history

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fp16", False):
            raise BypassError("BypassCallback does not support fp16 training: its GradScaler "
                              "unscales only the optimizer's groups, and the extension's joins "
                              "inside step(); use bf16=True or fp32")
        def clip():
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)

        trainer = _find_trainer()
        replay = (lambda inputs: self._replay(model, inputs)) if trainer is None else \
            self._replay_compute_loss
        self.bypass.attach(model, optimizer, max_grad_norm=args.max_grad_norm,
                           total_steps=state.max_steps, step=state.global_step,
                           replay=replay, clip_plain=clip)
        self._hooks = [model.register_forward_hook(self._capture_loss, with_kwargs=True),
                       model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
                       # torch marks the hook with an attribute: a bound method cannot take it
                       model.register_state_dict_post_hook(
                           lambda *args: self._warn_mid_cycle(*args))]
        if trainer is not None:
            self._wrap_compute_loss(trainer)

    # -- the loss the Trainer trains: read and replayed through its compute_loss ------------------
    def _wrap_compute_loss(self, trainer) -> None:
        """Record each training micro-batch's inputs and the loss ``compute_loss`` returns (an
        instance attribute over the method, removed at the end of training)."""
        own = vars(trainer).get("compute_loss")   # an earlier run's wrapper, or the user's
        original = getattr(own, "morphc_original", None) or trainer.compute_loss
        self._trainer, self._own_compute_loss = trainer, getattr(own, "morphc_original", own)
        if type(trainer).training_step is not transformers.Trainer.training_step and \
                self.bypass.config.shadow:
            self.bypass.config.shadow = False
            warnings.warn("a Trainer subclass overriding training_step: morphc cannot replay its "
                          "micro-batches, so plain training does not run beside its cycles and "
                          "a cycle that does not pay restores the state from before it (its "
                          "steps are lost). shadow=False silences this", stacklevel=3)

        def compute_loss(model, inputs, *args, **kwargs):
            training = model.training and torch.is_grad_enabled() and not self._replaying
            items = kwargs.get("num_items_in_batch")
            if training and self.bypass.wants_inputs:     # only while a cycle runs
                where = (trainer.state.global_step, trainer.state.epoch)
                self.bypass.record_inputs((original, model, dict(inputs), args, kwargs, where))
            result = original(model, inputs, *args, **kwargs)
            if training:
                returned = kwargs.get("return_outputs", args[0] if args else False)
                self.bypass.record_loss(result[0] if returned else result,
                                        share=_scaled_for_accumulation(trainer, items))
            return result

        compute_loss.morphc_original = original
        trainer.compute_loss = compute_loss

    def _replay_compute_loss(self, inputs):
        """A micro-batch through ``compute_loss`` again, at the ``state.global_step`` / ``epoch``
        it ran at (an override may weigh its loss by them; the step has moved on since) and with
        ``Trainer.log`` silenced (it would log plain training's values as the run's):
        ``(loss, share)``, as recorded."""
        original, model, batch, args, kwargs, (step, epoch) = inputs
        trainer = self._trainer
        self._replaying, own_log = True, vars(trainer).get("log")
        now = trainer.state.global_step, trainer.state.epoch
        trainer.state.global_step, trainer.state.epoch = step, epoch
        trainer.log = lambda *a, **k: None
        try:
            with trainer.compute_loss_context_manager():
                result = original(model, dict(batch), *args, **kwargs)
        finally:
            self._replaying = False
            trainer.state.global_step, trainer.state.epoch = now
            del trainer.log
            if own_log is not None:
                trainer.log = own_log
        returned = kwargs.get("return_outputs", args[0] if args else False)
        return (result[0] if returned else result,
                _scaled_for_accumulation(trainer, kwargs.get("num_items_in_batch")))

    def _warn_mid_cycle(self, module, state_dict, prefix, local_metadata) -> None:
        """A ``state_dict`` taken inside a cycle (``trainer.save_model()`` from a callback) holds
        the user's weights without the branch, which the hooks add: say so, and what to do."""
        if self.bypass.in_cycle:
            warnings.warn(f"a state_dict taken during a Bypass cycle ({self.bypass.phase} phase) "
                          "holds your weights without the cycle's extension, so it does not "
                          "compute what the model computes now; call callback.bypass.resolve("
                          "'why') first to fold the cycle (or roll it back)", stacklevel=2)

    def _capture_inputs(self, module, args, kwargs) -> None:
        """A training micro-batch's inputs, kept for plain training's step beside a cycle
        (without the Trainer; with it, :meth:`_wrap_compute_loss` keeps them)."""
        if self._trainer is None and self.bypass.wants_inputs and not self._replaying and \
                module.training and torch.is_grad_enabled():
            self.bypass.record_inputs((args, kwargs))

    def _replay(self, model, inputs):
        """A micro-batch run again, for plain training: ``(loss, share)``, as recorded."""
        args, kwargs = inputs
        self._replaying = True
        try:
            output = model(*args, **kwargs)
        finally:
            self._replaying = False
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None:
            raise BypassError("the model returned no loss when its micro-batch was run again")
        return loss, kwargs.get("num_items_in_batch") is not None

    def _capture_loss(self, module, args, kwargs, output) -> None:
        """A training forward's ``output.loss``. Given ``num_items_in_batch`` (gradient
        accumulation in transformers 5), the model divides by the items of the whole
        accumulated step: that loss is a share of the step's loss."""
        if self._trainer is not None or self._replaying or not (
                module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            self.bypass.record_loss(loss, share=kwargs.get("num_items_in_batch") is not None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.bypass.before_micro_batch()

    def on_substep_end(self, args, state, control, **kwargs):
        self.bypass.before_micro_batch()

    def on_step_end(self, args, state, control, **kwargs):
        self.bypass.after_step(state.global_step)
        self._resolve_before_eval_or_save(control, f"step {state.global_step}")
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # eval/save_strategy="epoch" decide here, after on_step_end
        self._resolve_before_eval_or_save(control, f"the end of epoch {state.epoch:g}")
        return control

    def _resolve_before_eval_or_save(self, control, when: str) -> None:
        """The Trainer evaluates, then saves (``save_strategy="best"`` decides to save only
        after the evaluation): resolve a cycle before either, so a metric, the checkpoint chosen
        by it and ``load_best_model_at_end`` all see one model the user can have."""
        if control.should_save:
            self.bypass.resolve(f"a checkpoint at {when}")
        elif control.should_evaluate:
            self.bypass.resolve(f"an evaluation at {when}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bypass.finish()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._trainer is not None:
            vars(self._trainer).pop("compute_loss", None)
            if self._own_compute_loss is not None:
                self._trainer.compute_loss = self._own_compute_loss
            self._trainer = None
