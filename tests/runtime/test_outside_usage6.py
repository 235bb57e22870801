"""Probes from a seventh outside-in round on training usage: checkpoints the user takes of their
own model and optimizer mid-cycle, GANs with two Bypass runs, EMAs and seeds set between steps,
Bypass over a part of the model the optimizer trains whole. A run whose cycles never pay ends
where plain training ends, bit for bit."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


# -- modules the closure runs outside the model Bypass trains ------------------------------------
def _gan(with_bypass: bool, steps: int = STEPS):
    """A DCGAN-style pair: the discriminator has BatchNorm and dropout; both nets have their
    own Bypass (cycles at steps 4 and 20 for G, 5 and 20 for D); the generator's loss runs
    the discriminator, whose statistics its forward moves."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    d = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Dropout(0.2),
                      nn.Linear(16, 1))
    opt_g = torch.optim.Adam(g.parameters(), 1e-2, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), 1e-2, betas=(0.5, 0.9))
    bp_g = _bypass(g, opt_g) if with_bypass else None
    bp_d = _bypass(d, opt_d, trigger=morphc.Schedule(every=5)) if with_bypass else None
    for _ in range(steps):
        real = torch.randn(32, 2) * 0.5 + 1
        fake = g(torch.randn(32, 4)).detach()
        train_step(bp_d, d, opt_d, lambda m, real=real, fake=fake:
                   F.softplus(-m(real)).mean() + F.softplus(m(fake)).mean())
        z = torch.randn(32, 4)
        train_step(bp_g, g, opt_g, lambda m, z=z: F.softplus(-d(m(z))).mean())
    for bp in (bp_g, bp_d):
        if bp is not None:
            bp.finish()
    return training_state(g, opt_g), training_state(d, opt_d), torch.get_rng_state(), bp_g


def test_a_gan_whose_cycles_never_pay_is_plain_training_with_batchnorm_in_the_critic():
    # the generator's cycles called its loss — which runs the discriminator in training mode —
    # for plain training's copy, at s = 0 and at s = 1: the discriminator's BatchNorm
    # statistics moved three times per generator step instead of once
    g0, d0, rng0, _ = _gan(False)
    g1, d1, rng1, bp_g = _gan(True)
    assert [e["to"] for e in bp_g.history if e["event"] == "rollback"] == ["plain", "plain"]
    assert state_differences(g0, g1) == []
    assert state_differences(d0, d1) == []
    assert torch.equal(rng0, rng1)


