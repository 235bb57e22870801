"""Bypass inside Lightning: one callback, nothing else changes.

A small tanh MLP regresses a smooth function with Lightning's loop, its optimizer and LR
scheduler, gradient accumulation and ModelCheckpoint. ``BypassCallback`` extends the
LightningModule's Linear layers in place when the loss plateaus (here also forced at step 30),
folds the branches back into them, and keeps the cycle only if the mean training loss beat the
pre-extension model's. Runs in well under a minute on CPU:

    pip install 'morphc[lightning]'
    python examples/lightning_trainer.py
"""

import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import morphc
from morphc.integrations.lightning import BypassCallback


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 200)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


def main():
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=g)
    y = torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.5 * x[:, 2] * x[:, 3]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True, generator=g)
    module = Regressor()
    keys = list(module.state_dict())
    callback = BypassCallback(morphc.Plateau(window=10) | morphc.Schedule(at=[30]),
                              bypass_steps=15, return_steps=15, width=8)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_steps=150, accumulate_grad_batches=2, accelerator="cpu",
                            devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False,
                            callbacks=[callback, ModelCheckpoint(dirpath=out,
                                                                 every_n_train_steps=75)])
        trainer.fit(module, loader)
    for event in callback.history:
        print({k: event[k] for k in ("event", "step", "loss_before", "loss_after", "deviation",
                                     "reason") if event.get(k) is not None})
    print("same keys:", list(module.state_dict()) == keys)


if __name__ == "__main__":
    main()
