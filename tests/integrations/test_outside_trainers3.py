"""Outside-in probes of the trainer callbacks in the set-ups users run, third round.

Where the Trainer computes the loss itself (label smoothing, ``compute_loss_func``, a
``compute_loss`` override) the model's ``.loss`` is another objective or absent: the callback
crashed at the first step, or judged cycles on the wrong loss and trained plain training beside
them on it (a miss then handed over a state plain training never had). Each test compares with
the same run without the callback, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import morphc
from morphc.integrations.core import raw_optimizer
from tests.helpers import TokenData, state_differences, training_state

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class _PenaltyTrainer(transformers.Trainer):
    """A compute_loss override that still passes labels: ``.loss`` exists, but is not trained."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss + 0.1 * sum((p ** 2).sum() for p in model.parameters())
        return (loss, outputs) if return_outputs else loss


class _StepTrainer(transformers.Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, inputs, num_items_in_batch)


def _token_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.size(-1))
    loss = F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels[:, 1:].numel())


_SETUPS = {"label_smoothing": ({"label_smoothing_factor": 0.1}, {}, transformers.Trainer),
           "compute_loss_func": ({}, {"compute_loss_func": _token_loss}, transformers.Trainer),
           "compute_loss_override": ({}, {}, _PenaltyTrainer)}


def _hf_run(tmp_path, callbacks, args=None, trainer_options=None, cls=transformers.Trainer):
    options = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="linear",
                   max_grad_norm=0.5, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, logging_steps=100, seed=0, dataloader_num_workers=0)
    trainer = cls(model=_gpt2(), args=transformers.TrainingArguments(**{**options, **(args or {})}),
                  train_dataset=TokenData(), callbacks=callbacks, **(trainer_options or {}))
    trainer.train()
    return trainer


def _hf_callback(**options):
    from morphc.integrations.hf import BypassCallback

    return BypassCallback(morphc.Schedule(every=3), **{
        **dict(bypass_steps=2, return_steps=2, width=4, min_lr_fraction=0.0, verbose=False),
        **options})


@pytest.mark.parametrize("setup", sorted(_SETUPS))
def test_hf_a_missed_cycle_under_the_trainers_own_loss_leaves_plain_trainings_state(
        tmp_path, never_pays, setup):
    """The loss the Trainer trains is recorded and replayed (label smoothing and
    compute_loss_func used to stop the run at step 1; the override handed over a state
    trained on the model's .loss instead)."""
    args, options, cls = _SETUPS[setup]
    plain = _hf_run(tmp_path / "plain", [], args, options, cls)
    callback = _hf_callback()
    mine = _hf_run(tmp_path / "morphc", [callback], args, options, cls)
    assert state_differences(training_state(mine.model, raw_optimizer(mine.optimizer)),
                        training_state(plain.model, raw_optimizer(plain.optimizer))) == []
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert [(e["step"], e["to"]) for e in rollback] == [(7, "plain")]
    assert "compute_loss" not in vars(mine)        # the wrapper is gone after training


def test_hf_a_training_step_override_warns_once_and_restores_the_state_before(tmp_path,
                                                                            never_pays):
    """Its micro-batches cannot be replayed: one warning naming it and shadow=False."""
    callback = _hf_callback()
    with pytest.warns(UserWarning, match="overriding training_step.*shadow=False") as caught:
        _hf_run(tmp_path, [callback], cls=_StepTrainer)
    assert sum("morphc" in str(w.message) for w in caught) == 1
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert [e["to"] for e in rollback] == ["before"]


