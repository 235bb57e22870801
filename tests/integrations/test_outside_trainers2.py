"""Never worse than not using it, inside a trainer: a cycle that does not pay costs no steps.

The trainer's step count and LR schedule move on during a cycle; restoring the state from before
it lost the cycle's steps (measured: up to 29 % higher final training loss than plain training
on a tiny BERT). Plain training now steps beside each cycle on the same micro-batches, and a miss
hands its state over: each test compares against the same run without the callback, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.integrations.core import TrainerBypass
from tests.helpers import state_differences, training_state
from tests.integrations.trainer_runs import hf_run, lightning_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- Hugging Face Trainer ------------------------------------------------------------------------
def _hf_run(tmp_path, callbacks, **overrides):
    return hf_run(tmp_path, callbacks, max_steps=10, **overrides)


def _hf_callback(**options):
    from morphc.integrations.hf import BypassCallback

    return BypassCallback(morphc.Schedule(at=[3]), **{
        **dict(bypass_steps=2, return_steps=3, width=4, min_lr_fraction=0.0, verbose=False),
        **options})


def test_hf_a_cycle_that_does_not_pay_leaves_what_plain_training_would_have(tmp_path,
                                                                            never_pays):
    """Gradient accumulation with num_items_in_batch shares, clipping, a decaying lr, dropout:
    after a missed cycle the weights and AdamW state are plain training's, bit for bit."""
    plain = training_state(*_hf_run(tmp_path / "plain", []))
    callback = _hf_callback()
    with_morphc = training_state(*_hf_run(tmp_path / "morphc", [callback]))
    assert state_differences(with_morphc, plain) == []
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert [(e["step"], e["to"]) for e in rollback] == [(8, "plain")]


def test_hf_a_checkpoint_mid_cycle_off_c_holds_plain_trainings_model(tmp_path):
    """A checkpoint due in the free phase rolls the cycle back: to where plain training is,
    not to the model from before the cycle, and the checkpoint holds that (the user's keys)."""
    from safetensors.torch import load_file

    _hf_run(tmp_path / "plain", [], save_strategy="steps", save_steps=5)
    callback = _hf_callback(bypass_steps=4)
    _hf_run(tmp_path / "morphc", [callback], save_strategy="steps", save_steps=5)
    plain = load_file(str(tmp_path / "plain" / "checkpoint-5" / "model.safetensors"))
    mine = load_file(str(tmp_path / "morphc" / "checkpoint-5" / "model.safetensors"))
    assert plain.keys() == mine.keys()
    assert [k for k in plain if not torch.equal(plain[k], mine[k])] == []
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert [(e["step"], e["to"]) for e in rollback] == [(5, "plain")]


# -- driving TrainerBypass from one's own loop ---------------------------------------------------
def _own_loop(bypass, handicap=0.0, steps=24):
    """A steadily improving regression, SGD, driven as a trainer would drive TrainerBypass;
    ``handicap`` is added to the losses recorded during a cycle (an extension that slows
    training down, though the loss still falls below where the cycle began)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)

    def replay(batch):
        xb, yb = batch
        return F.mse_loss(model(xb), yb), False

    if bypass is not None:
        bypass.attach(model, optimizer, replay=replay)
    for step in range(steps):
        batch = (x[step % 8 * 32:][:32], y[step % 8 * 32:][:32])
        optimizer.zero_grad()
        if bypass is not None:
            bypass.before_micro_batch()
            bypass.record_inputs(batch)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        if bypass is not None:
            extra = handicap if bypass.in_cycle else 0.0
            bypass.record_loss(float(loss.detach()) + extra)
            bypass.after_step(step + 1)
    if bypass is not None:
        bypass.finish()
    return model, optimizer


def test_a_cycle_that_trails_plain_training_beside_it_is_not_kept():
    """Its training loss ends below the loss from before it (the only bar without plain
    training beside it) but above plain training's over the same steps: plain training's state
    is handed over, bit for bit."""
    plain = training_state(*_own_loop(None))
    bypass = TrainerBypass(morphc.Schedule(at=[4]), bypass_steps=2, return_steps=4, width=2,
                           min_lr_fraction=0.0, verbose=False)
    mine = training_state(*_own_loop(bypass, handicap=0.3))
    closed = [e for e in bypass.history if e["event"] in ("contract", "rollback")]
    assert [e["event"] for e in closed] == ["rollback"]
    assert closed[0]["loss_after"] < closed[0]["loss_before"]
    assert closed[0]["loss_plain"] < closed[0]["loss_after"]
    assert state_differences(mine, plain) == []


def test_without_a_replay_or_with_shadow_false_a_miss_restores_the_state_before(never_pays):
    """The fallback is the old, bit-identical rollback to the state from before the cycle."""
    bypass = TrainerBypass(morphc.Schedule(at=[4]), bypass_steps=2, return_steps=2, width=2,
                           min_lr_fraction=0.0, shadow=False, verbose=False)
    _own_loop(bypass, steps=12)
    rollback = [e for e in bypass.history if e["event"] == "rollback"]
    assert [e["to"] for e in rollback] == ["before"]


def test_a_replay_that_fails_warns_and_a_miss_restores_the_state_before(never_pays):
    """A training step that cannot run outside the trainer's loop: one warning saying what
    happens instead, and the old rollback."""
    bypass = TrainerBypass(morphc.Schedule(at=[4]), bypass_steps=2, return_steps=2, width=2,
                           min_lr_fraction=0.0, verbose=False)
    attach = bypass.attach

    def failing(model, optimizer, replay):
        def broken(batch):
            raise RuntimeError("needs the trainer")
        attach(model, optimizer, replay=broken)

    bypass.attach = failing
    with pytest.warns(UserWarning, match="could not train plainly beside"):
        _own_loop(bypass, steps=12)
    rollback = [e for e in bypass.history if e["event"] == "rollback"]
    assert [e["to"] for e in rollback] == ["before"] and not bypass.config.shadow


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_run(tmp_path, callbacks):
    return lightning_run(tmp_path, callbacks, max_steps=10)


def test_lightning_a_cycle_that_does_not_pay_leaves_what_plain_training_would_have(
        tmp_path, never_pays):
    """Accumulation 2, norm clipping, dropout, BatchNorm, a logging training_step."""
    from morphc.integrations.lightning import BypassCallback

    module, optimizer, _ = _lightning_run(tmp_path / "plain", [])
    plain = training_state(module, optimizer)
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=3, width=4,
                              min_lr_fraction=0.0, verbose=False)
    module, optimizer, trainer = _lightning_run(tmp_path / "morphc", [callback])
    assert state_differences(training_state(module, optimizer), plain) == []
    rollback = [e for e in callback.history if e["event"] == "rollback"]
    assert [(e["step"], e["to"]) for e in rollback] == [(8, "plain")]
    assert len(optimizer.param_groups) == 1 and not module.net[0]._forward_hooks
