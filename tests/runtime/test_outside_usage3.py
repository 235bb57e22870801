"""Probes from a fourth outside-in round: what users do with their model between ``bp.step``
calls — restore a best state (early stopping), run it in training mode for a metric, hand Bypass
a ``torch.compile``d model. A run whose cycles never pay ends where plain training ends, bit for
bit, and whatever the user loaded into the model is what they keep."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import regression_task, state_differences, train_step, training_state

STEPS = 23


def _task(bn: bool = False, steps: int = STEPS):
    model, batches = regression_task(0, steps)
    if bn:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    return model, batches


def _bypass(model, optimizer, **kw):
    """Cycles every 4 steps, none of which can pay (the eval closure is a constant)."""
    options = dict(trigger=morphc.Schedule(every=4), bypass_steps=3, return_steps=3,
                   verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    options.update(kw)
    return morphc.Bypass(model, optimizer, **options)


def _run(with_bypass: bool, between=None, after_loop=None, bn=False, steps=STEPS, **kw):
    """Adam on the task, with Bypass (cycles that never pay) or without; ``between(i, model,
    bp)`` runs after each step, ``after_loop(model)`` after the loop and before ``finish``."""
    model, batches = _task(bn, steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    bp = _bypass(model, optimizer, **kw) if with_bypass else None
    for i, (x, y) in enumerate(batches):
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
        if between is not None:
            between(i, model, bp)
    if after_loop is not None:
        after_loop(model)
    if bp is not None:
        bp.finish()
    return training_state(model, optimizer), bp


def _rollbacks(bp):
    return [e["to"] for e in bp.history if e["event"] == "rollback"]


# -- early stopping: a best state loaded back -----------------------------------------------------
def _keeps_best(at=None, into="model"):
    """Keep a copy of the weights every step; load the copy from step ``at - 2`` back after
    step ``at`` (None: after the loop) into the model, or into its last layer alone."""
    kept = {}

    def between(i, model, bp):
        kept[i] = copy.deepcopy((model if into == "model" else model[2]).state_dict())
        if i == at:
            (model if into == "model" else model[2]).load_state_dict(kept[i - 2])

    def after_loop(model):
        if at is None:
            model.load_state_dict(kept[18])
    return between, after_loop


def test_a_state_loaded_after_the_loop_and_before_finish_is_what_the_user_keeps():
    # early stopping's habit: after the loop, load the best weights, then bp.finish(). The run
    # ends mid-cycle; finish() handed plain training's last state over the weights just loaded
    # (validation 1.166 instead of the loaded 1.120). A load now resolves the cycle first
    between, after_loop = _keeps_best(None)
    expected, _ = _run(False, between, after_loop, steps=22)
    got, bp = _run(True, between, after_loop, steps=22)
    assert _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


@pytest.mark.parametrize("into", ["model", "layer"])
def test_a_state_loaded_mid_cycle_is_trained_on_as_plain_training_would(into):
    # a load mid-cycle was seen as an edit between steps: plain training beside the cycle was
    # dropped with a warning and the miss restored the state from before the cycle, undoing the
    # load (the weights and the step count of Adam's state differed from plain training's)
    # (into one layer: torch runs a load's hooks from the module it is called on down)
    between, _ = _keeps_best(21, into)
    expected, _ = _run(False, between, steps=27)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, bp = _run(True, between, steps=27)
    assert _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


def test_bypass_own_checkpoint_loads_do_not_resolve_anything():
    # bp.load_state_dict loads into the user's model too: it must not judge the cycle it is
    # about to restore; and what it loaded is no edit between steps (the versions it compared
    # were the ones from before the load: plain training beside the cycle was dropped with a
    # warning, and a miss restored the state from before the cycle)
    model, batches = _task()
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2))
    for x, y in batches[:6]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    assert bp.phase == "bypass"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bp.load_state_dict(bp.state_dict())
        assert bp.phase == "bypass" and not _rollbacks(bp)
        clone = copy.deepcopy(model)          # a copy's loads (an EMA, a deep copy) are its own
        clone.load_state_dict(model.state_dict())
        assert bp.phase == "bypass"
        x, y = batches[6]
        bp.step(lambda m: F.mse_loss(m(x), y))
        bp.finish()
    assert _rollbacks(bp) == ["plain"]


# -- a forward in training mode between steps -----------------------------------------------------
def test_batchnorm_statistics_moved_between_steps_are_plain_trainings():
    # a metric computed without model.eval() moves BatchNorm's running statistics — in plain
    # training too. Plain training's copy beside the cycle never saw that forward, and a miss
    # handed its statistics over without it (then: one warning). Between a cycle's steps the
    # model now shows plain training's values: the forward moves plain training's statistics,
    # which keeps them, and a run whose cycles never pay is plain training's, bit for bit
    def forward_in_train_mode(i, model, bp):
        with torch.no_grad():
            model(torch.ones(8, 6))

    expected, _ = _run(False, forward_in_train_mode, bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, bp = _run(True, forward_in_train_mode, bn=True)
    assert _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


def test_an_evaluation_in_eval_mode_between_steps_changes_nothing():
    def evaluate(i, model, bp):
        model.eval()
        with torch.no_grad():
            model(torch.ones(8, 6))
        model.train()

    expected, _ = _run(False, evaluate, bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, bp = _run(True, evaluate, bn=True)
    assert _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


def test_an_edit_after_the_last_step_is_kept_by_finish():
    # a clamp after the last step, then finish() with a cycle in flight: finish handed plain
    # training's state over the clamp. The model shows plain training's values between a
    # cycle's steps, so the clamp is done to them and kept: the end state is the clamped plain
    # run's, as without Bypass
    def clamp_last(model):
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.1, 0.1)

    expected, _ = _run(False, after_loop=clamp_last, steps=22)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, bp = _run(True, after_loop=clamp_last, steps=22)
    assert _rollbacks(bp)[-1] == "plain"
    assert state_differences(expected, got) == []


# -- a model the user compiled --------------------------------------------------------------------
def _compiled_run(with_bypass: bool, **kw):
    model, batches = _task()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    compiled = torch.compile(model)
    bp = _bypass(compiled, optimizer, **kw) if with_bypass else None
    for x, y in batches:
        train_step(bp, compiled, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    if bp is not None:
        assert bp.finish() is model
    return training_state(model, optimizer), bp


def test_a_compiled_model_whose_cycles_never_pay_is_compiled_plain_training():
    # plain training beside each cycle ran the eager copy while the user's run is compiled:
    # inductor's kernels round differently (6e-8 after 23 Adam steps), so a hand-over was not
    # where the user's compiled plain training would be
    expected, _ = _compiled_run(False)
    got, bp = _compiled_run(True, example_inputs=_task()[1][0][0])
    assert _rollbacks(bp) == ["plain", "plain"]
    assert state_differences(expected, got) == []


def test_a_compiled_model_without_example_inputs_takes_its_first_step_compiled():
    # without example_inputs the first step ran the eager model to record its inputs: a run
    # in which no cycle ever starts already differed from compiled plain training
    expected, _ = _compiled_run(False)
    got, bp = _compiled_run(True, trigger=morphc.Schedule(at=[1000]))
    assert state_differences(expected, got) == []


# -- layers put in eval mode for the steps that follow ---------------------------------------------
def _freezes(at: int, which: str):
    def between(i, model, bp):
        if i == at:
            (model if which == "model" else model[1]).eval()
    return between


@pytest.mark.parametrize("which", ["model", "batchnorm"])
def test_a_layer_put_in_eval_mode_mid_cycle_is_followed_bit_for_bit(which):
    # BatchNorm frozen for fine-tuning (or the whole model left in eval mode) from a step in a
    # cycle on: plain training's copy beside it kept the mode it was copied in, and the
    # extended graph the mode it was traced in, so a miss handed over a state trained with
    # BatchNorm in training mode. A mode change now ends the cycle as a replaced layer does
    expected, _ = _run(False, _freezes(21, which), bn=True, steps=27)
    got, bp = _run(True, _freezes(21, which), bn=True, steps=27)
    assert all(to == "plain" for to in _rollbacks(bp))
    assert state_differences(expected, got) == []


def test_a_model_put_in_eval_mode_before_finish_still_has_its_cycle_judged():
    # the habit after a loop: model.eval(), then bp.finish(). The mode is no change of the
    # layers a cycle in flight folds into: finish snaps, contracts and judges it as always
    # (it was taken for a replaced layer and handed plain training's state over)
    model, batches = _task()
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2), trigger=morphc.Schedule(
        at=[3]), accept="always", eval_closure=None)
    for x, y in batches[:8]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    assert bp.phase == "return"
    model.eval()
    bp.finish()
    ends = [e for e in bp.history if e["event"] in ("contract", "rollback")]
    assert [(e["event"], e.get("finishing")) for e in ends] == [("contract", True)]
    assert not model.training, "the user's mode is theirs"


class _OwnBatchNorm(nn.Module):
    """A normalisation whose forward reads ``self.training`` (traced into the graph)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, training=self.training, momentum=0.1)


