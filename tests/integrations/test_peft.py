"""PEFT (LoRA) users, outside in: ``get_peft_model(...)`` trained with the trainer callback or
``morphc.Bypass``, then ``save_pretrained`` (the adapter only), ``PeftModel.from_pretrained``,
``merge_and_unload``, ``load_adapter``.

What must hold: only the adapter's trainable weights are sites (the frozen base is bit-identical
after training: ``save_pretrained`` would drop a fold into it); the function after a kept cycle
is all in what ``save_pretrained`` saves; a cycle that does not pay leaves plain training's
state, bit for bit, also when an adapter is loaded mid-cycle.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import morphc
from morphc.integrations.core import raw_optimizer
from tests.helpers import state_differences, training_state

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=32, num_labels=3,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _base(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(
        transformers.BertConfig(**_BERT))


def _lora(seed: int = 0, **options):
    """A 2-layer BERT classifier with LoRA on query/value (dropout on) and the classifier head
    as ``modules_to_save``: PEFT's default for SEQ_CLS."""
    base = _base(seed)
    torch.manual_seed(seed + 1)
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                  lora_dropout=0.1)
    return peft.get_peft_model(base, peft.LoraConfig(**{**config, **options}))


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, _BERT["vocab_size"], (n, length), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def _probe_batch():
    ids = _Data(n=8, seed=5).ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**_probe_batch()).logits
    finally:
        model.train(was)


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _hf_run(tmp_path, callbacks, model=None, **args):
    options = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                   learning_rate=5e-3, lr_scheduler_type="linear", max_grad_norm=1.0,
                   save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                   logging_steps=100, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model if model is not None else _lora(),
                                   args=transformers.TrainingArguments(**{**options, **args}),
                                   train_dataset=_Data(), callbacks=callbacks)
    trainer.train()
    return trainer


def _callback(**options):
    from morphc.integrations.hf import BypassCallback

    return BypassCallback(morphc.Schedule(at=[3]), **{
        **dict(bypass_steps=2, return_steps=2, width=4, min_lr_fraction=0.0, verbose=False),
        **options})


def _events(history) -> list[tuple]:
    return [(e["event"], e["step"], e.get("to")) for e in history]


def test_hf_a_kept_cycle_is_all_in_the_saved_adapter_and_the_base_is_untouched(tmp_path):
    """Sites are the LoRA A/B and the classifier copy only; after a kept cycle the reloaded
    adapter on a fresh base computes what the trained model does, and so does the merge."""
    model = _lora()
    frozen = _frozen(model)
    callback = _callback(accept="always", shadow=False)
    _hf_run(tmp_path / "run", [callback], model)
    assert _events(callback.history) == [("extend", 3, None), ("return", 5, None),
                                         ("contract", 7, None)]
    sites = callback.history[0]["sites"]
    assert sites and all(".lora_A." in s or ".lora_B." in s or ".modules_to_save." in s
                         for s in sites)
    assert all(torch.equal(frozen[n], p) for n, p in _frozen(model).items())
    trained = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), trained)
    merged = reloaded.merge_and_unload()
    assert torch.allclose(_logits(merged), trained, rtol=0, atol=1e-6)


def test_hf_a_missed_cycle_leaves_plain_trainings_adapter_bit_for_bit(tmp_path, never_pays):
    plain = _hf_run(tmp_path / "plain", [])
    callback = _callback()
    mine = _hf_run(tmp_path / "morphc", [callback])
    assert _events(callback.history)[-1] == ("rollback", 7, "plain")
    assert state_differences(training_state(mine.model, raw_optimizer(mine.optimizer)),
                             training_state(plain.model, raw_optimizer(plain.optimizer))) == []


class _LoadAdapter(transformers.TrainerCallback):
    """Loads a saved adapter into the trained one at the end of step ``at`` (restoring an
    earlier adapter, as a user's callback or a schedule of adapters does)."""

    def __init__(self, path, at: int) -> None:
        self.path, self.at = str(path), at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            model.load_adapter(self.path, adapter_name="default", is_trainable=True)


@pytest.mark.parametrize(("order", "at"), [("before", 4), ("before", 5), ("after", 5)])
def test_hf_an_adapter_loaded_mid_cycle_leaves_plain_trainings_state(tmp_path, never_pays, order,
                                                                    at):
    """``load_adapter`` goes through ``load_state_dict``, whose pre-hook resolves the cycle.
    From a callback listed before morphc's, it ran after the optimizer step but before the
    step's end: the cycle's first step was withdrawn to the state before it (the trainer's
    step lost from the optimizer state), a later one handed over plain training one step
    behind. The load now finds plain training's state after that step, as a run without
    morphc has it."""
    _lora(seed=7).save_pretrained(tmp_path / "earlier")
    plain = _hf_run(tmp_path / "plain", [_LoadAdapter(tmp_path / "earlier", at)])
    callback = _callback()
    loader = _LoadAdapter(tmp_path / "earlier", at)
    mine = _hf_run(tmp_path / "morphc",
                   [loader, callback] if order == "before" else [callback, loader])
    assert [e["to"] for e in callback.history if e["event"] == "rollback"] == ["plain"]
    assert state_differences(training_state(mine.model, raw_optimizer(mine.optimizer)),
                             training_state(plain.model, raw_optimizer(plain.optimizer))) == []


