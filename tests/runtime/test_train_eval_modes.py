"""Train/eval modes during a cycle: the loop that validates in ``model.eval()`` between steps and
calls ``m.train()`` inside the closure, BatchNorm frozen mid-cycle, a cycle that begins with the
model in eval mode. A mode the cycle can follow no longer ends it; one the extended graph has
baked in (torch.export) still does, with plain training's state. Either way a run whose cycles
never pay ends where plain training ends, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import regression_task, state_differences, train_step, training_state

STEPS = 26
EXPORT = {"dynamic_shapes": {"input": {0: torch.export.Dim.AUTO}}}   # forces torch.export


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Dropout(0.2), nn.Tanh(),
                         nn.Linear(12, 3))


def _train_inside(x, y):
    def closure(m):
        m.train()
        return F.mse_loss(m(x), y)
    return closure


def _plain_closure(x, y):
    return lambda m: F.mse_loss(m(x), y)


def _train_then_eval(x, y):
    """A closure that leaves the model in eval mode: a cycle starts (and traces) in eval."""
    def closure(m):
        m.train()
        loss = F.mse_loss(m(x), y)
        m.eval()
        return loss
    return closure


def _validates(i, model):
    if i % 5 == 4:
        model.eval()
        with torch.no_grad():
            F.mse_loss(model(torch.ones(4, 6)), torch.zeros(4, 3))


def _freezes_bn(at):
    def between(i, model):
        if i == at:
            model[1].eval()
    return between


def _run(with_bypass, make_closure, between=None, pays=False, steps=STEPS, **kw):
    """Adam with dropout drawing from the global RNG, with Bypass or without; the eval closure
    is a constant unless ``pays`` (then every cycle is judged on real data)."""
    _, batches = regression_task(0, steps)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    options = dict(trigger=morphc.Schedule(every=6), bypass_steps=3, return_steps=3,
                   verbose=False, probation_steps=0)
    if not pays:
        options["eval_closure"] = lambda m: torch.tensor(1.0)
    options.update(kw)
    bp = morphc.Bypass(model, optimizer, **options) if with_bypass else None
    torch.manual_seed(1)
    for i, (x, y) in enumerate(batches):
        train_step(bp, model, optimizer, make_closure(x, y))
        if between is not None:
            between(i, model)
    if bp is not None:
        bp.finish()
    return training_state(model, optimizer), bp


def _ends(bp):
    return [(e["event"], e.get("to"), e.get("reason", "")) for e in bp.history
            if e["event"] in ("contract", "rollback")]


def _mode_ends(bp):
    return [reason for event, _, reason in _ends(bp) if "train/eval mode" in reason]


def test_train_inside_the_closure_after_a_validation_lets_cycles_complete():
    # the model was left in eval() by a validation between steps, the closure puts it back in
    # train(): every cycle ended at its first step after a validation as "a layer put in
    # another train/eval mode", so Bypass never acted. The mode the closure runs the model in
    # is what counts: cycles reach their return and verdict, and one still in flight at
    # finish() contracts exactly (the folded model computes the extension's s = 0 function)
    _, bp = _run(True, _train_inside, _validates, pays=True)
    assert _mode_ends(bp) == []
    assert [e["event"] for e in bp.history].count("return") >= 1
    contracts = [e for e in bp.history if e["event"] == "contract"]
    assert contracts and all(e["deviation"] <= 1e-5 for e in contracts)
    assert all(e["residual"] == 0.0 for e in contracts if not e["finishing"])


def test_train_inside_the_closure_is_plain_training_bit_for_bit_on_a_miss():
    # dropout and BatchNorm: plain training's copy beside the cycle must run in the modes the
    # user's model runs in (it kept its own, missing the validation's eval and the train())
    expected, _ = _run(False, _train_inside, _validates)
    got, bp = _run(True, _train_inside, _validates)
    assert _mode_ends(bp) == [] and len(_ends(bp)) >= 2
    assert {to for _, to, _ in _ends(bp)} == {"plain"}
    assert state_differences(expected, got) == []


def test_train_inside_the_closure_under_export_is_followed_bit_for_bit():
    # an exported graph bakes its modes in, but the extension runs a graph exported in the
    # mode it is called in: the closure's m.train() is followed there too
    expected, _ = _run(False, _train_inside, _validates)
    got, bp = _run(True, _train_inside, _validates, **EXPORT)
    assert bp.history[0]["event"] == "extend"
    assert _mode_ends(bp) == [] and len(_ends(bp)) >= 2
    assert state_differences(expected, got) == []


def test_a_symbolic_graph_calls_the_users_own_layers():
    # what following a layer's mode live rests on: the graph's call_module targets are the
    # user's objects, so model[1].eval() is what the graph runs
    model = _model()
    ext = morphc.extend(model, (torch.randn(8, 6),))
    assert ext.extension_traced.frontend == "symbolic_trace"
    assert ext.graph_module.get_submodule("1") is model[1]
    assert ext.graph_module.get_submodule("2") is model[2]


def test_batchnorm_frozen_mid_cycle_is_followed_by_a_symbolic_graph():
    # symbolic_trace calls the user's BatchNorm as a module, which reads its mode live: the
    # cycle goes on, and on a miss the state is plain training's with BatchNorm frozen
    expected, _ = _run(False, _plain_closure, _freezes_bn(7))
    got, bp = _run(True, _plain_closure, _freezes_bn(7))
    assert bp.history[0]["step"] == 6 and _mode_ends(bp) == []
    assert {to for _, to, _ in _ends(bp)} == {"plain"}
    assert state_differences(expected, got) == []


def test_batchnorm_frozen_mid_cycle_ends_an_exported_cycle_with_plain_trainings_state():
    # torch.export wrote BatchNorm's training mode into the graph: the cycle cannot follow,
    # and ends with plain training's state (which took the step with BatchNorm frozen)
    expected, _ = _run(False, _plain_closure, _freezes_bn(7))
    got, bp = _run(True, _plain_closure, _freezes_bn(7), **EXPORT)
    ended = _mode_ends(bp)
    assert len(ended) == 1 and "export" in ended[0] and "1" in ended[0], ended
    assert _ends(bp)[0][1] == "plain"
    assert state_differences(expected, got) == []


@pytest.mark.slow
def test_a_cycle_that_starts_in_eval_mode_is_followed_bit_for_bit():
    # the closure leaves the model in eval mode, so a cycle begins (and traces) in eval; its
    # steps run the model in train mode, as plain training does
    for kw in ({}, EXPORT):
        expected, _ = _run(False, _train_then_eval, _validates)
        got, bp = _run(True, _train_then_eval, _validates, **kw)
        assert _mode_ends(bp) == [] and len(_ends(bp)) >= 2, kw
        assert state_differences(expected, got) == [], kw


def _train_then_freeze_bn(x, y):
    """Runs the model in train mode, then leaves BatchNorm alone in eval mode: a cycle traces
    BatchNorm in eval, while every step runs it in train mode."""
    def closure(m):
        m.train()
        loss = F.mse_loss(m(x), y)
        for layer in m.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.eval()
        return loss
    return closure


@pytest.mark.slow
def test_the_mode_a_step_runs_the_graph_in_is_judged_not_the_one_it_leaves():
    # an exported graph baked BatchNorm in eval mode; the closure runs it in train mode and
    # only then puts it back: judged by the modes left after the step, the two agreed and the
    # cycle trained BatchNorm frozen where plain training did not. A symbolic graph calls the
    # user's BatchNorm, which reads its mode live
    expected, _ = _run(False, _train_then_freeze_bn)
    got, bp = _run(True, _train_then_freeze_bn, **EXPORT)
    ended = _mode_ends(bp)
    assert ended and all("export" in reason for reason in ended), _ends(bp)
    assert state_differences(expected, got) == []
    got, bp = _run(True, _train_then_freeze_bn)
    assert _mode_ends(bp) == [] and len(_ends(bp)) >= 2
    assert state_differences(expected, got) == []