def _backbone_run(with_bypass: bool, shadow: bool = True, steps: int = STEPS):
    """Bypass over the backbone while the optimizer trains the whole model: the head, with its
    BatchNorm, runs in the closure."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))
    head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
    whole = nn.Sequential(backbone, head)
    optimizer = _adam(whole)
    bp = _bypass(backbone, optimizer, shadow=shadow) if with_bypass else None
    _, batches = regression_task(0, steps)
    for x, y in batches:
        train_step(bp, backbone, optimizer, lambda m, x=x, y=y: F.mse_loss(head(m(x)), y))
    if bp is not None:
        bp.finish()
    return training_state(whole, optimizer), bp


def test_a_bypass_over_the_backbone_leaves_the_heads_statistics_as_plain_training_does():
    plain, _ = _backbone_run(False)
    mine, bp = _backbone_run(True)
    assert [e["to"] for e in bp.history if e["event"] == "rollback"] == ["plain", "plain"]
    assert state_differences(plain, mine) == []


def test_without_a_copy_beside_it_the_extended_step_moves_the_heads_statistics_once():
    # no plain training to stand for: the cycle's own s = 0 pass moves them, once per step
    # (the s = 1 pass and the verdicts leave them), as plain training's forward would
    assert _backbone_counts() == STEPS


def _backbone_counts():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))
    head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = _adam(nn.Sequential(backbone, head))
    bp = _bypass(backbone, optimizer, shadow=False)
    _, batches = regression_task(0, STEPS)
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: F.mse_loss(head(m(x)), y))
    bp.finish()
    return int(head[0].num_batches_tracked)


# -- what the user does around each step ---------------------------------------------------------
def _ema_run(with_bypass: bool, steps: int = STEPS):
    """SGD with momentum on a net with dropout; an EMA of the weights (swa_utils) updated after
    every step, and the global seed set by the user every 5 steps (an epoch's habit); the
    closure accumulates two micro-batches and returns their mean loss in float64."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    bp = _bypass(model, optimizer) if with_bypass else None
    _, batches = regression_task(0, steps)

    def loss_of(m, x, y):
        halves = [F.mse_loss(m(xs), ys).double() for xs, ys in
                  zip(x.chunk(2), y.chunk(2), strict=True)]
        return sum(halves) / 2

    for i, (x, y) in enumerate(batches):
        if i % 5 == 0:
            torch.manual_seed(100 + i)
        train_step(bp, model, optimizer, lambda m, x=x, y=y: loss_of(m, x, y))
        ema.update_parameters(model)
    if bp is not None:
        bp.finish()
    averaged = {k: v.clone() for k, v in ema.state_dict().items()}
    return training_state(model, optimizer), averaged, torch.get_rng_state(), bp


def test_an_ema_seeds_and_accumulated_float64_losses_follow_plain_training():
    plain, plain_ema, plain_rng, _ = _ema_run(False)
    mine, my_ema, my_rng, bp = _ema_run(True)
    assert [e["event"] for e in bp.history].count("extend") == 2
    assert state_differences(plain, mine) == []
    assert [k for k in plain_ema if not torch.equal(plain_ema[k], my_ema[k])] == []
    assert torch.equal(plain_rng, my_rng)


def _momentum_reset_run(with_bypass: bool):
    model, batches = regression_task(0, STEPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    bp = _bypass(model, optimizer) if with_bypass else None
    for i, (x, y) in enumerate(batches):
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
        if i in (4, 20):                     # mid-cycle both times
            optimizer.state.clear()
    if bp is not None:
        bp.finish()
    return training_state(model, optimizer)


def test_a_momentum_reset_between_steps_mid_cycle_is_done_to_plain_training():
    # the reset cleared the cycle's momentum, and the hand-over then brought plain training's
    # back, never reset: the run went on with momentum plain training would not have had
    assert state_differences(_momentum_reset_run(False), _momentum_reset_run(True)) == []


def _projected_run(with_bypass: bool):
    """Non-negative weights kept by an optimizer step hook over the optimizer's own groups."""
    model, batches = regression_task(0, STEPS)
    optimizer = _adam(model)

    def non_negative(opt, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                for param in group["params"]:
                    param.clamp_(min=0.0)

    optimizer.register_step_post_hook(non_negative)
    bp = _bypass(model, optimizer) if with_bypass else None
    for x, y in batches:
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    if bp is not None:
        bp.finish()
    return training_state(model, optimizer)


def test_an_optimizer_step_hook_shapes_plain_training_beside_a_cycle():
    # deepcopy drops an optimizer's step hooks: plain training's copy stepped without the
    # projection, and a cycle that did not pay handed over weights that were never projected
    plain, mine = _projected_run(False), _projected_run(True)
    assert state_differences(plain, mine) == []
    assert all(bool((v >= 0).all()) for v in mine[0].values())


@pytest.mark.parametrize("shadow", [False, True])
def test_a_model_checkpoint_mid_cycle_without_plain_training_beside_it_warns(shadow):
    # without a copy beside the cycle (shadow=False, DDP) the model's weights mid-cycle lack the
    # branches' share: a checkpoint of them (a rank-0 save every N steps) silently held a model
    # that neither plain training nor the cycle ever computed
    model, batches = regression_task(0, STEPS)
    bp = _bypass(model, _adam(model), shadow=shadow)
    for x, y in batches[:5]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bp.state_dict()                      # Bypass's own checkpoint holds the cycle
            if bp.phase == "train":
                model.state_dict()               # between cycles: the model is whole
    assert bp.phase != "train"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.state_dict()
        model.state_dict()
    said = [str(w.message) for w in caught if "mid-cycle" in str(w.message)]
    assert len(said) == (0 if shadow else 1)
    assert not said or "bp.state_dict()" in said[0]
    bp.finish()


def test_statistics_kept_during_a_closure_call_are_this_threads_modules_only():
    """A model another thread trains meanwhile (a data-loading or evaluation thread) keeps what
    its own forward did; a module the closure runs outside the model is put back."""
    import threading

    from morphc.runtime.outside_buffers import outside_buffers_kept

    root, head, other = nn.Linear(2, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    x = torch.randn(8, 2) + 3.0
    with outside_buffers_kept(root):
        head(root(x))
        worker = threading.Thread(target=lambda: other(x))
        worker.start()
        worker.join()
    assert torch.equal(head.running_mean, torch.zeros(2))
    assert not torch.equal(other.running_mean, torch.zeros(2))
