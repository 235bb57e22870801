"""Probes of Bypass with the optimizers, schedules and precision set-ups an outside user brings.

The promise under test: a run whose cycles never pay ends where plain training ends — weights,
buffers and optimizer state bit for bit — whatever the optimizer, the schedule, or the way a cycle
fails; and what cannot work says so at once, with a typed error that says what to do."""

import io

import pytest
import torch
import torch.nn.functional as F

import morphc
from tests.helpers import SparseBag, regression_task

O, S = torch.optim, torch.optim.lr_scheduler

OPTIMIZERS = {
    "sgd_nesterov_decay": lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                          weight_decay=1e-2),
    "sgd_dampening_fused": lambda p: O.SGD(p, lr=0.05, momentum=0.9, dampening=0.5, fused=True),
    "adam_amsgrad": lambda p: O.Adam(p, lr=1e-2, amsgrad=True),
    "adamw_fused": lambda p: O.AdamW(p, lr=1e-2, fused=True),
    "adam_for_loop": lambda p: O.Adam(p, lr=1e-2, foreach=False),
    "rmsprop_centered": lambda p: O.RMSprop(p, lr=1e-3, centered=True, momentum=0.9),
    "adagrad": lambda p: O.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: O.Adadelta(p),
    "adamax": lambda p: O.Adamax(p, lr=1e-2),
    "nadam": lambda p: O.NAdam(p, lr=1e-2, decoupled_weight_decay=True, weight_decay=1e-2),
    "radam": lambda p: O.RAdam(p, lr=1e-2),
    "asgd": lambda p: O.ASGD(p, lr=1e-2, t0=3),
    "rprop": lambda p: O.Rprop(p, lr=1e-2),
}


def _task(seed=0, steps=14):
    return regression_task(seed, steps)


