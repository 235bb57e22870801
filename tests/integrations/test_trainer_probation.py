"""A kept trainer cycle goes on probation, as a ``morphc.Bypass`` cycle does.

A cycle kept because it led plain training at its end can be overtaken by plain training later
(a Lightning saturated-MLP run ended +0.8 % worse than plain training after a correctly kept
cycle): plain training now goes on beside the run for ``probation_steps`` and is handed over if
it then leads. Which run leads is made deterministic here by shifting the losses plain training
beside the run *reports* (what it trains is untouched) and keeping every cycle: a hand-over must
then leave plain training's state, bit for bit as the same run without the callback.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.integrations.core import TrainerBypass
from morphc.integrations.plain import PlainBeside
from morphc.runtime.cycle import Cycle
from tests.helpers import state_differences, training_state
from tests.integrations.trainer_runs import hf_run, lightning_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CYCLE = dict(bypass_steps=2, return_steps=3, width=4, min_lr_fraction=0.0, verbose=False,
             probation_steps=4)       # a cycle at step 3 is kept at 8, judged again at 12


@pytest.fixture
def shift(monkeypatch):
    """Every cycle pays; plain training beside it reports its loss at its i-th step (from the
    cycle's start) plus ``shift[0](i)``: +10 while the cycle runs (5 steps), so it is kept."""
    shifts = [lambda i: 10.0]
    step = PlainBeside.step

    def shifted(self, *args, **kwargs):
        step(self, *args, **kwargs)
        self.losses[-1] += (10.0 if len(self.losses) <= 5 else shifts[0](len(self.losses) - 6))
        return self.losses[-1]

    monkeypatch.setattr(PlainBeside, "step", shifted)
    monkeypatch.setattr(Cycle, "pays", lambda self, before, after: True)
    return shifts


def _probations(callback):
    return [(e["step"], e["to"]) for e in callback.history if e["event"] == "probation"]


# -- Hugging Face Trainer ------------------------------------------------------------------------
def _hf_run(tmp_path, callbacks, max_steps=14, **overrides):
    return training_state(*hf_run(tmp_path, callbacks, max_steps, **overrides))


def _hf_callback(**options):
    from morphc.integrations.hf import BypassCallback

    return BypassCallback(morphc.Schedule(at=[3]), **{**CYCLE, **options})


def test_hf_plain_training_that_overtakes_a_kept_cycle_is_handed_over(tmp_path, shift):
    shift[0] = lambda i: -10.0
    plain = _hf_run(tmp_path / "plain", [])
    callback = _hf_callback()
    assert state_differences(_hf_run(tmp_path / "morphc", [callback]), plain) == []
    assert [e["step"] for e in callback.history if e["event"] == "contract"] == [8]
    assert _probations(callback) == [(12, "plain")]


def test_hf_a_kept_cycle_whose_lead_holds_keeps_its_state(tmp_path, shift):
    without = _hf_run(tmp_path / "none", [_hf_callback(probation_steps=0)])
    callback = _hf_callback()
    mine = _hf_run(tmp_path / "morphc", [callback])
    assert state_differences(mine, without) == []
    assert state_differences(mine, _hf_run(tmp_path / "plain", [])) != []
    assert _probations(callback) == [(12, "cycle")]


def test_hf_a_checkpoint_during_a_probation_judges_it_first(tmp_path, shift):
    """The checkpoint holds plain training's model, not the run's that a hand-over at the
    probation's end would replace."""
    from safetensors.torch import load_file

    shift[0] = lambda i: -10.0
    _hf_run(tmp_path / "plain", [], save_strategy="steps", save_steps=10)
    callback = _hf_callback()
    _hf_run(tmp_path / "morphc", [callback], save_strategy="steps", save_steps=10)
    plain = load_file(str(tmp_path / "plain" / "checkpoint-10" / "model.safetensors"))
    mine = load_file(str(tmp_path / "morphc" / "checkpoint-10" / "model.safetensors"))
    assert [k for k in plain if not torch.equal(plain[k], mine[k])] == []
    assert _probations(callback) == [(10, "plain")]


def test_hf_training_that_ends_during_a_probation_judges_it(tmp_path, shift):
    shift[0] = lambda i: -10.0
    plain = _hf_run(tmp_path / "plain", [], max_steps=10)
    callback = _hf_callback()
    assert state_differences(_hf_run(tmp_path / "morphc", [callback], max_steps=10), plain) == []
    assert _probations(callback) == [(10, "plain")]
    assert not callback.bypass.on_probation and not callback.bypass.wants_inputs


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_run(tmp_path, callbacks, max_steps=14, checkpoint=None):
    module, optimizer, _ = lightning_run(tmp_path, callbacks, max_steps, checkpoint)
    return training_state(module, optimizer)


def _lightning_callback(**options):
    from morphc.integrations.lightning import BypassCallback

    return BypassCallback(morphc.Schedule(at=[3]), **{**CYCLE, **options})


def test_lightning_plain_training_that_overtakes_a_kept_cycle_is_handed_over(tmp_path, shift):
    shift[0] = lambda i: -10.0
    plain = _lightning_run(tmp_path / "plain", [])
    callback = _lightning_callback()
    assert state_differences(_lightning_run(tmp_path / "morphc", [callback]), plain) == []
    assert _probations(callback) == [(12, "plain")]


def test_lightning_a_kept_cycle_whose_lead_holds_keeps_its_state(tmp_path, shift):
    without = _lightning_run(tmp_path / "none", [_lightning_callback(probation_steps=0)])
    callback = _lightning_callback()
    mine = _lightning_run(tmp_path / "morphc", [callback])
    assert state_differences(mine, without) == []
    assert state_differences(mine, _lightning_run(tmp_path / "plain", [])) != []
    assert _probations(callback) == [(12, "cycle")]


def test_lightning_a_checkpoint_during_a_probation_judges_it_first(tmp_path, shift):
    shift[0] = lambda i: -10.0
    _lightning_run(tmp_path / "plain", [], checkpoint=10)
    callback = _lightning_callback()
    _lightning_run(tmp_path / "morphc", [callback], checkpoint=10)
    plain, mine = (torch.load(next((tmp_path / run).glob("*step=10.ckpt")), weights_only=False)
                   for run in ("plain", "morphc"))
    assert [k for k in plain["state_dict"]
            if not torch.equal(plain["state_dict"][k], mine["state_dict"][k])] == []
    assert _probations(callback) == [(10, "plain")]


# -- driving TrainerBypass from one's own loop ---------------------------------------------------
def _own_loop(bypass, steps=24, resolve_at=None, loss_first=False):
    """A trainer's loop around TrainerBypass (None: without it); ``resolve_at``: resolve from
    between that step's ``optimizer.step()`` and its end, as a callback loading weights does —
    with the step's loss recorded before the optimizer step (``loss_first``) or not yet."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    if bypass is None:
        bypass = TrainerBypass(shadow=False)
        bypass.after_step = bypass.before_micro_batch = bypass.finish = lambda *a: None
    else:
        bypass.attach(model, optimizer, replay=lambda b: (F.mse_loss(model(b[0]), b[1]), False))
    for step in range(steps):
        batch = (x[step % 8 * 32:][:32], y[step % 8 * 32:][:32])
        optimizer.zero_grad()
        bypass.before_micro_batch()
        bypass.record_inputs(batch)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        if loss_first:
            bypass.record_loss(loss)
        optimizer.step()
        if step + 1 == resolve_at:
            bypass.resolve("weights were loaded")
        if not loss_first:
            bypass.record_loss(loss)
        bypass.after_step(step + 1)
    bypass.finish()
    return training_state(model, optimizer)


def test_a_probation_goes_on_while_plain_training_closes_in_and_no_cycle_starts(shift):
    """Behind by 10 at the cycle's end, by 3 at the probation's: at that pace plain training
    overtakes within another probation, which it then does."""
    shift[0] = lambda i: 3.0 if i < 4 else -10.0
    bypass = TrainerBypass(morphc.Schedule(every=1, start=2), **CYCLE)   # fires at every step
    _own_loop(bypass)
    assert _probations(bypass) == [(12, "longer"), (16, "plain")]
    assert [e["step"] for e in bypass.history if e["event"] == "extend"][0] == 3
    assert [e for e in bypass.history if e["event"] == "extend" and 3 < e["step"] <= 16] == []


def test_shadow_false_or_no_probation_steps_means_no_probation(shift):
    for options in ({"shadow": False}, {"probation_steps": 0}):
        bypass = TrainerBypass(morphc.Schedule(at=[3]), **{**CYCLE, **options})
        _own_loop(bypass, steps=12)
        assert _probations(bypass) == [] and not bypass.on_probation


@pytest.mark.parametrize("loss_first", [False, True])
def test_a_probation_resolved_between_an_optimizer_step_and_its_end_hands_over_that_step(
        shift, loss_first):
    """Plain training takes the step the run just took before its state is handed over: the
    run goes on from where plain training is, not from one step behind it."""
    shift[0] = lambda i: -10.0
    plain = _own_loop(None)
    bypass = TrainerBypass(morphc.Schedule(at=[3]), **CYCLE)
    mine = _own_loop(bypass, resolve_at=11, loss_first=loss_first)
    assert _probations(bypass) == [(10, "plain")]
    assert state_differences(mine, plain) == []
