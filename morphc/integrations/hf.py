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
- the training loss: a forward hook on the model reads ``output.loss`` of every training-mode
  forward (the model must compute its loss, i.e. be given ``labels``); under gradient
  accumulation transformers passes ``num_items_in_batch`` and each micro-batch's loss is a share
  of the step's, so the step's loss is their sum;
- plain training beside a cycle: a forward pre-hook keeps each training micro-batch's inputs
  (and the RNG state it draws from); after the step they run again through the model with
  plain training's values, the loss read as the Trainer reads it (``.loss``, a share when
  ``num_items_in_batch`` is passed, else divided by the micro-batches), clipped as the Trainer
  clips (``args.max_grad_norm`` over ``model.parameters()``). A ``compute_loss`` override or
  ``compute_loss_func`` is not replayed: pass ``shadow=False`` if your loss is not the model's;
- ``optimizer.step()``: the extension's group joins the AcceleratedOptimizer's torch optimizer
  inside the step only, its gradients clipped to ``args.max_grad_norm`` (the Trainer clips
  ``model.parameters()``, which do not include the extension);
- ``on_step_end``: gradients are gone and the scheduler has stepped, so the cycle moves here;
  ``control.should_evaluate`` / ``should_save`` are already decided, so a cycle in flight is
  resolved (folded if on C, else rolled back) *before* the evaluation and the checkpoint
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

import warnings

import torch

from morphc.errors import BypassError
from morphc.integrations.core import TrainerBypass
from morphc.runtime.triggers import Trigger


class BypassCallback(transformers.TrainerCallback):
    """Run Bypass cycles inside ``transformers.Trainer``; settings as
    :class:`~morphc.integrations.core.TrainerBypass`. ``callback.history`` lists the events."""

    def __init__(self, trigger: Trigger | None = None, **options) -> None:
        self.bypass = TrainerBypass(trigger, **options)
        self._hooks: list = []
        self._replaying = False

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

        self.bypass.attach(model, optimizer, max_grad_norm=args.max_grad_norm,
                           total_steps=state.max_steps, step=state.global_step,
                           replay=lambda inputs: self._replay(model, inputs), clip_plain=clip)
        self._hooks = [model.register_forward_hook(self._capture_loss, with_kwargs=True),
                       model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
                       # torch marks the hook with an attribute: a bound method cannot take it
                       model.register_state_dict_post_hook(
                           lambda *args: self._warn_mid_cycle(*args))]

    def _warn_mid_cycle(self, module, state_dict, prefix, local_metadata) -> None:
        """A ``state_dict`` taken inside a cycle (``trainer.save_model()`` from a callback) holds
        the user's weights without the branch, which the hooks add: say so, and what to do."""
        if self.bypass.in_cycle:
            warnings.warn(f"a state_dict taken during a Bypass cycle ({self.bypass.phase} phase) "
                          "holds your weights without the cycle's extension, so it does not "
                          "compute what the model computes now; call callback.bypass.resolve("
                          "'why') first to fold the cycle (or roll it back)", stacklevel=2)

    def _capture_inputs(self, module, args, kwargs) -> None:
        """A training micro-batch's inputs, kept for plain training's step beside a cycle."""
        if self.bypass.wants_inputs and not self._replaying and module.training and \
                torch.is_grad_enabled():
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
        if self._replaying or not (module.training and torch.is_grad_enabled()):
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