def test_a_layer_put_in_eval_mode_between_cycles_is_traced_again():
    # a graph is traced once per run and cached per model by the root module's mode: after the
    # user froze one normalisation layer, the next cycle reused the graph traced in training
    # mode, and its steps moved the statistics the user froze
    model, batches = _task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), _OwnBatchNorm(12), nn.Tanh(), nn.Linear(12, 3))
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2))
    for i, (x, y) in enumerate(batches[:21]):
        if i == 10:
            model[1].eval()
        if i == 20:
            assert bp.phase == "bypass" and bp.cycle + bp.failures >= 1   # the second cycle
            stats = [b.clone() for b in model[1].buffers()]
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    assert all(torch.equal(a, b) for a, b in zip(stats, model[1].buffers(), strict=True))
    bp.finish()


def test_a_state_loaded_on_probation_before_finish_is_what_the_user_keeps():
    # after a kept cycle plain training goes on beside the run; a best state loaded after the
    # loop and before finish() was overwritten when finish() ended the probation in plain
    # training's favour. The load now ends the probation first
    gen = torch.Generator().manual_seed(7)
    xj, yj = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)
    model, batches = _task(steps=14)
    holder = {}

    def judge(m):    # the copy beside loses until the cycle is kept, then the user's run does
        kept = any(e["event"] == "contract" for e in holder["bp"].history)
        plain = not (m is model or isinstance(m, morphc.ExtendedModel))
        return F.mse_loss(m(xj), yj) + (10.0 if ((m is model) if kept else plain) else 0.0)

    bp = holder["bp"] = morphc.Bypass(
        model, lambda p: torch.optim.Adam(p, lr=1e-2), trigger=morphc.Schedule(at=[3]),
        bypass_steps=4, return_steps=4, verbose=False, eval_closure=judge, probation_steps=50)
    for i, (x, y) in enumerate(batches):
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        if i == 12:
            best = copy.deepcopy(model.state_dict())
    assert bp._probation is not None
    model.load_state_dict(best)
    bp.finish()
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())


# -- what the user's model holds between steps while a cycle runs ---------------------------------
def test_a_validation_metric_taken_between_steps_is_plain_trainings_when_no_cycle_pays():
    # what a ReduceLROnPlateau or an early stop on a validation loss reads. Between a cycle's
    # steps the user's model held the cycle's base weights without the extension's share —
    # neither plain training's model nor bp.model — and the metrics taken mid-cycle drove
    # decisions plain training would not take (4 seeds, 120 steps, patience 2: the lr left
    # plain training's trajectory on 2, one ending at 1.4e-8 where plain's was 9.4e-4). Now the
    # model shows plain training's values between a cycle's steps
    gen = torch.Generator().manual_seed(9)
    xv, yv = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)

    def measured(with_bypass):
        metrics = []

        def between(i, model, bp):
            model.eval()
            with torch.no_grad():
                metrics.append(F.mse_loss(model(xv), yv).item())
            model.train()
        _run(with_bypass, between)
        return metrics

    assert measured(True) == measured(False)
