"""Probes from an eighth outside-in round on training usage: an interrupt caught mid-cycle, a new
head added to the optimizer mid-run, gradients accumulated by hand, two Bypass runs over one
optimizer, SWA, freezing, pickling without ``finish``. A run whose cycles never pay ends where
plain training ends, bit for bit; what cannot work is a typed error that says what to do."""

import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import swa_utils

import morphc
from tests.helpers import regression_task, state_differences, train_step, training_state
from tests.runtime.test_outside_usage6 import STEPS, _adam, _bypass  # cycles at 4 and 20


def _rollbacks(bp):
    return [e["to"] for e in bp.history if e["event"] == "rollback"]


# -- Ctrl-C inside the closure, caught by the user ---------------------------------------------
@pytest.mark.parametrize("where", ["plain_copy", "extended"])
def test_an_interrupt_caught_mid_cycle_leaves_the_run_where_plain_training_is(where):
    # the interrupt rolled the cycle back to the state from before it although plain training
    # beside it was whole: a user who caught it and trained on had lost the cycle's steps (every
    # weight and Adam moment differed from plain training's)
    bad_at = 6

    def closure(i, x, y):
        def loss(m):
            if i == bad_at and (where == "plain_copy" or isinstance(m, morphc.ExtendedModel)):
                raise KeyboardInterrupt
            return F.mse_loss(m(x), y)
        return loss

    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)
    for i, (x, y) in enumerate(batches):     # plain training: the first call raises
        if where == "extended" or i != bad_at:
            train_step(None, model, optimizer, closure(i, x, y))
    expected = training_state(model, optimizer)

    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)
    bp = _bypass(model, optimizer)
    for i, (x, y) in enumerate(batches):
        if i == bad_at:
            assert bp.phase == "bypass"
            with pytest.raises(KeyboardInterrupt):
                bp.step(closure(i, x, y))
            assert bp.phase == "train" and bp.model is model
        else:
            bp.step(closure(i, x, y))
    assert bp.finish() is model
    assert _rollbacks(bp)[0] == "plain"
    assert state_differences(expected, training_state(model, optimizer)) == []


# -- a new head joins the optimizer mid-run -------------------------------------------------------
def _head_run(with_bypass: bool, add_at: int):
    """At ``add_at`` the user builds a head the loss runs after the model and adds it to the
    optimizer with ``add_param_group``; model, head and optimizer state come back."""
    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)
    bp = _bypass(model, optimizer) if with_bypass else None
    head, phases = None, []
    for i, (x, y) in enumerate(batches):
        if i == add_at:
            phases.append(bp.phase if bp is not None else None)
            torch.manual_seed(5)
            head = nn.Linear(3, 3)
            optimizer.add_param_group({"params": head.parameters(), "lr": 1e-2})
        train_step(bp, model, optimizer, lambda m, x=x, y=y, head=head:
                   F.mse_loss(m(x) if head is None else head(m(x)), y))
    if bp is not None:
        bp.finish()
    whole = nn.Sequential(model, head)
    return training_state(whole, optimizer), phases, bp


def test_a_head_added_to_the_optimizer_mid_cycle_trains_as_plain_training_does():
    # plain training beside the cycle had no copy of the head, so it was dropped: the cycle's
    # miss restored the state from before it (the model lost the cycle's steps, the head kept
    # the cycle's values and Adam moments)
    expected, _, _ = _head_run(False, add_at=5)
    got, phases, bp = _head_run(True, add_at=5)
    assert phases == ["bypass"] and _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


# -- gradients that reach the model between steps ------------------------------------------------
def test_gradients_accumulated_by_hand_between_steps_are_named_once():
    # bp.step's zero_grad dropped the micro-batches' gradients without a word: the run trained
    # on every second batch alone, behind plain training's accumulated steps. It still drops
    # them, as a plain loop's zero_grad does (a diagnostic backward between steps is legal
    # PyTorch), but says so once, with how to accumulate
    model, batches = regression_task(0, STEPS)
    bp = _bypass(model, _adam(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches):
            if i % 2 == 0:
                (F.mse_loss(model(x), y) / 2).backward()
            else:
                bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y) / 2)
    named = [w for w in caught if re.search("accumulate.*one closure.*zero_grad", str(w.message))]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert bp.finish() is model


