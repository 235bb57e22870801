"""Bypass in a user's own loop: the full cycle, optimizers, failures, checkpoints, compile."""

import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc import zoo
from tests.helpers import SparseBag

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def mlp_data(seed=0):
    """A small tanh/ReLU regression: (model, x, y)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(seed)
    return model, torch.randn(64, 4, generator=gen), torch.randn(64, 2, generator=gen)


def mlp_task(seed=0):
    model, x, y = mlp_data(seed)
    return model, lambda m: F.mse_loss(m(x), y), (x,)


def cnn_task(seed=0):
    torch.manual_seed(seed)
    model, (x,) = zoo.cnn_bn(channels=4, batch=8, size=8)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    return model, lambda m: F.cross_entropy(m(x), y), (x,)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cycle_bypass(model, opt, **kw):
    """The cycle's mechanics with the earlier settings made explicit (free phase at s = 1 only,
    annealed return, every cycle kept); tests of the defaults build Bypass themselves."""
    options = dict(trigger=morphc.Schedule(every=4), bypass_steps=4, return_steps=4,
                   sites="all", width=4, verbose=False, free_phase="plain",
                   return_mode="anneal", accept="always")
    options.update(kw)
    return morphc.Bypass(model, opt, **options)


def run(bp, closure, steps):
    return [float(bp.step(closure)) for _ in range(steps)]


def events(bp, kind):
    return [e for e in bp.history if e["event"] == kind]


# -- the full cycle ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", [mlp_task, cnn_task], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_full_cycles_with_each_optimizer(task, opt_name):
    model, closure, _ = task()
    keys = list(model.state_dict())
    ids = {n: id(p) for n, p in model.named_parameters()}
    bp = cycle_bypass(model, OPTIMIZERS[opt_name])
    phases = []
    for _ in range(30):
        bp.step(closure)
        phases.append(bp.phase)
    assert {"train", "bypass", "return"} <= set(phases)
    assert bp.cycle >= 2 and not events(bp, "rollback")
    for event in events(bp, "contract"):
        assert event["residual"] == 0.0 and event["deviation"] <= 1e-5
        assert event["snap_change"] is None
    result = bp.finish()
    assert result is model and type(result) is type(model)
    assert list(model.state_dict()) == keys
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert len(bp.optimizer.param_groups) == 1
    assert set(bp.optimizer.state) <= set(model.parameters())
    assert math.isfinite(closure(model).item())


def test_extension_parameters_join_and_leave_the_optimizer():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], bypass_steps=3, return_steps=3,
                      trigger=morphc.Schedule(at=[4]))
    seen = []
    bp.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([list(g["params"]) for g in opt.param_groups]))
    run(bp, closure, 4)
    assert bp.phase == "bypass" and bp.model is bp.extended
    ext_params = list(bp.extended.extension_parameters())
    run(bp, closure, 1)
    groups = seen[-1]
    assert len(groups) == 2 and groups[1] == ext_params, "one step, one optimizer, own group"
    assert len(bp.optimizer.param_groups) == 1, "between steps the optimizer is the user's"
    assert bp.optimizer.state_dict()["param_groups"][0]["params"] == list(range(6))
    assert all(p in bp.extension_group.state for p in ext_params), "the extension trains"
    ext_group = bp.extension_group.group
    # the default extension_lr_scale (1.0: the user's own lr) times group 0's peak lr
    assert ext_group["lr"] == pytest.approx(bp.config.extension_lr_scale
                                            * bp.optimizer.param_groups[0]["lr"])
    assert ext_group["betas"] == bp.optimizer.param_groups[0]["betas"]
    run(bp, closure, 6)
    assert bp.phase == "train" and bp.model is model
    assert len(seen[-1]) == 1 and len(bp.optimizer.param_groups) == 1
    assert not any(p in bp.optimizer.state for p in ext_params)


def test_a_diverged_cycle_halves_the_next_cycles_extension_lr():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["sgd_momentum"], bypass_steps=3, return_steps=3,
                      trigger=morphc.Schedule(at=[2, 5, 14]))
    blown = []

    def exploding(m):                  # the first cycle's free phase diverges, once
        loss = closure(m)
        if bp.cycle == 0 and bp.phase == "bypass" and bp.phase_step == 1 and not blown:
            blown.append(bp.step_count)
            return loss * float("inf")
        return loss

    peak = bp.optimizer.param_groups[0]["lr"]
    lrs = []
    for _ in range(20):
        bp.step(exploding)
        if bp.phase == "bypass" and bp.phase_step > 0:
            lrs.append(bp.extension_group.group["lr"])
    rollbacks = [e for e in bp.history if e["event"] == "rollback"]
    assert blown and "halved" in rollbacks[0]["reason"]
    assert lrs[0] == pytest.approx(peak), "first cycle: the user's own lr"
    assert lrs[-1] == pytest.approx(0.5 * peak), "after the divergence: half of it"
    state = bp.state_dict()
    assert state["lr_scale"] == 0.5, "a checkpoint keeps the halved scale"


def test_original_parameters_keep_their_optimizer_state():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[5]))
    run(bp, closure, 4)
    before = {p: {k: v.clone() for k, v in bp.optimizer.state[p].items()}
              for p in model.parameters()}
    tensors = {p: dict(bp.optimizer.state[p]) for p in model.parameters()}
    run(bp, closure, 1)                  # step 5: the trigger fires and extends
    assert bp.phase == "bypass"
    for p in model.parameters():
        state = bp.optimizer.state[p]
        assert all(state[k] is tensors[p][k] for k in tensors[p]), "no state was replaced"
        assert float(state["step"]) == 5.0, "no reset: the step count continues"
        assert not torch.equal(state["exp_avg"], before[p]["exp_avg"])   # step 5 updated it
    run(bp, closure, 8)                  # bypass and return: 4 + 4 steps, then contract
    assert bp.phase == "train" and bp.cycle == 1
    for p in model.parameters():
        state = bp.optimizer.state[p]
        assert all(state[k] is tensors[p][k] for k in tensors[p])
        assert float(state["step"]) == 13.0


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (1 + i)),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=40),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5),
    lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[5]),
], ids=["step", "cosine", "lambda", "onecycle", "warm_restarts", "sequential"])
def test_existing_optimizer_and_lr_scheduler(make_scheduler):
    model, closure, _ = mlp_task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = make_scheduler(opt)
    bp = cycle_bypass(model, opt, min_lr_fraction=0.0)
    assert bp.optimizer is opt
    peak = opt.param_groups[0]["lr"]
    for _ in range(30):
        peak = max(peak, opt.param_groups[0]["lr"])
        bp.step(closure)
        scheduler.step()
        if bp.phase != "train" and bp.phase_step > 0:
            assert len(opt.param_groups) == 1
            assert bp.extension_group.group["lr"] == \
                pytest.approx(bp.config.extension_lr_scale * peak), \
                "the extension trains at the peak lr of group 0, so it moves in a decayed tail"
    assert bp.cycle >= 2 and bp.finish() is model


def test_reduce_lr_on_plateau_and_fixed_extension_lr():
    model, closure, _ = mlp_task()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1)
    bp = cycle_bypass(model, opt, extension_options={"lr": 0.5})
    for _ in range(20):
        scheduler.step(float(bp.step(closure)))
        if bp.phase != "train":
            assert bp.extension_group.group["lr"] == 0.5
    assert bp.cycle >= 1


# -- return modes, finish --------------------------------------------------------------------
def test_anneal_return_reaches_homotopy_zero_exactly():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], bypass_steps=2, return_steps=5,
                      trigger=morphc.Schedule(at=[3]))
    run(bp, closure, 5)
    homotopies = []
    for _ in range(5):
        assert bp.phase == "return"
        ext = bp.extended
        bp.step(closure)
        homotopies.append(ext.homotopy)
    assert homotopies == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0]) and homotopies[-1] == 0.0
    assert bp.phase == "train"
    contract = events(bp, "contract")[0]
    assert contract["residual"] == 0.0 and contract["snap_change"] is None


def test_penalty_return_snaps_and_reports_the_change():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], return_mode="penalty", bypass_steps=4,
                      return_steps=30, penalty=10.0, trigger=morphc.Schedule(at=[3]))
    run(bp, closure, 7)
    ext = bp.extended
    start = ext.constraint_residual()
    run(bp, closure, 29)
    assert bp.phase == "return" and ext.homotopy == 1.0, "penalty mode never anneals"
    assert ext.constraint_residual() < start, "the penalty pulls α towards C"
    run(bp, closure, 1)
    contract = events(bp, "contract")[0]
    assert contract["residual"] > 0.0
    assert 0.0 < contract["snap_change"] < 1.0
    assert ext.contraction_report.snap_change == contract["snap_change"]


def test_max_snap_change_rolls_back():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], return_mode="penalty", return_steps=2,
                      max_snap_change=1e-12, trigger=morphc.Schedule(at=[3]), max_cycles=1)
    run(bp, closure, 3)
    before = snapshot(model)
    run(bp, closure, 6)
    rollback = events(bp, "rollback")[0]
    assert "max_snap_change" in rollback["reason"]
    assert bp.phase == "train" and bp.cycle == 0 and bp.failures == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finish_never_trains_and_keeps_a_cycle_only_if_it_pays():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], bypass_steps=50, accept="if_better",
                      trigger=morphc.Schedule(at=[3]))
    run(bp, closure, 8)
    assert bp.phase == "bypass"
    ext, step = bp.extended, bp.step_count
    with torch.no_grad():
        extended = ext(*bp.example_inputs)
    assert bp.finish() is model
    assert bp.phase == "train" and bp.step_count == step, "finish() took no optimizer step"
    assert ext.contracted and ext.homotopy == 0.0
    kept = events(bp, "contract")
    if kept:                                   # the snap paid: it is measured and reported
        event = kept[0]
        assert event["finishing"] and event["loss_after"] < event["loss_before"]
        with torch.no_grad():
            folded = model(*bp.example_inputs)
        deviation = morphc.compiler.deviation.relative_deviation(extended, folded)
        assert event["snap_change"] == pytest.approx(deviation, rel=1e-3)
    else:
        assert "did not pay" in events(bp, "rollback")[0]["reason"]


def test_finish_rolls_back_a_cycle_that_does_not_pay():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], bypass_steps=50, accept="if_better",
                      trigger=morphc.Schedule(at=[3]), init_scale=30.0)
    run(bp, closure, 3)
    before = snapshot(model)
    with torch.no_grad():                      # a branch that made things much worse
        for branch in bp.extended.branches.values():
            branch.B.fill_(5.0)
    bp.finish()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "did not pay" in events(bp, "rollback")[0]["reason"]


@pytest.mark.parametrize("shadow", [False, True], ids=["to_before", "to_plain"])
def test_finish_after_resume_without_a_closure_rolls_back(shadow):
    """No data to judge the cycle: it is not kept. The user gets the model from before it, or —
    when plain training ran beside the cycle (checkpointed with it) — plain training's state."""
    model, closure, _ = mlp_task()
    kw = dict(bypass_steps=50, accept="if_better", shadow=shadow)
    bp = cycle_bypass(model, OPTIMIZERS["adam"], **kw)
    run(bp, closure, 6)
    state = bp.state_dict()
    fresh, _, _ = mlp_task()
    resumed = cycle_bypass(fresh, OPTIMIZERS["adam"], **kw)
    resumed.load_state_dict(state)
    assert resumed.finish() is fresh and resumed.phase == "train"
    restored = state["extension"]["shadow"]["model"] if shadow else \
        state["extension"]["snapshot"]["params"]
    for name, param in fresh.named_parameters():
        assert torch.equal(param, restored[name]), "no data to judge the cycle: not kept"
    rollback, = events(resumed, "rollback")
    assert rollback["to"] == ("plain" if shadow else "before")


