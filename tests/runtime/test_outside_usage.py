"""Probes of Bypass in training set-ups users really have that the other outside-in probes did
not try: a model the user changes mid-run, objectives and optimizers outside the usual mould,
checkpoints and several runs side by side. Each either ends where plain training ends, bit for bit,
keeps a cycle on merit, or fails at once with a typed error that says what to do."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import regression_task, train_step
from tests.runtime.test_outside_probation import _on_probation
from tests.runtime.test_probation import _train


def _task(seed=0, steps=20):
    return regression_task(seed, steps)


def _never_pays(**kw):
    """Cycles every 3 steps, none of which can pay (the eval closure is a constant)."""
    options = dict(trigger=morphc.Schedule(every=3), bypass_steps=3, return_steps=3,
                   verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    options.update(kw)
    return options


def _whole(model, optimizer):
    """Every parameter, buffer and optimizer state entry, cloned, by name; and the RNG."""
    state = {n: {k: v.clone() if torch.is_tensor(v) else v
                 for k, v in optimizer.state[p].items()}
             for n, p in model.named_parameters() if p in optimizer.state}
    return ({k: v.clone() for k, v in model.state_dict().items()}, state,
            torch.get_rng_state())


def _assert_same(got, expected):
    (weights, state, rng), (weights_x, state_x, rng_x) = got, expected
    assert weights.keys() == weights_x.keys() and state.keys() == state_x.keys()
    for k in weights:
        assert torch.equal(weights[k], weights_x[k]), f"weight {k}"
    for n in state:
        for k, v in state[n].items():
            assert torch.equal(v, state_x[n][k]) if torch.is_tensor(v) else v == state_x[n][k], \
                f"optimizer state {n}.{k}"
    assert torch.equal(rng, rng_x), "the global RNG is where plain training leaves it"


def _events(bp, kind):
    return [e for e in bp.history if e["event"] == kind]


# -- the user changes the model mid-run ---------------------------------------------------------
def _grow(model, optimizer):
    """Replace the last layer by a deeper head and train it too, as a user growing a model does
    (its initial weights drawn from the global RNG)."""
    head = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    model[2] = head
    optimizer.add_param_group({"params": list(head.parameters())})


def _run(batches, model, optimizer, grow_at, bp=None):
    for i, (x, y) in enumerate(batches):
        if i == grow_at:
            _grow(model, optimizer)
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    if bp is not None:
        bp.finish()
    return _whole(model, optimizer)


@pytest.mark.parametrize("grow_at", [5, 8, 11], ids=["free_phase", "return_phase", "between"])
def test_a_layer_the_user_replaces_mid_run_costs_no_plain_training_step(grow_at):
    """A layer replaced inside a cycle left the extended graph training the old one until the
    fold failed, then the rollback died on a KeyError; replaced between cycles, the next cycle
    extended the stale trace and lost its steps. Now the cycle ends at once with plain training's
    state, the next one extends the new model, and the run is plain training's, bit for bit."""
    model, batches = _task()
    expected = _run(batches, model, torch.optim.Adam(model.parameters(), lr=1e-2), grow_at)
    model, batches = _task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    bp = morphc.Bypass(model, optimizer, **_never_pays())
    _assert_same(_run(batches, model, optimizer, grow_at, bp), expected)
    assert not [e for e in _events(bp, "rollback") if e["to"] != "plain"]
    later = [e for e in _events(bp, "extend") if e["step"] > grow_at]
    assert later and all("2.0" in e["sites"] for e in later), "later cycles extend the new head"


