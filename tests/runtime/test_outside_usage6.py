"""Probes from a seventh outside-in round on training usage: checkpoints the user takes of their
own model and optimizer mid-cycle, GANs with two Bypass runs, EMAs and seeds set between steps,
Bypass over a part of the model the optimizer trains whole. A run whose cycles never pay ends
where plain training ends, bit for bit."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import morphc
from tests.helpers import regression_task, state_differences, train_step, training_state

STEPS = 23


def _bypass(model, optimizer, **kw):
    """Cycles every 4 steps (at steps 4 and 20 in 23), none of which can pay."""
    options = dict(trigger=morphc.Schedule(every=4), bypass_steps=3, return_steps=3,
                   verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    options.update(kw)
    return morphc.Bypass(model, optimizer, **options)


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=5e-2)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loaded(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


# -- the user's own checkpoint of model and optimizer, mid-cycle ---------------------------------
def _checkpointed_at(with_bypass: bool, at: int):
    """Train to step ``at`` and save ``model.state_dict()`` and ``optimizer.state_dict()`` as a
    user's loop does; then a fresh model, optimizer (and Bypass) resume from the file."""
    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)
    bp = _bypass(model, optimizer) if with_bypass else None
    for x, y in batches[:at]:
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    mid_cycle = bp is not None and bp.phase != "train"
    file = _saved({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    with warnings.catch_warnings():      # the first process ends here, mid-cycle
        warnings.simplefilter("ignore")
        del bp
    saved = _loaded(file)
    fresh, _ = regression_task(1, 0)
    fresh.load_state_dict(saved["model"])
    optimizer = _adam(fresh)
    optimizer.load_state_dict(saved["optimizer"])
    bp = _bypass(fresh, optimizer) if with_bypass else None
    for x, y in batches[at:]:
        train_step(bp, fresh, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    if bp is not None:
        bp.finish()
    return _loaded(file), training_state(fresh, optimizer), mid_cycle


@pytest.mark.parametrize("at", [5, 6])
def test_a_checkpoint_the_user_takes_mid_cycle_is_plain_trainings_and_resumes_as_it(at):
    # between a cycle's steps the model showed plain training's weights, but the optimizer
    # still held the cycle's moments: a checkpoint of both paired plain weights with the
    # extended run's Adam state, and a run resumed from it was neither plain training nor
    # the cycle's (every exp_avg differed at the checkpoint)
    plain, plain_end, _ = _checkpointed_at(False, at)
    mine, mine_end, mid_cycle = _checkpointed_at(True, at)
    assert mid_cycle
    assert [k for k in plain["model"] if not torch.equal(plain["model"][k], mine["model"][k])] \
        == []
    theirs, ours = plain["optimizer"]["state"], mine["optimizer"]["state"]
    assert theirs.keys() == ours.keys()
    assert [(i, k) for i in theirs for k in theirs[i]
            if not torch.equal(theirs[i][k], ours[i][k])] == []
    assert state_differences(plain_end, mine_end) == []


@pytest.mark.parametrize("shadow", [True, False])
def test_an_optimizer_state_loaded_mid_cycle_is_what_the_user_keeps(shadow):
    # restoring a best checkpoint mid-cycle, optimizer first: only a load into the model
    # resolved the cycle, and the hand-over of plain training's state (or the rollback to the
    # state from before the cycle) then wrote its own Adam moments over what was just loaded.
    # A load into the optimizer resolves the cycle first, as one into the model does
    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)
    bp = _bypass(model, optimizer, shadow=shadow)
    kept = None
    for i, (x, y) in enumerate(batches[:6]):
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        if i == 1:
            kept = _saved({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert bp.phase != "train"
    best = _loaded(kept)
    optimizer.load_state_dict(best["optimizer"])
    assert bp.phase == "train"
    model.load_state_dict(best["model"])
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    now, then = optimizer.state_dict()["state"], _loaded(kept)["optimizer"]["state"]
    assert [(i, k) for i in then for k in then[i] if not torch.equal(now[i][k], then[i][k])] == []
    bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))      # and trains on from there