def _shared_optimizer_run(with_bypass: bool):
    """An encoder and a decoder with BatchNorm, one Adam over both, a Bypass over each (their
    cycles overlap); every step is followed by ``zero_grad(set_to_none=False)``."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
    dec = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=5e-2)
    _, batches = regression_task(0, 13)      # cycles at steps 4 (encoder) and 5 (decoder)
    bp_enc = _bypass(enc, optimizer) if with_bypass else None
    bp_dec = _bypass(dec, optimizer, trigger=morphc.Schedule(every=5)) if with_bypass else None
    for x, y in batches:
        train_step(bp_enc, enc, optimizer, lambda m, x=x, y=y: F.mse_loss(dec(m(x)), y))
        optimizer.zero_grad(set_to_none=False)
        train_step(bp_dec, dec, optimizer, lambda m, x=x, y=y: F.mse_loss(m(enc(x)), y))
    for bp in (bp_enc, bp_dec):
        if bp is not None:
            bp.finish()
    return training_state(nn.Sequential(enc, dec), optimizer), (bp_enc, bp_dec)


@pytest.mark.slow
def test_two_bypass_runs_over_one_optimizer_are_plain_training_and_raise_nothing():
    """Each run's step leaves gradients on the other's weights that its optimizer step took:
    no gradient is lost, so neither run refuses them; zeroed gradients are nothing either."""
    expected, _ = _shared_optimizer_run(False)
    got, runs = _shared_optimizer_run(True)
    assert all(_rollbacks(bp) and set(_rollbacks(bp)) == {"plain"} for bp in runs)
    assert state_differences(expected, got) == []


# -- habits that kept the guarantee as they were ------------------------------------------------
def _habit_run(with_bypass: bool, habit):
    model, batches = regression_task(0, STEPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    bp = _bypass(model, optimizer, min_lr_fraction=0.0) if with_bypass else None
    seen = {}
    for i, (x, y) in enumerate(batches):
        habit(i, model, optimizer, seen, lambda c: train_step(bp, model, optimizer, c), x, y)
    if bp is not None:
        bp.finish()
    return training_state(model, optimizer), seen, bp


def _freeze(i, model, optimizer, seen, step, x, y):
    if i == 5:
        model[0].requires_grad_(False)       # mid-cycle
    step(lambda m: F.mse_loss(m(x), y))


def _swa(i, model, optimizer, seen, step, x, y):
    if i == 0:
        seen["avg"] = swa_utils.AveragedModel(model)
        seen["swalr"] = swa_utils.SWALR(optimizer, swa_lr=0.01, anneal_epochs=3)
    step(lambda m: F.mse_loss(m(x), y))
    if i >= 8:
        seen["avg"].update_parameters(model)
        seen["swalr"].step()
    if i == STEPS - 1:
        swa_utils.update_bn([x], seen["avg"])
        seen["avg"] = {k: v.clone() for k, v in seen["avg"].state_dict().items()}
        del seen["swalr"]


def _pickled(i, model, optimizer, seen, step, x, y):
    step(lambda m: F.mse_loss(m(x), y))
    if i in (5, STEPS - 2):                  # mid-cycle, and never calling finish after
        seen[i] = pickle.loads(pickle.dumps(model)).state_dict()


def _train_in_closure(i, model, optimizer, seen, step, x, y):
    def loss(m):
        m.train()
        return F.mse_loss(m(x), y)
    step(loss)
    model.eval()                             # a validation, left in eval mode
    with torch.no_grad():
        seen[i] = F.mse_loss(model(x), y)


@pytest.mark.parametrize("habit", [_freeze, _swa, _pickled, _train_in_closure],
                         ids=["freeze_mid_cycle", "swa_update_bn", "pickled_without_finish",
                              "train_in_closure_eval_between"])
def test_habits_whose_cycles_never_pay_are_plain_training_bit_for_bit(habit):
    expected, seen_plain, _ = _habit_run(False, habit)
    got, seen, bp = _habit_run(True, habit)
    assert _rollbacks(bp) and set(_rollbacks(bp)) == {"plain"}
    assert state_differences(expected, got) == []
    assert seen.keys() == seen_plain.keys()
    for key, value in seen.items():
        pairs = value.items() if isinstance(value, dict) else [(key, value)]
        for name, tensor in pairs:
            plain = seen_plain[key][name] if isinstance(value, dict) else seen_plain[key]
            assert torch.equal(tensor, plain), (key, name)