def test_a_layer_replaced_mid_cycle_without_a_copy_keeps_its_own_weights():
    """``shadow=False``: the state from before the cycle comes back for the layers that were
    there, and the layer the user put in keeps the weights the user gave it."""
    model, batches = _task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    bp = morphc.Bypass(model, optimizer, **_never_pays(shadow=False))
    for x, y in batches[:4]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    assert bp.phase == "bypass"
    before = {k: v.clone() for k, v in bp._cycle.snapshot.params.items() if k.startswith("0.")}
    _grow(model, optimizer)
    head = {k: v.clone() for k, v in model[2].state_dict().items()}
    x, y = batches[4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bp.step(lambda m: F.mse_loss(m(x), y))
    assert bp.phase == "train" and _events(bp, "rollback")[-1]["to"] == "before"
    assert all(not torch.equal(p, before[f"0.{k}"]) for k, p in model[0].named_parameters()), \
        "the first layer is back where it was before the cycle, then trained on this batch"
    assert all(not torch.equal(v, head[k]) for k, v in model[2].state_dict().items()), \
        "the new head took this batch's plain step from the weights the user gave it"
    bp.finish()


def test_a_layer_replaced_on_probation_ends_it_and_keeps_the_users_run():
    """The copy beside a kept cycle's run still has the old layer: it is no longer plain
    training of the user's model, and handing its weights over would put them under a layer
    they were not trained with. The probation ends and the user's run is kept."""
    bp, model, batches = _on_probation()
    model[2] = nn.ReLU()           # no parameter changes: only the layers tell
    _train(bp, batches[15:])
    bp.finish()
    ended = _events(bp, "probation")
    assert len(ended) == 1 and ended[0]["to"] == "cycle" and ended[0].get("reason")


# -- closures that differentiate inside ---------------------------------------------------------
def _physics_informed(x):
    """The residual of u'' = -sin(x) and the boundary values: a closure that calls
    ``torch.autograd.grad(..., create_graph=True)`` on the module's output, as a PINN or a
    gradient penalty does."""
    def closure(m):
        xx = x.clone().requires_grad_(True)
        u = m(xx)
        du, = torch.autograd.grad(u.sum(), xx, create_graph=True)
        d2u, = torch.autograd.grad(du.sum(), xx, create_graph=True)
        return (d2u + torch.sin(xx)).pow(2).mean() + m(x[[0, -1]]).pow(2).mean()
    return closure


@pytest.mark.parametrize("judge", ["closure", "eval_closure"])
def test_a_closure_that_differentiates_inside_is_judged_and_cycles_run(judge):
    """Cycles are judged by calling the closure again: under no_grad, ``autograd.grad`` inside it
    raised an untyped RuntimeError from ``bp.step`` at the first plateau, ending a run plain
    training finishes. Judged with autograd on, the cycle runs and is judged on its merit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    closure = _physics_informed(torch.linspace(0, 3.14159, 32).unsqueeze(1))
    options = dict(trigger=morphc.Schedule(at=[3]), bypass_steps=3, return_steps=3,
                   verbose=False)
    if judge == "eval_closure":
        options["eval_closure"] = closure
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2), **options)
    for _ in range(12):
        bp.step(closure)
    bp.finish()
    closed = _events(bp, "contract") + _events(bp, "rollback")
    assert len(closed) == 1 and closed[0]["loss_after"] is not None
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# -- an objective to maximise ---------------------------------------------------------------------
def _rising(steps=120):
    """A regression trained on ``-mse`` with ``maximize=True``: the objective rises every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)
    return model, lambda m: -F.mse_loss(m(x), y), steps


def test_an_objective_maximised_and_still_rising_starts_no_cycle():
    """With ``maximize=True`` the closure returns what training raises: the trigger took the
    rising objective for a loss that stopped falling and started cycle after cycle on healthy
    training — each one's steps lost without a copy beside it. Now it is plain training."""
    model, closure, steps = _rising()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, maximize=True)
    for _ in range(steps):
        optimizer.zero_grad()
        closure(model).backward()
        optimizer.step()
    expected = _whole(model, optimizer)
    model, closure, steps = _rising()
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-3, maximize=True),
                       trigger=morphc.Plateau(window=10), bypass_steps=5, return_steps=5,
                       shadow=False, verbose=False)
    for _ in range(steps):
        bp.step(closure)
    bp.finish()
    assert not _events(bp, "extend")
    _assert_same(_whole(model, bp.optimizer), expected)


