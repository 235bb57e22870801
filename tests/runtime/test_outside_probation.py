"""Probation and the growing free phase probed from the outside: what a user does around a
kept cycle (converts the model, trains with on_failure="raise") and settings the tests of the
features did not try (an odd bypass_steps)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import morphc
from tests.runtime.test_bypass import events, snapshot
from tests.runtime.test_bypass_pays import _dropout_bn_task
from tests.runtime.test_free_phase import bypass, free_steps, run, stalled_regression
from tests.runtime.test_probation import _bypass, _train


def _on_probation(**kw):
    """A run 15 steps in: its cycle was kept at step 11 and plain training runs beside it."""
    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=True, **kw)
    _train(bp, batches[:15])
    assert bp._probation is not None
    return bp, model, batches


def test_a_model_converted_on_probation_trains_on_and_keeps_the_users_run():
    """``model.double()`` mid-run is the user's business: the copy beside it, still in float32,
    cannot take the step, and must not make the user's step fail; it cannot be handed over
    either (its tensors are of the old dtype)."""
    bp, model, batches = _on_probation()
    model.double()
    bp.optimizer.load_state_dict(bp.optimizer.state_dict())    # casts Adam's state along
    weights = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches[15:]:
            loss = bp.step(lambda m, x=x, y=y: F.mse_loss(m(x.double()), y.double()))
            assert loss.dtype == torch.float64
    bp.finish()
    assert bp._probation is None
    assert all(v.dtype == torch.float64 for v in model.state_dict().values()
               if v.is_floating_point())
    assert any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items()), \
        "the user's model trained on"
    assert not [e for e in events(bp, "probation") if e["to"] == "plain"]
    dropped = [e for e in events(bp, "probation") if e.get("reason")]
    assert dropped and dropped[0]["to"] == "cycle", "the dropped probation is in the history"


def test_a_non_finite_batch_raised_on_probation_does_not_end_it():
    """With on_failure="raise" a non-finite loss is a BypassError whose step was skipped — and
    plain training beside the run skipped it too: the two are still in step, so the probation
    goes on and judges the kept cycle as it would have."""
    bp, model, batches = _on_probation(on_failure="raise")
    x, y = batches[15]
    with pytest.raises(morphc.BypassError, match="non-finite"):
        bp.step(lambda m: F.mse_loss(m(x), y) * float("nan"))
    assert bp._probation is not None, "the copy did not move: the probation goes on"
    _train(bp, batches[16:])
    bp.finish()
    assert [e["to"] for e in events(bp, "probation")] == ["plain"]


def test_a_free_phase_of_odd_length_grows_too(bypass_steps=9):
    """The free phase is measured every bypass_steps // 2 steps; with an odd bypass_steps no
    measurement fell on its last step, so it never grew."""
    model, closure = stalled_regression()
    bp = bypass(model, bypass_steps=bypass_steps, max_bypass_steps=30, accept="if_better")
    run(bp, closure, 80)
    window = bypass_steps // 2
    assert free_steps(bp) == [bypass_steps + (30 - bypass_steps) // window * window]
