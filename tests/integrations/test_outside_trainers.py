"""The trainer integrations under setups nobody here chose: what a user of the HF Trainer or
Lightning writes (gradient accumulation, evaluation with best-model selection, ...).

Each test is a setup that broke a promise: the callback sees the loss the trainer trains, every
checkpoint and every metric belongs to a model the user can have, and a mistake is a typed
error. Tiny models, CPU, a few dozen steps.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import TokenData, tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf_args(out, **overrides):
    transformers = pytest.importorskip("transformers")
    options = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4,
                   learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, logging_steps=100, seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _callback_options(overrides):
    """The settings both trainers' callbacks take here: short cycles, every cycle kept."""
    return {**dict(bypass_steps=2, return_steps=3, accept="always", width=4,
                   min_lr_fraction=0.0, verbose=False), **overrides}


def _hf_callback(at, **overrides):
    from morphc.integrations.hf import BypassCallback

    return BypassCallback(morphc.Schedule(at=at), **_callback_options(overrides))


def _events(history, kind):
    return [e for e in history if e["event"] == kind]


# -- Hugging Face Trainer ------------------------------------------------------------------------
def test_hf_accumulation_records_the_steps_loss_not_a_share_of_it(tmp_path):
    """transformers normalises each micro-batch's loss by the tokens of the whole accumulated
    step (``num_items_in_batch``), so with accumulation 4 every ``output.loss`` is about a
    quarter of the step's loss. The acceptance window must hold the step's loss, i.e. what the
    Trainer logs for that step."""
    transformers = pytest.importorskip("transformers")
    callback = _hf_callback([4])
    args = _hf_args(tmp_path, gradient_accumulation_steps=4, max_steps=10, logging_steps=1)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenData(),
                                   callbacks=[callback])
    trainer.train()
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    (contract,) = _events(callback.history, "contract")
    expected = sum(logged[s] for s in (2, 3, 4)) / 3         # window = return_steps = 3
    assert contract["loss_before"] == pytest.approx(expected, rel=1e-5)
    expected_after = sum(logged[s] for s in (7, 8, 9)) / 3     # the return phase
    assert contract["loss_after"] == pytest.approx(expected_after, rel=1e-5)


def _eval_loss(model, tmp_path, dataset):
    transformers = pytest.importorskip("transformers")
    args = _hf_args(tmp_path / "eval", per_device_eval_batch_size=8)
    return transformers.Trainer(model=model, args=args).evaluate(dataset)["eval_loss"]


def test_hf_every_metric_and_best_checkpoint_belong_to_the_same_model(tmp_path):
    """``eval_strategy="steps"`` with ``save_strategy="best"`` and ``load_best_model_at_end``:
    the Trainer evaluates, then saves a checkpoint if the metric is a new best — decided after
    ``on_step_end``. An evaluation inside a cycle measured the extended model while the
    checkpoint held the weights without the branch, so the "best" checkpoint did not compute its
    metric. Every checkpoint must reproduce the metric it was chosen for, and the model at the end
    must be the best one."""
    transformers = pytest.importorskip("transformers")
    callback = _hf_callback([2, 7], bypass_steps=3)
    evals = TokenData(16, seed=1)
    args = _hf_args(tmp_path, eval_strategy="steps", eval_steps=3, save_strategy="best",
                    metric_for_best_model="loss", load_best_model_at_end=True,
                    per_device_eval_batch_size=8)
    model = tiny_gpt2()
    keys = list(model.state_dict())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   eval_dataset=evals, callbacks=[callback])
    trainer.train()
    assert _events(callback.history, "extend"), "a cycle started"
    logged = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints
    for ck in checkpoints:
        saved = transformers.GPT2LMHeadModel.from_pretrained(str(ck))
        assert list(saved.state_dict()) == keys
        step = int(ck.name.split("-")[1])
        assert _eval_loss(saved, tmp_path, evals) == pytest.approx(logged[step], rel=1e-5), ck
    assert _eval_loss(model, tmp_path, evals) == pytest.approx(trainer.state.best_metric,
                                                                rel=1e-5)


