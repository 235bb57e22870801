"""Short real runs of the Hugging Face Trainer and of Lightning that the trainer tests compare
with and without a morphc callback: gradient accumulation, clipping, dropout and (Lightning)
BatchNorm, so that "bit-identical to plain training" is tested where trainers differ most."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from morphc.integrations.core import raw_optimizer
from tests.helpers import TokenData, tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_run(tmp_path, callbacks, max_steps, **overrides):
    """A tiny GPT-2 with dropout under the Trainer; returns (model, the raw optimizer)."""
    transformers = pytest.importorskip("transformers")
    options = dict(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="linear",
                   max_grad_norm=0.5, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, logging_steps=100, seed=0, dataloader_num_workers=0)
    model = tiny_gpt2(dropout=0.1)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        **{**options, **overrides}), train_dataset=TokenData(), callbacks=callbacks)
    trainer.train()
    return model, raw_optimizer(trainer.optimizer)


def lightning_run(tmp_path, callbacks, max_steps, checkpoint=None):
    """A saturating MLP with dropout and BatchNorm under Lightning, accumulation 2, clipping;
    ``checkpoint`` saves every that many steps. Returns (module, optimizer, trainer)."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2),
                                     nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                     nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x).squeeze(-1), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.sin(x.sum(-1))),
                                         batch_size=8)
    extra = [] if checkpoint is None else [pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), every_n_train_steps=checkpoint, save_top_k=-1)]
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=checkpoint is not None,
                         default_root_dir=str(tmp_path), callbacks=[*callbacks, *extra],
                         num_sanity_val_steps=0, accumulate_grad_batches=2,
                         gradient_clip_val=0.5)
    trainer.fit(module, loader)
    return module, trainer.optimizers[0], trainer
