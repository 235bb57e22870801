"""``BypassCallback`` for the Lightning ``Trainer`` (``pip install 'morphc[lightning]'``).

>>> from morphc.integrations.lightning import BypassCallback               # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[BypassCallback(bypass_steps=50, return_steps=50)])
>>> trainer.fit(module, loader)                                             # doctest: +SKIP

Where it acts (Lightning 2.6, automatic optimization)::

    on_train_batch_start → training_step → backward → on_train_batch_end          (accumulating)
    on_train_batch_start → optimizer.step(closure: training_step, backward, clip)
      → scheduler.step() → on_train_batch_end → ModelCheckpoint                  (stepping)

- sites: the modules of the LightningModule (all ``nn.Linear`` / convs under it);
- ``on_train_batch_start``: the joint free phase alternates s per micro-batch;
- the training loss: ``outputs["loss"]`` of ``on_train_batch_end`` (Lightning divides it by
  ``accumulate_grad_batches``; multiplied back);
- plain training beside a cycle: ``on_train_batch_start`` keeps the micro-batch (and the RNG
  state it draws from); after the step ``training_step`` runs it again with plain training's
  values (``self.log`` silenced, the precision plugin's autocast, ``global_step`` as the
  micro-batch saw it), its loss divided by ``accumulate_grad_batches`` as Lightning divides
  it (also in an epoch's shorter last step), clipped as ``gradient_clip_val`` /
  ``gradient_clip_algorithm`` say. A ``configure_gradient_clipping`` or ``backward`` override
  is not replayed;
- ``optimizer.step()``: the extension's group joins inside the step, before Lightning's closure
  runs, so Lightning's own gradient clipping (``gradient_clip_val``) covers it too;
- ``on_train_batch_end`` with ``trainer.global_step`` advanced: the cycle moves;
- ``on_validation_start`` (inside ``fit``): a cycle in flight is resolved first, so a
  monitored score and the checkpoint it selects are of the same model (give cycles room:
  ``val_check_interval`` longer than ``bypass_steps + return_steps``); a probation in flight
  is judged then too, so the score is of the model the run keeps;
- ``on_save_checkpoint``: a cycle in flight is resolved (folded if on C, else rolled back), a
  probation after a kept cycle judged at once (plain training's state if it leads), and
  the checkpoint's ``state_dict``, ``optimizer_states`` and this callback's state are rewritten
  from the resolved model, so every checkpoint holds the user's keys and groups only.
- ``state_dict``: the trigger and counters, so a resumed run continues them.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError as exc:   # pragma: no cover - exercised without the extra
    raise ImportError("morphc.integrations.lightning needs lightning: pip install "
                      "'morphc[lightning]'") from exc

import contextlib
import math
import warnings

import torch

from morphc.errors import BypassError
from morphc.integrations.core import TrainerBypass
from morphc.runtime.triggers import Trigger


def _budget(trainer) -> int | None:
    """The run's optimizer steps: ``max_steps``, or with ``max_epochs`` Lightning's estimate, so
    no cycle starts that the run would end before it could return."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if estimate and math.isfinite(estimate) else None


def _step_counter(trainer):
    """The progress counter ``trainer.global_step`` reads (Lightning 2.x, automatic
    optimization), or None."""
    try:
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        return loop.optim_progress.optimizer.step.total
    except AttributeError:
        return None


@contextlib.contextmanager
def _at_step(trainer, step: int):
    """``trainer.global_step`` (and ``self.global_step``) as the micro-batch saw it: the replay
    runs after the optimizer step, and a ``training_step`` that weighs its loss by the step
    (a warm-up, a KL anneal) would otherwise train plain training on another loss."""
    counter = _step_counter(trainer)
    if trainer.global_step == step:
        yield
        return
    if counter is None:
        raise BypassError("cannot show training_step the step its micro-batch ran at")
    kept, counter.completed = counter.completed, counter.completed - (trainer.global_step - step)
    try:
        if trainer.global_step != step:
            raise BypassError("cannot show training_step the step its micro-batch ran at")
        yield
    finally:
        counter.completed = kept