# -- nothing lost -----------------------------------------------------------------------------
def nan_at(closure, steps, counter):
    def wrapped(m):
        counter[0] += 1
        loss = closure(m)
        return loss * float("nan") if counter[0] in steps else loss
    return wrapped


def test_nan_during_bypass_rolls_back_and_carries_on():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[4]), max_cycles=1)
    calls = [0]
    bad = nan_at(closure, {7}, calls)
    run(bp, bad, 4)
    weights = snapshot(model)
    opt_state = {p: {k: v.clone() for k, v in bp.optimizer.state[p].items()}
                 for p in model.parameters()}
    run(bp, bad, 2)
    assert bp.phase == "bypass"
    loss = bp.step(bad)                   # NaN at bypass step 3 → rollback, then a normal step
    assert math.isfinite(float(loss)) and bp.phase == "train"
    rollback = events(bp, "rollback")[0]
    assert "non-finite" in rollback["reason"] and bp.failures == 1
    assert len(bp.optimizer.param_groups) == 1
    # restored to the pre-extension state, then exactly one Adam step from there
    reference, _, _ = mlp_task()
    reference.load_state_dict(weights)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    ref_opt.load_state_dict(bp.optimizer.state_dict())
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        ref_opt.state[p] = {k: v.clone() for k, v in opt_state[q].items()}
    ref_opt.zero_grad()
    closure(reference).backward()
    ref_opt.step()
    for k, v in reference.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    run(bp, bad, 5)
    assert bp.phase == "train" and math.isfinite(closure(model).item())