def _own_loop(model, bypass: bool, **options):
    """``morphc.Bypass`` over a PeftModel in the user's own loop (or the same loop plain)."""
    data = _Data(n=16)
    ids, mask, labels = data.ids, torch.ones_like(data.ids), data.labels
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)

    def loss(m):
        return F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, labels)

    torch.manual_seed(0)
    if not bypass:
        for _ in range(10):
            optimizer.zero_grad()
            loss(model).backward()
            optimizer.step()
        return optimizer, None
    bp = morphc.Bypass(model, optimizer, morphc.Schedule(at=[2]), bypass_steps=3,
                       return_steps=3, width=4, example_kwargs={"input_ids": ids,
                                                                "attention_mask": mask},
                       eval_closure=loss, verbose=False, **options)
    for _ in range(10):
        bp.step(loss)
    assert bp.finish() is model
    return optimizer, bp


@pytest.mark.parametrize("kept", [True, False])
def test_bypass_in_an_own_loop_trains_the_adapter_only(tmp_path, monkeypatch, kept):
    """Traced through PeftModel's forward (torch.export): the frozen base is no site; a kept
    cycle reloads from the saved adapter; a miss is plain training bit for bit."""
    from morphc.runtime.cycle import Cycle

    monkeypatch.setattr(Cycle, "pays", lambda self, *args: kept)
    model = _lora()
    frozen = _frozen(model)
    optimizer, bp = _own_loop(model, True)
    assert [e["event"] for e in bp.history][-1] == ("probation" if kept else "rollback")
    assert all(".lora_" in s or ".modules_to_save." in s for s in bp.history[0]["sites"])
    assert all(torch.equal(frozen[n], p) for n, p in _frozen(model).items())
    if kept:
        model.save_pretrained(tmp_path / "adapter")
        reloaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "adapter")
        assert torch.equal(_logits(reloaded), _logits(model))
    else:
        plain = _lora()
        plain_optimizer, _ = _own_loop(plain, False)
        assert state_differences(training_state(model, optimizer),
                                 training_state(plain, plain_optimizer)) == []


@pytest.mark.parametrize("dora", [False, True])
def test_the_in_place_fold_keeps_the_whole_peft_models_function(dora):
    """DoRA's weight norm is computed from the adapter's weights, not from the calls the hooks
    see — but PEFT computes it by calling ``lora_B(lora_A(eye))``, so the hooks see that too and
    the fold of a trained (random) extension on C keeps the whole model's logits."""
    from morphc.compiler.deviation import relative_deviation
    from morphc.integrations.extension import InPlaceExtension
    from morphc.integrations.sites import module_sites
    from morphc.ir.sites import select_sites

    model = _lora(use_dora=dora, lora_dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    table, modules = module_sites(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    ext = InPlaceExtension(model, select_sites(table, "all", [], frozen), modules, width=4)
    with torch.no_grad():
        for param in ext.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    ext.set_homotopy(0.0)
    extended = _logits(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ext.fold()
    assert relative_deviation(extended, _logits(model)) < 1e-5
    assert all(not torch.equal(adapter[n], p) for n, p in model.named_parameters()
               if ".lora_A." in n or ".lora_B." in n)      # every branch was folded in


def _lightning_fit(tmp_path, callbacks):
    """A LightningModule holding the PeftModel (``self.model``): the usual way to train PEFT
    under Lightning. Returns the module and the trainer."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _lora()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-3)

    pl.seed_everything(0, verbose=False)
    module = Module()
    trainer = pl.Trainer(max_steps=8, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=callbacks)
    trainer.fit(module, torch.utils.data.DataLoader(_Data(), batch_size=4))
    return module, trainer


def _lightning_loader(path, at: int):
    pl = pytest.importorskip("lightning.pytorch")

    class LoadAdapter(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == at and not getattr(self, "done", False):
                self.done = True
                module.model.load_adapter(str(path), adapter_name="default", is_trainable=True)

    return LoadAdapter()


@pytest.mark.parametrize("at", [4, 5])
def test_lightning_an_adapter_loaded_into_the_peft_submodule_mid_cycle_is_kept(tmp_path,
                                                                             never_pays, at):
    """``load_adapter`` loads into the PeftModel, a submodule of the LightningModule, so a
    load pre-hook on the LightningModule alone never fired: the cycle trained on, and its miss
    handed over plain training's adapter, which had never seen the load (30 tensors lost it)."""
    from morphc.integrations.lightning import BypassCallback

    _lora(seed=7).save_pretrained(tmp_path / "earlier")
    plain, plain_trainer = _lightning_fit(tmp_path, [_lightning_loader(tmp_path / "earlier",
                                                                       at)])
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=2, width=4,
                              min_lr_fraction=0.0, verbose=False)
    mine, trainer = _lightning_fit(tmp_path, [_lightning_loader(tmp_path / "earlier", at),
                                              callback])
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert len(rollback) == 1 and "loaded" in rollback[0]["reason"]
    assert state_differences(training_state(mine, trainer.optimizers[0]),
                             training_state(plain, plain_trainer.optimizers[0])) == []
