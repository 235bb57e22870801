"""Trainer integrations, third round of what earlier rounds noticed and left alone. Each test
failed before its fix.

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