def test_nan_with_on_failure_raise():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["sgd_momentum"], trigger=morphc.Schedule(at=[4]),
                      on_failure="raise")
    bad = nan_at(closure, {6}, [0])
    run(bp, bad, 4)
    weights = snapshot(model)
    run(bp, bad, 1)
    with pytest.raises(morphc.BypassError, match="restored"):
        bp.step(bad)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert bp.phase == "train" and len(bp.optimizer.param_groups) == 1
    run(bp, closure, 2)                   # training can continue


def test_error_in_extended_forward_rolls_back():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[4]), max_cycles=1)
    run(bp, closure, 4)

    def broken(m):
        if isinstance(m, morphc.ExtendedModel):
            raise RuntimeError("shape mismatch in user code")
        return closure(m)

    bp.step(broken)
    assert "RuntimeError: shape mismatch" in events(bp, "rollback")[0]["reason"]
    with pytest.raises(RuntimeError, match="train phase"):
        bp.step(lambda m: (_ for _ in ()).throw(RuntimeError("train phase")))


def test_extension_failure_is_recorded_or_raised():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], sites="no_such_layer")
    run(bp, closure, 10)
    failure = events(bp, "failure")[0]
    assert "no site matches 'no_such_layer'" in failure["reason"]
    assert bp.phase == "train" and len(bp.optimizer.param_groups) == 1
    bp = cycle_bypass(model, OPTIMIZERS["adam"], sites="no_such_layer", on_failure="raise")
    with pytest.raises(morphc.BypassError, match="sites="):
        run(bp, closure, 10)