def test_a_cycle_that_raises_a_maximised_objective_past_plain_training_is_kept():
    """The verdict reads the objective the right way up: a cycle whose model the eval closure
    scores above plain training's copy is kept (read as a loss, it was handed plain training)."""
    model, closure, _ = _rising()
    penalised = []

    def judge(m):               # plain training's copy scores lower by 10
        copy = not (m is model or isinstance(m, morphc.ExtendedModel))
        penalised.append(copy)
        return closure(m) - (10.0 if copy else 0.0)
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
                       trigger=morphc.Schedule(at=[3]), bypass_steps=3, return_steps=3,
                       eval_closure=judge, probation_steps=0, verbose=False)
    for _ in range(12):
        bp.step(closure)
    bp.finish()
    assert any(penalised) and len(_events(bp, "contract")) == 1 and not _events(bp, "rollback")


def test_param_groups_that_disagree_on_maximize_are_refused():
    model, _, _ = _rising()
    mixed = torch.optim.Adam([{"params": model[0].parameters(), "maximize": True},
                              {"params": model[2].parameters()}], lr=1e-2)
    with pytest.raises(morphc.BypassError, match="disagree on maximize"):
        morphc.Bypass(model, mixed)


# -- parameters the optimizer trains outside the model ---------------------------------------------
def _with_temperature():
    """A classifier whose loss scales the logits by a learnable temperature that lives outside the
    model, trained by the same optimizer (as metric-learning and calibration losses do)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    temperature = nn.Parameter(torch.tensor(1.0))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    optimizer = torch.optim.Adam([*model.parameters(), temperature], lr=1e-2)
    return model, temperature, optimizer, lambda m: F.cross_entropy(m(x) * temperature, y)


def _outside_state(temperature, optimizer):
    return temperature.detach().clone(), {k: v.clone() for k, v in
                                          optimizer.state[temperature].items()}


def test_a_parameter_outside_the_model_follows_plain_training_beside_the_cycle():
    """The copy beside a cycle copied the model and the optimizer, but the closure reads the
    user's temperature: plain training's steps moved nothing of it and the hand-over left it
    where the cycle's run had trained it. Now it takes plain training's values too."""
    model, temperature, optimizer, closure = _with_temperature()
    for _ in range(20):
        optimizer.zero_grad()
        closure(model).backward()
        optimizer.step()
    expected = _whole(model, optimizer), _outside_state(temperature, optimizer)
    model, temperature, optimizer, closure = _with_temperature()
    bp = morphc.Bypass(model, optimizer, **_never_pays())
    for _ in range(20):
        bp.step(closure)
    bp.finish()
    assert _events(bp, "rollback") and all(e["to"] == "plain" for e in _events(bp, "rollback"))
    _assert_same(_whole(model, optimizer), expected[0])
    got = _outside_state(temperature, optimizer)
    assert torch.equal(got[0], expected[1][0]) and got[1].keys() == expected[1][1].keys()
    assert all(torch.equal(v, expected[1][1][k]) for k, v in got[1].items())


def test_a_parameter_outside_the_model_is_restored_by_a_rollback():
    """``shadow=False``: a cycle that does not pay restores the state from before it — the
    temperature and its optimizer state too, which the snapshot of the model left out."""
    model, temperature, optimizer, closure = _with_temperature()
    bp = morphc.Bypass(model, optimizer, **_never_pays(shadow=False))
    for _ in range(3):
        bp.step(closure)
    assert bp.phase == "bypass"           # extended right after this step's update
    value, state = _outside_state(temperature, optimizer)
    while bp.phase != "train":
        bp.step(closure)
    assert _events(bp, "rollback")[-1]["to"] == "before"
    assert torch.equal(temperature.detach(), value)
    assert all(torch.equal(v, state[k]) for k, v in optimizer.state[temperature].items())
    bp.finish()


# -- a scheduler fed the loss bp.step returns -----------------------------------------------------
def _full_batch(steps=40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)
    return model, [(x, y)] * steps


def _on_plateau(optimizer):
    """Cut the lr whenever the loss fails to fall: the strictest ReduceLROnPlateau."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=0.0)


