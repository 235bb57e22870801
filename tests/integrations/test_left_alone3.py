"""Trainer integrations, third round of what earlier rounds noticed and left alone. Each test
failed before its fix.

- Weights edited in place during a trainer probation (a callback's clamp, a checkpoint's values
  copied in) were undone when plain training beside the run, which never got the edit, was
  handed over at the probation's end; now the edit ends the probation and the run is kept, as
  ``morphc.Bypass`` does.
- A trainer run whose training went NaN at a cycle's last step (its loss, taken before the
  optimizer step, was finite) reported "off the constraint set (residual nan)" — advice to set
  the homotopy to 0 — where ``morphc.contract`` says the run diverged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.integrations import InPlaceExtension, TrainerBypass, module_sites
from morphc.integrations.plain import PlainBeside
from morphc.runtime.cycle import Cycle
from tests.helpers import state_differences, training_state


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


# -- divergence is named as morphc.contract names it ----------------------------------------------
def test_in_place_fold_of_a_nan_branch_says_training_diverged():
    model = _mlp()
    table, modules = module_sites(model)
    ext = InPlaceExtension(model, table.extendable(), modules, width=2)
    model(torch.randn(3, 4))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        ext.branches["0"].alpha.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.ContractionError, match=r"not finite.*branch 0\.alpha.*diverged") \
            as info:
        ext.fold()
    assert "residual" not in str(info.value) and "homotopy" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _run(end_at: int, overflow_at: int):
    """A trainer loop (clipping as HF's does) whose gradient overflows at ``overflow_at``:
    the clip turns every gradient NaN, the step makes the weights NaN, and that step's loss
    (taken before it) was finite. A cycle starts at step 2 (steps 3-4 free, 5-6 return)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tb = TrainerBypass(morphc.Schedule(at=[2]), bypass_steps=2, return_steps=2, verbose=False)
    tb.attach(model, opt, max_grad_norm=1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(1, end_at + 1):
        tb.before_micro_batch()
        loss = F.mse_loss(model(x), y)
        tb.record_loss(loss)
        loss.backward()
        if step == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step == 2:
            start = {k: v.clone() for k, v in model.state_dict().items()}
        tb.after_step(step)
    tb.finish()
    return model, tb, start


@pytest.mark.parametrize("end_at,where", [(6, "at the end of the return phase"),
                                          (5, "training ended during the return phase"),
                                          (3, "training ended during the bypass phase")])
def test_a_trainer_cycle_whose_weights_went_nan_is_rolled_back_as_diverged(end_at, where):
    model, tb, start = _run(end_at, overflow_at=end_at)
    rollbacks = [e for e in tb.history if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and not [e for e in tb.history if e["event"] == "contract"]
    reason = rollbacks[0]["reason"]
    assert reason.startswith(where) and "not finite (NaN/inf): 0.weight" in reason
    assert "Training diverged" in reason and "residual" not in reason
    assert "constraint set" not in reason and "halved" in reason
    # no plain training beside it (no replay): the state from before the extension, bit for bit
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


# -- weights edited during a probation are the user's -----------------------------------------
PROBATION = dict(bypass_steps=2, return_steps=3, width=4, min_lr_fraction=0.0, verbose=False,
                 probation_steps=4)      # a cycle at step 3 is kept at 8, judged again at 12


@pytest.fixture
def plain_overtakes(monkeypatch):
    """Every cycle pays and is kept (plain training beside it reports +10 while it runs), and
    then plain training leads (-10): its state is handed over at the probation's end."""
    step = PlainBeside.step

    def shifted(self, *args, **kwargs):
        step(self, *args, **kwargs)
        self.losses[-1] += 10.0 if len(self.losses) <= 5 else -10.0
        return self.losses[-1]

    monkeypatch.setattr(PlainBeside, "step", shifted)
    monkeypatch.setattr(Cycle, "pays", lambda self, before, after: True)


def _edit(model):
    with torch.no_grad():
        for p in model.parameters():
            p.clamp_(-0.05, 0.05)


def _own_loop(bypass, edit_at: int | None, where: str = "after", steps: int = 16):
    """A trainer's loop around TrainerBypass whose user edits the weights in place once, at
    step ``edit_at``: after the step's end (``"after"``, a callback running after morphc's or
    at the next step's begin) or between ``optimizer.step()`` and it (``"before"``)."""
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    bypass.attach(model, optimizer, replay=lambda b: (F.mse_loss(model(b[0]), b[1]), False))
    for step in range(1, steps + 1):
        batch = (x[step % 8 * 32:][:32], y[step % 8 * 32:][:32])
        optimizer.zero_grad()
        bypass.before_micro_batch()
        bypass.record_inputs(batch)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        bypass.record_loss(loss)
        if step == edit_at and where == "before":
            _edit(model)
        bypass.after_step(step)
        if step == edit_at and where == "after":
            _edit(model)
    bypass.finish()
    return training_state(model, optimizer)


def _probations(bypass):
    return [(e["step"], e["to"]) for e in bypass.history if e["event"] == "probation"]


@pytest.mark.parametrize("where", ["after", "before"])
def test_weights_edited_during_a_trainer_probation_end_it_keeping_the_run(plain_overtakes, where):
    # was: plain training beside the run never got the edit, and at the probation's end (step
    # 12) its state was handed over — the clamp (a checkpoint's values, a projection) undone
    without = _own_loop(TrainerBypass(morphc.Schedule(at=[3]), **{**PROBATION,
                                                                     "probation_steps": 0}),
                        edit_at=10, where=where)
    bypass = TrainerBypass(morphc.Schedule(at=[3]), **PROBATION)
    with pytest.warns(UserWarning, match=r"plain training cannot follow such edits"):
        mine = _own_loop(bypass, edit_at=10, where=where)
    assert _probations(bypass) == [(10, "cycle")]      # at the edit, not at step 12
    assert "edited" in [e for e in bypass.history if e["event"] == "probation"][0]["reason"]
    assert state_differences(mine, without) == []      # the user's run, edit and all


def test_without_an_edit_the_probation_still_hands_plain_training_over(plain_overtakes):
    bypass = TrainerBypass(morphc.Schedule(at=[3]), **PROBATION)
    _own_loop(bypass, edit_at=None)
    assert _probations(bypass) == [(12, "plain")]