# -- checkpoints ------------------------------------------------------------------------------
def plateau():
    return morphc.Plateau(window=3, threshold=1.0)


def checkpointed_run(split, total, trigger, **kw):
    """Losses of a run interrupted at ``split`` (saved, reloaded with weights_only=True)."""
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=trigger(), **kw)
    losses = run(bp, closure, split)
    buffer = io.BytesIO()
    torch.save(bp.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh, closure2, _ = mlp_task(seed=1)        # other initial weights: all must come back
    bp2 = cycle_bypass(fresh, OPTIMIZERS["adam"], trigger=trigger(), **kw)
    bp2.load_state_dict(state)
    assert bp2.phase == bp.phase and bp2.step_count == bp.step_count
    losses += run(bp2, closure, total - split)
    return losses, bp2


@pytest.mark.parametrize("split", [9, 14, 19], ids=["mid_bypass", "mid_return", "train"])
@pytest.mark.parametrize("mode", ["anneal", "penalty"])
def test_checkpoint_resume_is_deterministic(split, mode):
    kw = dict(bypass_steps=5, return_steps=5, return_mode=mode)
    model, closure, _ = mlp_task()
    straight = cycle_bypass(model, OPTIMIZERS["adam"], trigger=plateau(), **kw)
    # 50 steps: this trigger's threshold (1.0) calls every kept cycle "still on the plateau",
    # so Bypass backs off for two cycle lengths after the first one
    expected = run(straight, closure, 50)
    got, resumed = checkpointed_run(split, 50, trigger=plateau, **kw)
    assert got == expected
    assert resumed.history == straight.history
    assert straight.cycle >= 2


def test_checkpoint_of_auto_sites_and_rollback_snapshot():
    kw = dict(sites="auto", top_k=1, bypass_steps=6)
    model, closure, _ = mlp_task()
    straight = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[3]), **kw)
    run(straight, closure, 5)
    state = straight.state_dict()
    assert state["extension"]["sites"] == events(straight, "extend")[0]["sites"]
    assert len(state["extension"]["sites"]) == 1
    straight.step(nan_at(closure, {1}, [0]))
    fresh, _, _ = mlp_task(seed=1)
    resumed = cycle_bypass(fresh, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[3]), **kw)
    resumed.load_state_dict(state)
    resumed.step(nan_at(closure, {1}, [0]))
    assert events(resumed, "rollback") and events(straight, "rollback")
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), "the snapshot survived the checkpoint"