class _WarmupTrainer(transformers.Trainer):
    """A loss weighed by the step count (a warm-up): the replay, after the step, must see the
    step its micro-batch ran at."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss * min(1.0, (self.state.global_step + 1) / 40)
        return (loss, outputs) if return_outputs else loss


def test_hf_a_step_weighted_compute_loss_is_replayed_at_its_own_step(tmp_path, never_pays):
    plain = _hf_run(tmp_path / "plain", [], cls=_WarmupTrainer)
    callback = _hf_callback()
    mine = _hf_run(tmp_path / "morphc", [callback], cls=_WarmupTrainer)
    assert state_differences(training_state(mine.model, raw_optimizer(mine.optimizer)),
                        training_state(plain.model, raw_optimizer(plain.optimizer))) == []
    assert mine.state.global_step == 8


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_run(tmp_path, callbacks, **overrides):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        """Logs to the progress bar, weighs its loss by ``self.global_step`` (a warm-up) and
        decays its lr per step through a scheduler dict."""

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                           torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x).squeeze(-1), y)
            loss = loss * min(1.0, (self.global_step + 1) / 40) + 0 * self.trainer.current_epoch
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 / (1 + 0.1 * k))
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    torch.manual_seed(0)
    module = Module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.sin(x.sum(-1))), batch_size=8)
    options = dict(max_steps=10, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path),
                   num_sanity_val_steps=0, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer = pl.Trainer(callbacks=callbacks, **{**options, **overrides})
    trainer.fit(module, loader)
    return module, trainer.optimizers[0], trainer


def test_lightning_a_training_step_that_reads_global_step_is_replayed_at_its_own_step(
        tmp_path, never_pays):
    """The replay runs after the optimizer step: it used to see global_step + 1, so plain
    training beside the cycle trained another loss and a miss handed over its state."""
    from morphc.integrations.lightning import BypassCallback

    module, optimizer, _ = _lightning_run(tmp_path / "plain", [])
    plain = training_state(module, optimizer)
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=2, width=4,
                              min_lr_fraction=0.0, verbose=False)
    module, optimizer, trainer = _lightning_run(tmp_path / "morphc", [callback])
    assert state_differences(training_state(module, optimizer), plain) == []
    assert [(e["step"], e["to"]) for e in callback.history if e["event"] == "rollback"] == \
        [(7, "plain")]
    assert trainer.global_step == 10


# -- a checkpoint or evaluation due at the step a cycle starts ----------------------------------
class _Stuck(morphc.Trigger):
    """Fires once it has seen two losses since its last reset (as Plateau needs full windows)."""

    def __init__(self):
        self.seen = 0

    def update(self, loss, *, step, grad_norm=None):
        self.seen += 1
        return step >= 4 and self.seen >= 2

    def reset(self):
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_a_cycle_resolved_at_the_step_it_started_is_withdrawn_and_starts_again_next_step():
    """It used to count as a miss and reset the trigger: a Plateau then waited two windows of
    fresh losses before the next cycle, for a checkpoint that happened to fall on its start."""
    from morphc.integrations.core import TrainerBypass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    bypass = TrainerBypass(_Stuck(), bypass_steps=2, return_steps=2, width=2,
                           min_lr_fraction=0.0, verbose=False)
    bypass.attach(model, optimizer)
    for step in range(1, 6):
        optimizer.zero_grad()
        bypass.before_micro_batch()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        bypass.record_loss(loss)
        bypass.after_step(step)
        if step == 4:
            kept = training_state(model, optimizer)
            bypass.resolve("a checkpoint")
            assert state_differences(training_state(model, optimizer), kept) == []
    assert [(e["event"], e["step"]) for e in bypass.history] == [
        ("extend", 4), ("rollback", 4), ("extend", 5)]
    assert bypass.failures == 0 and bypass.in_cycle
    bypass.finish()


class _StopAt7(transformers.TrainerCallback):
    """A run stopped early (a time limit, a custom criterion) in the middle of a cycle."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            control.should_training_stop = True


def test_hf_load_best_model_at_end_after_a_run_stopped_mid_cycle_keeps_the_best(tmp_path):
    """The Trainer loads the best checkpoint before on_train_end, where the cycle used to be
    resolved: its hand-over then overwrote the best model with plain training's last state."""
    from safetensors.torch import load_file

    callback = _hf_callback(bypass_steps=2, return_steps=2)
    callback.bypass.trigger = morphc.Schedule(at=[5])
    trainer = _hf_run(tmp_path, [_StopAt7(), callback], args=dict(
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        load_best_model_at_end=True, max_steps=12), trainer_options={
        "eval_dataset": TokenData(n=16, seed=1)})
    assert trainer.state.global_step == 7 and callback.history[0]["step"] == 5
    best = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    mine = trainer.model.state_dict()
    assert [k for k in best if not torch.equal(best[k], mine[k])] == []


def test_lightning_an_epochs_shorter_last_accumulation_is_replayed_as_lightning_scales_it(
        tmp_path, never_pays):
    """16 batches, accumulate_grad_batches=3: step 6 has one micro-batch, which Lightning still
    divides by 3; the replay divided by the micro-batches it had (1), a 3x gradient."""
    from morphc.integrations.lightning import BypassCallback

    module, optimizer, _ = _lightning_run(tmp_path / "plain", [], accumulate_grad_batches=3,
                                          max_steps=8)
    plain = training_state(module, optimizer)
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=2, width=4,
                              min_lr_fraction=0.0, verbose=False)
    module, optimizer, _ = _lightning_run(tmp_path / "morphc", [callback],
                                          accumulate_grad_batches=3, max_steps=8)
    assert state_differences(training_state(module, optimizer), plain) == []
    assert [(e["step"], e["to"]) for e in callback.history if e["event"] == "rollback"] == \
        [(7, "plain")]


def test_lightning_a_gradient_clipping_override_warns_once_and_restores_the_state_before(
        tmp_path, never_pays):
    """configure_gradient_clipping changes the gradients the step trains on and the replay
    does not run it: one warning naming it and shadow=False, and the old rollback."""
    pl = pytest.importorskip("lightning.pytorch")
    from morphc.integrations.lightning import _no_replay_of_overrides

    class Clipped(pl.LightningModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, 0.1, "value")

    config = morphc.integrations.TrainerBypass(bypass_steps=2, return_steps=2).config
    with pytest.warns(UserWarning, match="configure_gradient_clipping.*shadow=False"):
        _no_replay_of_overrides(Clipped(), config)
    assert not config.shadow
    _no_replay_of_overrides(pl.LightningModule(), config)     # no second warning, nothing on