def _bypass(model, optimizer, **kw):
    """Cycles every 3 steps, none of which can pay (the eval closure is a constant)."""
    options = dict(trigger=morphc.Schedule(every=3), bypass_steps=3, return_steps=3,
                   verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    options.update(kw)
    return morphc.Bypass(model, optimizer, **options)


def _whole(model, optimizer):
    """Every parameter, buffer and optimizer state entry, cloned, by name."""
    state = {n: {k: v.clone() if torch.is_tensor(v) else v
                 for k, v in optimizer.state[p].items()}
             for n, p in model.named_parameters() if p in optimizer.state}
    return {k: v.clone() for k, v in model.state_dict().items()}, state


def _assert_same(got, expected):
    (weights, state), (weights_x, state_x) = got, expected
    assert weights.keys() == weights_x.keys() and state.keys() == state_x.keys()
    for k in weights:
        assert torch.equal(weights[k], weights_x[k]), f"weight {k}"
    for n in state:
        assert state[n].keys() == state_x[n].keys(), n
        for k, v in state[n].items():
            assert torch.equal(v, state_x[n][k]) if torch.is_tensor(v) else v == state_x[n][k], \
                f"optimizer state {n}.{k}"


def _events(bp, kind):
    return [e for e in bp.history if e["event"] == kind]


def _plain(make, batches, model, before_step=None):
    """Plain training, as the user writes it without Bypass."""
    opt = make(model.parameters())
    for i, (x, y) in enumerate(batches):
        if before_step is not None:
            before_step(i, model, opt)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return _whole(model, opt)


# -- cycles that fail -----------------------------------------------------------------------------
def _fails_in_the_extension(kind, bp):
    """A closure whose extended model breaks on the second step of each cycle's free phase."""
    def make(x, y):
        def closure(m):
            loss = F.mse_loss(m(x), y)
            if isinstance(m, morphc.ExtendedModel) and bp.phase_step == 1:
                if kind == "error":
                    raise RuntimeError("a kernel the extended graph cannot run")
                return loss * float("inf")
            return loss
        return closure
    return make


@pytest.mark.parametrize("kind", ["non_finite", "error"])
@pytest.mark.parametrize("name", ["adam_amsgrad", "asgd", "rprop"])
def test_a_cycle_that_fails_hands_over_plain_training_bit_for_bit(name, kind):
    """A cycle whose extended model diverges (or raises) mid-cycle is rolled back — and the
    copy beside it has already taken plain training's step on that batch, so the user gets
    plain training's state, not the state from before the cycle with its steps lost."""
    model, batches = _task()
    expected = _plain(OPTIMIZERS[name], batches, model)
    model, batches = _task()
    bp = _bypass(model, OPTIMIZERS[name])
    closure = _fails_in_the_extension(kind, bp)
    losses = []
    with pytest.warns(RuntimeWarning) if kind == "error" else _no_warning():
        for x, y in batches:
            losses.append(bp.step(closure(x, y)))
    bp.finish()
    rollbacks = _events(bp, "rollback")
    assert rollbacks and all(e["to"] == "plain" for e in rollbacks)
    assert all(torch.isfinite(loss) for loss in losses)
    _assert_same(_whole(model, bp.optimizer), expected)


def _no_warning():
    import contextlib
    return contextlib.nullcontext()


# -- the user changes what trains mid-cycle ------------------------------------------------------
def _unfreeze_at(step, add_group):
    """Gradual unfreezing, as fine-tuning code does it: the last layer starts frozen and joins
    at ``step`` — already in the optimizer, or as a param group added then."""
    def before_step(i, model, opt):
        if i == step:
            model[2].requires_grad_(True)
            if add_group:
                opt.add_param_group({"params": list(model[2].parameters()), "lr": 3e-3})
    return before_step


@pytest.mark.parametrize("add_group", [False, True], ids=["requires_grad", "add_param_group"])
def test_unfreezing_mid_cycle_is_followed_by_plain_training_beside_it(add_group):
    """The copy beside a cycle is plain training only if it trains what the user's model trains:
    a layer unfrozen mid-cycle (and its param group, when one is added) must train there too, so
    a cycle that does not pay still hands over plain training's state, bit for bit."""
    before_step = _unfreeze_at(5, add_group)

    def fresh():
        model, batches = _task()
        model[2].requires_grad_(False)
        opt = O.Adam(model[0].parameters() if add_group else model.parameters(), lr=1e-2)
        return model, batches, opt

    model, batches, opt = fresh()
    expected = _plain(lambda p: opt, batches, model, before_step)
    model, batches, opt = fresh()
    bp = _bypass(model, opt)
    for i, (x, y) in enumerate(batches):
        before_step(i, model, opt)
        assert i != 5 or bp.phase == "bypass", "the layer is unfrozen mid-cycle"
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    bp.finish()
    rollbacks = _events(bp, "rollback")
    assert rollbacks and all(e["to"] == "plain" for e in rollbacks)
    _assert_same(_whole(model, bp.optimizer), expected)


# -- optimizers Bypass cannot drive: refused at once ----------------------------------------------
@pytest.mark.parametrize("given", ["factory", "optimizer"])
def test_sparse_adam_is_refused_at_construction(given):
    """SparseAdam steps only sparse gradients, and a cycle's extension parameters are dense: every
    cycle would fail at its first step (with advice about the closure that does not apply). A
    typed error at construction says which optimizers take both kinds."""
    torch.manual_seed(0)
    model = SparseBag()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = (lambda p: O.SparseAdam(list(model.embed.parameters()))) if given == "factory" \
        else O.SparseAdam(list(model.parameters()))
    with pytest.raises(morphc.BypassError, match="SparseAdam.*dense.*(SGD|Adagrad)"):
        morphc.Bypass(model, optimizer, verbose=False)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_lbfgs_is_refused_at_construction():
    model, _ = _task()
    with pytest.raises(morphc.BypassError, match="LBFGS.*closure"):
        morphc.Bypass(model, lambda p: O.LBFGS(p), verbose=False)


# -- the extension's learning rate ----------------------------------------------------------------
def test_the_extension_trains_when_group_0_is_held_at_lr_0():
    """Fine-tuning code often holds a backbone still with ``lr=0`` in group 0 and trains a head in
    group 1. The extension follows the peak lr of the first group that trains, not 0 (at lr 0 its
    branches never leave B = 0 and every cycle is wasted)."""
    model, batches = _task()
    opt = O.Adam([{"params": model[0].parameters(), "lr": 0.0},
                  {"params": model[2].parameters(), "lr": 1e-2}])
    bp = _bypass(model, opt, accept="always", trigger=morphc.Schedule(at=[2]))
    for x, y in batches[:4]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    assert bp.phase == "bypass" and bp.phase_step == 2
    assert bp.extension_group.group["lr"] == pytest.approx(1e-2)
    assert any(bool(b.B.abs().max() > 0) for b in bp.extended.branches.values())
    bp.finish()


# -- the guarantee, optimizer by optimizer, schedule by schedule ---------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_run_whose_cycles_never_pay_is_plain_training_with_every_optimizer(name):
    """Per-step sizes (Rprop), averaged iterates (ASGD), max second moments (AMSGrad), fused and
    for-loop kernels: the state handed over is plain training's, entry for entry."""
    model, batches = _task()
    expected = _plain(OPTIMIZERS[name], batches, model)
    model, batches = _task()
    bp = _bypass(model, OPTIMIZERS[name])
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    bp.finish()
    assert _events(bp, "rollback") and all(e["to"] == "plain" for e in _events(bp, "rollback"))
    _assert_same(_whole(model, bp.optimizer), expected)


SCHEDULES = {
    "cyclic_momentum": (lambda p: O.SGD(p, lr=0.01, momentum=0.9),
                        lambda o: S.CyclicLR(o, 0.001, 0.05, step_size_up=4)),
    "cyclic_betas": (lambda p: O.Adam(p, lr=0.01),
                     lambda o: S.CyclicLR(o, 0.001, 0.01, step_size_up=4)),
    "warm_up_then_decay": (lambda p: O.AdamW(p, lr=0.01), lambda o: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, total_iters=4), S.ExponentialLR(o, 0.95)], milestones=[4])),
    "two_groups_lambda": (
        lambda p: (lambda ps: O.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-3}],
                                     lr=1e-2))(list(p)),
        lambda o: S.LambdaLR(o, [lambda i: 1 / (1 + i), lambda i: 0.9 ** i])),
}


