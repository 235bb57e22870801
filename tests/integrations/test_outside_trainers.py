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

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, vocab=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_args(out, **overrides):
    transformers = pytest.importorskip("transformers")
    options = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4,
                   learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, logging_steps=100, seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _hf_callback(at, **overrides):
    from morphc.integrations.hf import BypassCallback

    options = dict(bypass_steps=2, return_steps=3, accept="always", width=4,
                   min_lr_fraction=0.0, verbose=False)
    options.update(overrides)
    return BypassCallback(morphc.Schedule(at=at), **options)


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
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=_Tokens(),
                                   callbacks=[callback])
    trainer.train()
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    (contract,) = _events(callback.history, "contract")
    expected = sum(logged[s] for s in (2, 3, 4)) / 3         # window = return_steps = 3
    assert contract["loss_before"] == pytest.approx(expected, rel=1e-5)
    expected_after = sum(logged[s] for s in (7, 8, 9)) / 3     # the return phase
    assert contract["loss_after"] == pytest.approx(expected_after, rel=1e-5)