# -- sites, inputs, visibility ----------------------------------------------------------------
def test_auto_sites_use_the_closure_as_probe():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], sites="auto", top_k=2,
                      trigger=morphc.Schedule(at=[2]))
    run(bp, closure, 2)
    extend_event = events(bp, "extend")[0]
    scores = extend_event["scores"]
    assert set(scores) == {"0", "2", "4"}
    best = sorted(scores, key=lambda n: -scores[n])[:2]
    assert sorted(extend_event["sites"]) == sorted(best)
    assert bp.extended.config.selection == "auto"


def test_example_inputs_are_captured_from_the_first_step():
    model, closure, (x,) = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"])
    run(bp, closure, 1)
    assert len(bp.example_inputs) == 1 and torch.equal(bp.example_inputs[0], x)
    given = cycle_bypass(model, OPTIMIZERS["adam"], example_inputs=x[:3])
    assert given.example_inputs[0].shape == (3, 4)
    run(given, closure, 5)
    assert given.phase == "bypass" and torch.equal(given.example_inputs[0], x[:3])


def test_unusable_closures_say_what_to_do():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x)

    model, x = Keyword(), torch.randn(8, 4)
    bp = cycle_bypass(model, OPTIMIZERS["adam"])
    run(bp, lambda m: m(x=x).pow(2).mean(), 12)       # keyword inputs are traced as such
    assert bp.example_kwargs.keys() == {"x"} and events(bp, "contract")
    bp = cycle_bypass(model, OPTIMIZERS["adam"])
    with pytest.raises(morphc.BypassError, match="never called the model"):
        bp.step(lambda m: torch.zeros((), requires_grad=True))
    bp = cycle_bypass(model, OPTIMIZERS["adam"])
    with pytest.raises(morphc.BypassError, match="scalar"):
        bp.step(lambda m: m(x))


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")
def test_already_wrapped_models_are_unwrapped():
    model, closure, _ = mlp_task()
    bp = morphc.Bypass(torch.compile(model), OPTIMIZERS["adam"], verbose=False)
    assert bp.wrapping.compile and bp.finish() is model


def test_bad_arguments_raise_typed_errors():
    model, _, _ = mlp_task()
    with pytest.raises(morphc.BypassError, match="return_mode"):
        morphc.Bypass(model, OPTIMIZERS["adam"], return_mode="jump")
    with pytest.raises(morphc.BypassError, match="does not hold"):
        morphc.Bypass(model, torch.optim.Adam(model[0].parameters()))
    with pytest.raises(morphc.BypassError, match="factory"):
        morphc.Bypass(model, 0.1)
    with pytest.raises(morphc.BypassError, match="process group"):
        morphc.Bypass(model, OPTIMIZERS["adam"], distributed=True)
    with pytest.raises(morphc.BypassError, match="LBFGS.step needs a closure"):
        morphc.Bypass(model, lambda params: torch.optim.LBFGS(params))