def _replay(trainer, pl_module, inputs):
    """``training_step`` run again on a micro-batch, for plain training beside a cycle, at the
    step it ran at; its ``self.log`` calls are silenced (they would log plain training's values
    as the run's)."""
    batch, batch_idx, step = inputs
    silent = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
    pl_module.__dict__.update(silent)
    try:
        with _at_step(trainer, step), trainer.precision_plugin.train_step_context():
            output = pl_module.training_step(batch, batch_idx)
    finally:
        for name in silent:
            pl_module.__dict__.pop(name, None)
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise BypassError("training_step returned no loss when its micro-batch was run again")
    return loss, int(trainer.accumulate_grad_batches)   # Lightning's divisor, in every step


# hooks that change the gradients a step trains on, which the replay (training_step, the
# loss's backward, gradient_clip_val) does not run
_GRADIENT_HOOKS = ("backward", "configure_gradient_clipping")


def _no_replay_of_overrides(pl_module, config) -> None:
    """A module overriding a hook that changes its gradients cannot be replayed faithfully:
    plain training beside cycles is turned off, with one warning."""
    overridden = [name for name in _GRADIENT_HOOKS
                  if getattr(type(pl_module), name) is not getattr(pl.LightningModule, name)]
    if overridden and config.shadow:
        config.shadow = False
        warnings.warn(f"{type(pl_module).__name__} overrides {', '.join(overridden)}, which "
                      "morphc's replay of its micro-batches would not run: plain training does "
                      "not run beside its cycles, and a cycle that does not pay restores the "
                      "state from before it (its steps are lost). shadow=False silences this",
                      stacklevel=3)


class BypassCallback(pl.Callback):
    """Run Bypass cycles inside ``lightning.Trainer``; settings as
    :class:`~morphc.integrations.core.TrainerBypass`. ``callback.history`` lists the events."""

    def __init__(self, trigger: Trigger | None = None, **options) -> None:
        self.bypass = TrainerBypass(trigger, **options)
        self._last_step = 0

    @property
    def history(self) -> list[dict]:
        """Every cycle event, as ``morphc.Bypass.history`` (``callback.bypass.history``)."""
        return self.bypass.history

    def on_train_start(self, trainer, pl_module) -> None:
        if str(trainer.precision).startswith("16"):
            raise BypassError("BypassCallback does not support precision='16-mixed': its "
                              "GradScaler unscales only the optimizer's groups; use "
                              "'bf16-mixed' or '32-true'")
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise BypassError(
                "BypassCallback needs automatic_optimization=True and one optimizer (it must see "
                "each micro-batch and the loss training_step returns). With manual optimization, "
                "drive morphc.integrations.TrainerBypass from your training_step: attach(self, "
                "optimizer) once, then before_micro_batch(), record_loss(loss) and, after "
                "optimizer.step(), after_step(step)")
        optimizer = trainer.optimizers[0]

        def clip():
            value = trainer.gradient_clip_val
            if not value:
                return
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if trainer.gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, value)
            else:
                torch.nn.utils.clip_grad_norm_(params, value)

        _no_replay_of_overrides(pl_module, self.bypass.config)
        self.bypass.attach(pl_module, optimizer, total_steps=_budget(trainer),
                           step=trainer.global_step,
                           replay=lambda inputs: _replay(trainer, pl_module, inputs),
                           clip_plain=clip)
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.bypass.before_micro_batch()
        self.bypass.record_inputs((batch, batch_idx, trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.bypass.record_loss(loss.detach().float() * trainer.accumulate_grad_batches)
        if trainer.global_step != self._last_step:     # an optimizer step happened
            self._last_step = trainer.global_step
            self.bypass.after_step(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        """A validation inside ``fit`` feeds ``ModelCheckpoint(monitor=...)`` and early stopping:
        resolve a cycle first, so the score and the checkpoint it picks are of one model the user
        can have (not of the extended model, saved resolved)."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.bypass.resolve(f"a validation at step {trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not (self.bypass.in_cycle or self.bypass.on_probation):
            return
        self.bypass.resolve(f"a checkpoint at step {trainer.global_step}")
        checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o)
                                              for o in trainer.optimizers]
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def on_train_end(self, trainer, pl_module) -> None:
        self.bypass.finish()

    def state_dict(self) -> dict:
        return self.bypass.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.bypass.load_state_dict(state_dict)