def test_hf_save_model_mid_cycle_warns_and_saves_the_users_architecture(tmp_path):
    """``trainer.save_model()`` called from a user's callback inside a cycle: the hooks' branch
    is not in the weights, so the saved model does not compute the extended function. It must
    still load into the user's class with the user's keys, and a warning must say how to get the
    full function (resolve first); resolving then saves a model that computes it."""
    transformers = pytest.importorskip("transformers")
    saved: dict[str, object] = {}

    class SaveMidCycle(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6 and bypass.in_cycle:      # return phase, on C
                with pytest.warns(UserWarning, match=r"callback.bypass.resolve"):
                    trainer.save_model(str(tmp_path / "mid"))
                probe = TokenData(4, seed=2).ids
                with torch.no_grad():
                    saved["extended"] = trainer.model(input_ids=probe).logits
                bypass.resolve("saving the full function")
                trainer.save_model(str(tmp_path / "resolved"))
                saved["probe"] = probe

    callback = _hf_callback([2])
    bypass = callback.bypass
    model = tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path), train_dataset=TokenData(),
                                   callbacks=[callback, SaveMidCycle()])
    trainer.train()
    assert "extended" in saved, "the save ran inside a cycle"
    keys = list(model.state_dict())
    mid = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "mid"))
    resolved = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "resolved"))
    assert list(mid.state_dict()) == keys == list(resolved.state_dict())
    with torch.no_grad():
        from_resolved = resolved(input_ids=saved["probe"]).logits
    assert torch.allclose(from_resolved, saved["extended"], rtol=1e-5, atol=1e-5)


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_module(optimizers="one", validation=False):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                     nn.Linear(16, 1))
            if optimizers == "manual":
                self.automatic_optimization = False

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self(x).squeeze(-1), y)
            if optimizers == "manual":
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self(x).squeeze(-1), y))

        def configure_optimizers(self):
            if optimizers == "two":
                return [torch.optim.SGD(self.net[0].parameters(), lr=1e-2),
                        torch.optim.SGD(self.net[2:].parameters(), lr=1e-2)]
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    if not validation:
        Module.validation_step = None
        del Module.validation_step
    torch.manual_seed(0)
    return Module()


def _loader(seed=0, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(-1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _pl_trainer(tmp_path, callbacks, **overrides):
    pl = pytest.importorskip("lightning.pytorch")
    options = dict(max_steps=16, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), callbacks=callbacks,
                   num_sanity_val_steps=0)
    options.update(overrides)
    return pl.Trainer(**options)


def _pl_callback(at, **overrides):
    from morphc.integrations.lightning import BypassCallback

    return BypassCallback(morphc.Schedule(at=at), **_callback_options(overrides))


def test_lightning_monitored_checkpoints_hold_the_model_their_score_measured(tmp_path):
    """``val_check_interval`` inside a cycle with ``ModelCheckpoint(monitor="val_loss")``: the
    validation measured the extended model, then the checkpoint resolved the cycle (rolled
    back in the free phase), so the saved model was not the one its ``val_loss`` scored, and
    ``best_model_path`` pointed at a model with another score."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = _pl_callback([2, 9], bypass_steps=3)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val_loss",
                                  save_top_k=-1, filename="{step}")
    trainer = _pl_trainer(tmp_path, [callback, checkpoints], val_check_interval=4)
    module = _lightning_module(validation=True)
    keys = list(module.state_dict())
    trainer.fit(module, _loader(), _loader(seed=1, n=32))
    assert any("validation" in (e.get("reason") or "") for e in callback.history), \
        "a validation fell inside a cycle"
    paths = sorted((tmp_path / "ck").glob("*.ckpt"))
    assert len(paths) == 4
    x, y = _loader(seed=1, n=32).dataset.tensors
    for path in paths:
        ckpt = torch.load(path, weights_only=False)
        assert list(ckpt["state_dict"]) == keys
        fresh = _lightning_module()
        fresh.load_state_dict(ckpt["state_dict"])
        with torch.no_grad():
            val = F.mse_loss(fresh(x).squeeze(-1), y)
        score = ckpt["callbacks"][checkpoints.state_key]["current_score"]
        assert float(val) == pytest.approx(float(score), rel=1e-5), path.name


def test_lightning_manual_optimization_is_refused_with_what_to_do(tmp_path):
    """``automatic_optimization=False``: the callback cannot see micro-batches or the loss the
    user steps on; refused when training starts, and the error names the way out."""
    callback = _pl_callback([2])
    trainer = _pl_trainer(tmp_path, [callback], enable_checkpointing=False)
    with pytest.raises(morphc.BypassError, match=r"automatic_optimization.*TrainerBypass"):
        trainer.fit(_lightning_module(optimizers="manual"), _loader())


def test_lightning_max_epochs_does_not_start_a_cycle_that_cannot_end(tmp_path):
    """With ``max_epochs`` (no ``max_steps``) the budget is ``estimated_stepping_batches``: a
    cycle due 3 steps before the end (it needs 6) must not start only to be rolled back."""
    callback = _pl_callback([5, 13], bypass_steps=3, return_steps=3)
    trainer = _pl_trainer(tmp_path, [callback], max_steps=-1, max_epochs=1,
                          enable_checkpointing=False)
    trainer.fit(_lightning_module(), _loader())
    assert trainer.global_step == 16
    assert [(e["event"], e["step"]) for e in callback.history] == [
        ("extend", 5), ("return", 8), ("contract", 11)]