@pytest.mark.parametrize("reload", [False, True], ids=["stepped", "state_dicts_reloaded"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_stepped_by_the_user_reach_the_copy_beside_each_cycle(name, reload):
    """A scheduler the user steps between ``bp.step`` calls (cycling momentum or betas too, one
    lambda per group, its and the optimizer's state_dict round-tripped mid-cycle) sees only the
    user's groups, and plain training beside the cycle takes its hyperparameters: bit for bit."""
    make, schedule = SCHEDULES[name]
    model, batches = _task()
    opt = make(model.parameters())
    scheduler = schedule(opt)

    def plain_step(i, model, opt):
        if i:
            scheduler.step()
    expected = _plain(lambda p: opt, batches, model, plain_step)
    model, batches = _task()
    opt = make(model.parameters())
    scheduler = schedule(opt)
    bp = _bypass(model, opt, min_lr_fraction=0.0)
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        scheduler.step()
        if reload:
            buffer = io.BytesIO()
            torch.save((scheduler.state_dict(), opt.state_dict()), buffer)
            buffer.seek(0)
            scheduler_state, opt_state = torch.load(buffer, weights_only=False)
            scheduler.load_state_dict(scheduler_state)
            opt.load_state_dict(opt_state)
    bp.finish()
    assert _events(bp, "rollback") and all(e["to"] == "plain" for e in _events(bp, "rollback"))
    _assert_same(_whole(model, bp.optimizer), expected)


@pytest.mark.parametrize("name", ["adam_amsgrad", "asgd", "rprop", "adagrad"])
def test_resuming_mid_cycle_with_a_fresh_optimizer_is_still_plain_training(name):
    """``bp.state_dict()`` taken mid-cycle and loaded into a fresh Bypass over a fresh model and
    optimizer carries the copy beside the cycle along: the hand-over is still plain training's."""
    model, batches = _task()
    expected = _plain(OPTIMIZERS[name], batches, model)
    model, batches = _task()
    bp = _bypass(model, OPTIMIZERS[name])
    for i, (x, y) in enumerate(batches):
        if i == 5:
            assert bp.phase == "bypass"
            buffer = io.BytesIO()
            torch.save(bp.state_dict(), buffer)
            buffer.seek(0)
            model, _ = _task(seed=1)
            bp = _bypass(model, OPTIMIZERS[name])
            bp.load_state_dict(torch.load(buffer, weights_only=True))
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    bp.finish()
    assert all(e["to"] == "plain" for e in _events(bp, "rollback"))
    _assert_same(_whole(model, bp.optimizer), expected)


# -- mixed precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("keyword", ["scaler", "grad_scaler"])
def test_a_grad_scaler_is_refused_with_what_to_do_instead(keyword):
    """bp.step runs the backward and the optimizer step itself, so a GradScaler has nowhere to
    scale or unscale: the error says so and names what works (bfloat16 autocast, no scaler)."""
    model, _ = _task()
    with pytest.raises(morphc.BypassError, match="GradScaler.*bfloat16"):
        morphc.Bypass(model, lambda p: O.Adam(p), **{keyword: torch.amp.GradScaler("cpu")})


def test_bfloat16_autocast_in_the_closure_runs_whole_cycles():
    model, batches = _task()
    bp = _bypass(model, lambda p: O.Adam(p, lr=1e-2), accept="always", eval_closure=None)

    def closure(x, y):
        def loss(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.mse_loss(m(x).float(), y)
        return loss
    for x, y in batches:
        bp.step(closure(x, y))
    assert bp.finish() is model
    assert _events(bp, "contract") and not _events(bp, "rollback")