def test_an_optimizer_over_the_trainable_parameters_only_is_accepted():
    """Fine-tuning code builds the optimizer over what requires grad; the frozen weight is
    neither asked for nor extended, and stays bit for bit."""
    model, closure, _ = mlp_task()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    bp = cycle_bypass(model, torch.optim.Adam(trainable, lr=1e-2), accept="always")
    run(bp, closure, 12)
    assert any(e["event"] == "contract" for e in bp.history)
    assert torch.equal(bp.finish()[0].weight, frozen)


def test_history_and_log_lines_name_each_phase(caplog):
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], verbose=True)
    with caplog.at_level(logging.INFO, logger="morphc.bypass"):
        run(bp, closure, 13)
    kinds = [e["event"] for e in bp.history]
    assert kinds[:3] == ["extend", "return", "contract"]
    text = caplog.text
    assert "extend" in text and "return" in text and "contract" in text
    extend_event = bp.history[0]
    assert extend_event["sites"] == ["0", "2", "4"] and extend_event["step"] == 4
    assert extend_event["residual"] > 0 and math.isfinite(extend_event["loss"])
    quiet = cycle_bypass(model, OPTIMIZERS["adam"], verbose=False)
    run(quiet, closure, 13)
    assert [e["event"] for e in quiet.history][:3] == kinds[:3]


def test_verbose_prints_when_logging_is_not_configured(capsys):
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], verbose=True)
    run(bp, closure, 9)
    assert "[morphc.bypass] step 4: extend" in capsys.readouterr().err
    bp = cycle_bypass(model, OPTIMIZERS["adam"], verbose=False)
    run(bp, closure, 9)
    assert capsys.readouterr().err == ""


def test_gradient_norm_trigger_sees_the_gradient():
    model, closure, _ = mlp_task()
    seen = []

    class Spy(morphc.Trigger):
        needs_grad_norm = True

        def update(self, loss, *, step, grad_norm=None):
            seen.append(grad_norm)
            return False

    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=Spy())
    run(bp, closure, 3)
    assert len(seen) == 3 and all(g > 0 for g in seen)
    bp = cycle_bypass(model, OPTIMIZERS["adam"],
                      trigger=morphc.GradientNorm(threshold=1e9, patience=2))
    run(bp, closure, 3)
    assert bp.phase == "bypass"


def test_a_trigger_that_ignores_the_norm_gets_none_and_nan_is_still_caught():
    """Plateau and Schedule say needs_grad_norm=False: no norm is computed, yet a NaN gradient
    is still stopped before it reaches the weights."""
    model, closure, _ = mlp_task()
    seen = []

    class Quiet(morphc.Trigger):
        needs_grad_norm = False

        def update(self, loss, *, step, grad_norm=None):
            seen.append(grad_norm)
            return False

    assert not morphc.Plateau.needs_grad_norm and not morphc.Schedule.needs_grad_norm
    bp = cycle_bypass(model, OPTIMIZERS["sgd_momentum"], trigger=Quiet())
    run(bp, closure, 2)
    assert seen == [None, None]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_gradient(m):       # a finite loss whose gradient is NaN: 0 · sqrt'(0) · 0
        total = sum(p.sum() for p in m.parameters())
        return closure(m) + 0.0 * torch.sqrt(total - total)

    bp.step(nan_gradient)
    assert bp.history[-1]["event"] == "skip" and "gradient" in bp.history[-1]["reason"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sparse_embedding_gradients_train_and_cycle():
    """nn.Embedding(sparse=True) gives sparse gradients, which no norm kernel takes: the
    finiteness check reads their values, and a whole cycle runs."""
    gen = torch.Generator().manual_seed(0)

    model = SparseBag()
    index, target = torch.randint(0, 20, (32,), generator=gen), torch.randn(32, generator=gen)
    bp = morphc.Bypass(model, lambda p: torch.optim.SGD(p, lr=0.1), trigger=morphc.Schedule(
        every=3), bypass_steps=2, return_steps=2, accept="always", verbose=False)
    for _ in range(12):
        bp.step(lambda m: F.mse_loss(m(index), target))
    assert bp.finish() is model
    assert [e["event"] for e in bp.history if e["event"] != "return"][:2] == ["extend", "contract"]


# -- torch.compile ----------------------------------------------------------------------------
class CountingBackend:
    """A dynamo backend that counts graph captures, then runs them with ``inner``."""

    def __init__(self, inner=None):
        self.count, self.inner = 0, inner

    def __call__(self, gm, example_inputs):
        self.count += 1
        if self.inner is None:
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)