def test_reduce_lr_on_plateau_fed_bp_steps_loss_is_plain_trainings_when_no_cycle_pays():
    """``scheduler.step(bp.step(...))``: the extended model's losses during a cycle cut the lr
    (0.03 → 3e-9 here) of a run then handed plain training's weights, which never cut it.
    While plain training runs beside a cycle, bp.step returns its loss: bit for bit, lr too."""
    model, batches = _full_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    scheduler = _on_plateau(optimizer)
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step(float(loss))
    expected, lr = _whole(model, optimizer), optimizer.param_groups[0]["lr"]
    model, batches = _full_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    scheduler = _on_plateau(optimizer)
    bp = morphc.Bypass(model, optimizer, **_never_pays(min_lr_fraction=0.0))
    for x, y in batches:
        scheduler.step(bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y)))
    bp.finish()
    assert _events(bp, "rollback") and optimizer.param_groups[0]["lr"] == lr
    _assert_same(_whole(model, optimizer), expected)


def test_reduce_lr_on_plateau_fed_bp_steps_loss_on_probation_is_plain_trainings():
    """A kept cycle's probation that ends with plain training's state handed over: bp.step
    returned plain training's loss on every step, the scheduler saw what it sees without
    Bypass, and the lr is plain training's too."""
    def train(bypass):
        model, batches = _full_batch()
        x, y = batches[0]
        kept, losses = [], []

        def judge(m):   # the copy loses until the cycle is kept, then the user's run does
            copy = not (m is model or isinstance(m, morphc.ExtendedModel))
            return F.mse_loss(m(x), y) + (10.0 if copy != bool(kept) else 0.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
        scheduler = _on_plateau(optimizer)
        bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[3]), bypass_steps=4,
                           return_steps=4, probation_steps=20, eval_closure=judge,
                           verbose=False) if bypass else None
        for x, y in batches:
            if bypass:
                loss = bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
                kept[:] = _events(bp, "contract")
            else:
                optimizer.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
            scheduler.step(float(loss))
            losses.append(float(loss))
        return model, optimizer, bp, losses

    model, optimizer, _, plain = train(bypass=False)
    expected, lr = _whole(model, optimizer), optimizer.param_groups[0]["lr"]
    model, optimizer, bp, losses = train(bypass=True)
    bp.finish()
    assert losses == plain
    assert len(_events(bp, "contract")) == 1
    assert [e["to"] for e in _events(bp, "probation")] == ["plain"]
    assert optimizer.param_groups[0]["lr"] == lr
    _assert_same(_whole(model, optimizer), expected)


def test_last_loss_is_the_runs_own_while_bp_step_returns_plain_trainings():
    """During a cycle bp.step returns the loss of plain training beside it (for schedulers);
    ``bp.last_loss`` is the extended model's, which logs and the bench's curves show."""
    model, batches = _full_batch(steps=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[3]), bypass_steps=4,
                       return_steps=4, verbose=False)
    seen = []
    for x, y in batches:
        closure = lambda m, x=x, y=y: F.mse_loss(m(x), y)   # noqa: E731
        returned = float(bp.step(closure))
        if bp.phase == "bypass" and bp.phase_step > 1:
            seen.append((returned, bp.last_loss))
    bp.finish()
    assert seen and all(isinstance(own, float) for _, own in seen)
    assert any(returned != own for returned, own in seen)