def compiled_vs_eager(backend, cycles, steps):
    torch._dynamo.reset()
    losses = {}
    for compile in (False, True):
        model, closure, _ = mlp_task()
        bp = cycle_bypass(model, OPTIMIZERS["adam"], compile=compile, compile_backend=backend,
                          max_cycles=cycles)
        losses[compile] = run(bp, closure, steps)
        assert bp.cycle == cycles and bp.finish() is model
    return losses


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")
def test_compile_once_per_extension_and_never_in_the_return_phase():
    backend = CountingBackend()
    losses = compiled_vs_eager(backend, cycles=2, steps=30)
    assert backend.count == 1 + 2, "the user's model once, each extension once"
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")
def test_inductor_compiled_bypass_matches_eager():
    backend = CountingBackend("inductor")
    losses = compiled_vs_eager(backend, cycles=1, steps=14)
    assert backend.count == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def test_anneal_that_misses_c_is_rolled_back_not_folded():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(at=[3]))
    run(bp, closure, 3)
    before = snapshot(model)
    bp.extended.constraint_residual = lambda: 0.5     # as if the family's projection were off
    run(bp, closure, 8)
    assert "off the constraint set" in events(bp, "rollback")[0]["reason"]
    assert not events(bp, "contract") and bp.phase == "train"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrap_callable_grad_clipping_and_random_probe():
    model, closure, _ = mlp_task()
    seen = []

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def wrap(module):
        seen.append(type(module).__name__)
        return Wrapper(module)

    bp = cycle_bypass(model, OPTIMIZERS["sgd_momentum"], wrap=wrap, max_grad_norm=1e-3,
                      sites="auto", probe=None, top_k=1)
    before = snapshot(model)
    run(bp, closure, 1)
    moved = max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items())
    assert moved <= 1e-2 * 1e-3 + 1e-9, "the step was clipped to norm 1e-3"
    run(bp, closure, 12)
    assert seen[:3] == ["Sequential", "ExtendedModel", "Sequential"]
    assert isinstance(bp.model, Wrapper) and bp.cycle == 1
    assert len(events(bp, "extend")[0]["sites"]) == 1


def test_failed_extension_retries_with_a_new_seed():
    model, closure, _ = mlp_task()
    bp = cycle_bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(every=3),
                      max_cycles=3)
    calls = [0]
    bad = nan_at(closure, {5}, calls)    # the first cycle's bypass step 1 goes NaN
    run(bp, bad, 4)
    first = [p.clone() for p in bp.extended.extension_parameters()]
    run(bp, bad, 3)
    assert bp.failures == 1 and bp.phase == "bypass"
    second = list(bp.extended.extension_parameters())
    assert not torch.equal(first[0], second[0]), "a rollback does not replay the same draw"


def test_mistakes_in_model_or_closure_are_typed_errors_and_change_nothing():
    model, closure, _ = mlp_task()
    with pytest.raises(morphc.BypassError, match="nn.Module"):
        morphc.Bypass(lambda x: x, OPTIMIZERS["adam"])
    with pytest.raises(morphc.BypassError, match="no trainable parameter"):
        morphc.Bypass(nn.ReLU(), OPTIMIZERS["adam"])
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bp = morphc.Bypass(bn, OPTIMIZERS["adam"], verbose=False)

    def without_autograd(m):
        with torch.no_grad():
            return m(x).pow(2).mean()

    with pytest.raises(morphc.BypassError, match="does not require grad"):
        bp.step(without_autograd)
    for k, v in bn.state_dict().items():      # BatchNorm's statistics moved back too
        assert torch.equal(v, before[k]), k
