"""Bypass's default cycle, its acceptance test, and the faults that must leave a user whole."""

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc import zoo
from tests.runtime.test_bypass import OPTIMIZERS, cnn_task, events, mlp_task, run, snapshot


def default_bypass(model, **kw):
    options = dict(trigger=morphc.Schedule(at=[3]), bypass_steps=4, return_steps=4,
                   verbose=False)
    options.update(kw)
    return morphc.Bypass(model, OPTIMIZERS["adam"], **options)


def optimizer_state(bp, model):
    return {n: {k: v.clone() for k, v in bp.optimizer.state[p].items()}
            for n, p in model.named_parameters()}


def same_optimizer_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


# -- the default cycle ------------------------------------------------------------------------
def test_default_free_phase_is_joint_and_the_return_projects_at_once():
    model, closure, _ = mlp_task()
    calls = []

    def counted(m):
        calls.append(float(m.homotopy) if isinstance(m, morphc.ExtendedModel) else None)
        return closure(m)

    bp = default_bypass(model, accept="always")
    run(bp, counted, 3)
    calls.clear()
    run(bp, counted, 4)                                     # the free phase
    assert calls == [0.0, 1.0] * 4, "each free step trains L(s=0) and L(s=1)"
    assert bp.phase == "return" and bp.extended.homotopy == 0.0, "projected at once"
    assert bp.extended.constraint_residual() == 0.0
    run(bp, counted, 4)
    contract = events(bp, "contract")[0]
    assert contract["snap_change"] is None and contract["residual"] == 0.0
    for key in ("loss_before", "loss_free", "loss_after", "survival"):
        assert key in contract


def test_the_free_pass_leaves_batchnorm_statistics_to_the_model_a_fold_keeps():
    model, closure, _ = cnn_task()
    after_s0 = []

    def recording(m):
        loss = closure(m)
        if isinstance(m, morphc.ExtendedModel) and float(m.homotopy) == 0.0:
            after_s0.append({k: v.clone() for k, v in model.bn1.named_buffers()})
        return loss

    bp = default_bypass(model, accept="always")
    run(bp, recording, 3)
    assert bp.phase == "bypass"
    for _ in range(3):
        tracked = int(model.bn1.num_batches_tracked)
        run(bp, recording, 1)
        assert int(model.bn1.num_batches_tracked) == tracked + 1, "one update per step"
        for key, value in model.bn1.named_buffers():
            assert torch.equal(value, after_s0[-1][key]), f"{key}: as the s = 0 pass left it"


def test_a_kept_cycle_that_stays_on_the_plateau_backs_off_too():
    model, closure, _ = mlp_task()

    def flat(m):                       # a constant loss: the Plateau fires, pace is 0
        return closure(m) * 0.0 + 1.0

    # per cycle: at its start the judge twice (it replays), at the end of the free phase s = 1,
    # s = 0, before (it found something); at its close: after, then before
    verdicts = iter([1.0, 1.0, 0.5, 0.5, 1.0, 0.999, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.5, 1.0] * 4)

    bp = morphc.Bypass(model, OPTIMIZERS["adam"], trigger=morphc.Plateau(window=2),
                       bypass_steps=2, return_steps=2, verbose=False, shadow=False,
                       max_bypass_steps=2,          # fixed cycles: the verdicts are scripted
                       eval_closure=lambda m: torch.tensor(next(verdicts)))
    run(bp, flat, 60)
    contracts = events(bp, "contract")
    extends = events(bp, "extend")
    assert len(contracts) >= 2, "both cycles paid and were kept"
    tiny, large = contracts[0], contracts[1]
    assert tiny["loss_after"] == pytest.approx(0.999) and large["loss_after"] == 0.5
    gap_after_tiny = extends[1]["step"] - tiny["step"]
    gap_after_large = extends[2]["step"] - large["step"]
    assert gap_after_tiny >= 2 * 4, "kept with a 0.1 % gain: backed off like a miss"
    assert gap_after_large < gap_after_tiny, "a real escape resets the back-off"


def test_a_cycle_that_does_not_pay_is_rolled_back_bit_identically_and_backs_off():
    model, closure, _ = cnn_task()
    # the judge replays (1, 1 at the start of each cycle); the free phase found something
    # (s = 1: 0.5, s = 0: 0.5, before: 1); after the cycle: 10, before it: 1 — it did not pay
    verdicts = iter([1.0, 1.0, 0.5, 0.5, 1.0, 10.0, 1.0, 1.0, 1.0])

    def judge(m):
        return torch.tensor(next(verdicts))

    bp = morphc.Bypass(model, OPTIMIZERS["adam"], trigger=morphc.Schedule(every=1),
                       bypass_steps=2, return_steps=2, eval_closure=judge, verbose=False,
                       shadow=False)
    run(bp, closure, 1)
    assert bp.phase == "bypass"
    weights = snapshot(model)
    run(bp, closure, 4)
    rollback = events(bp, "rollback")[0]
    assert "did not pay" in rollback["reason"]
    assert rollback["loss_after"] == 10.0 and rollback["loss_before"] == 1.0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert bp.phase == "train" and bp.cycle == 0
    run(bp, closure, 7)                # Schedule fires every step, yet Bypass backs off
    assert len(events(bp, "extend")) == 1
    run(bp, closure, 1)                # for 2 × (bypass + return steps) after a miss
    assert len(events(bp, "extend")) == 2


@pytest.mark.parametrize("found", [True, False], ids=["did-not-pay", "found-nothing"])
def test_rollback_restores_the_optimizer_state_too(found):
    """Rolled back when the cycle closes without paying, or already at the end of a free phase
    that found nothing (then the return is skipped): either way bit for bit."""
    model, closure, _ = mlp_task()
    free = 0.5 if found else 1.0                  # at the end of the free phase, s = 1 and 0
    # at the start, the judge twice (it replays); s = 1, s = 0, then before; at the close
    # after, then before
    verdicts = iter([1.0, 1.0, free, free, 1.0, 1.0, 1.0])
    bp = default_bypass(model, eval_closure=lambda m: torch.tensor(next(verdicts)), shadow=False)
    run(bp, closure, 3)
    state, weights = optimizer_state(bp, model), snapshot(model)
    run(bp, closure, 8 if found else 4)
    rollback = events(bp, "rollback")
    assert len(rollback) == 1 and not events(bp, "contract") and bp.phase == "train"
    assert ("did not pay" if found else "found nothing") in rollback[0]["reason"]
    assert bool(events(bp, "return")) == found, "a free phase that found nothing: no return"
    assert same_optimizer_state(optimizer_state(bp, model), state)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_acceptance_demands_more_than_plain_trainings_own_pace():
    model, closure, _ = mlp_task()
    bp = default_bypass(model, trigger=morphc.Plateau(window=3, threshold=10.0))
    run(bp, closure, 40)
    decided = events(bp, "contract") + events(bp, "rollback")
    assert decided, "cycles ran"
    for event in events(bp, "contract"):
        assert event["loss_after"] < event["loss_before"]


# -- never worse: faults at any phase ---------------------------------------------------------
def inf_batch(closure_x, y):
    bad = closure_x.clone()
    bad[0, 0] = float("inf")
    return lambda m: F.cross_entropy(m(bad), y)


def test_non_finite_batch_while_training_skips_the_step_untouched():
    model, closure, (x,) = cnn_task()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    bp = default_bypass(model, trigger=morphc.Schedule(at=[100]))
    run(bp, closure, 2)
    weights, state = snapshot(model), optimizer_state(bp, model)
    bp.step(inf_batch(x, y))
    assert events(bp, "skip")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert same_optimizer_state(optimizer_state(bp, model), state)
    strict = default_bypass(model, trigger=morphc.Schedule(at=[100]), on_failure="raise")
    with pytest.raises(morphc.BypassError, match="weights are untouched"):
        strict.step(inf_batch(x, y))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_inf_batch_during_a_cycle_rolls_back_and_never_corrupts():
    model, closure, (x,) = cnn_task()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    bp = default_bypass(model)
    run(bp, closure, 3)
    assert bp.phase == "bypass"
    weights = snapshot(model)
    bp.step(inf_batch(x, y))
    assert bp.phase == "train" and "non-finite" in events(bp, "rollback")[0]["reason"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} changed"


def test_nan_gradient_with_a_finite_loss_on_the_last_return_step_is_not_folded():
    """The cycle is rolled back, never folded; plain training beside it skipped that batch too
    (its gradient is NaN as well), so the user gets plain training's 10 steps."""
    model, closure, (x,) = mlp_task()
    opt = OPTIMIZERS["adam"](model.parameters())
    for _ in range(10):
        opt.zero_grad()
        closure(model).backward()
        opt.step()
    weights = snapshot(model)
    model, closure, (x,) = mlp_task()
    bp = default_bypass(model)
    run(bp, closure, 10)
    assert bp.phase == "return" and bp.phase_step == 3

    def finite_loss_nan_grad(m):
        out = m(x)
        return closure(m) + 0.0 * torch.sqrt(((out - out.detach()) ** 2).sum())

    loss = bp.step(finite_loss_nan_grad)
    assert torch.isfinite(loss)
    assert not events(bp, "contract") and "gradient" in events(bp, "rollback")[0]["reason"]
    assert events(bp, "rollback")[0]["to"] == "plain"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_closure_that_ignores_its_module_is_an_error_at_the_first_cycle_step():
    model, closure, (x,) = mlp_task()
    bp = default_bypass(model)
    run(bp, closure, 3)
    weights = snapshot(model)
    with pytest.raises(morphc.BypassError, match="does not call the module"):
        bp.step(lambda m: model(x).pow(2).mean())
    assert bp.phase == "train"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# -- mistakes surface at once -----------------------------------------------------------------
def test_step_with_a_tensor_is_a_typed_error():
    model, closure, (x,) = mlp_task()
    bp = default_bypass(model)
    with pytest.raises(morphc.BypassError, match="closure"):
        bp.step(closure(model))


def test_wrong_example_inputs_fail_at_construction():
    model, _, _ = mlp_task()
    with pytest.raises(morphc.BypassError, match=r"\(8, 7"):
        default_bypass(model, example_inputs=torch.randn(8, 7))


def test_dropping_a_bypass_mid_cycle_warns():
    model, closure, _ = mlp_task()
    bp = default_bypass(model)
    run(bp, closure, 4)
    assert bp.phase == "bypass"
    with pytest.warns(RuntimeWarning, match="mid-cycle"):
        del bp
        gc.collect()


def test_a_failing_extension_warns_once_and_is_not_retried():
    model, closure, _ = mlp_task()
    bp = default_bypass(model, sites="no_such_layer", trigger=morphc.Schedule(every=2))
    with pytest.warns(RuntimeWarning, match="no site matches") as caught:
        run(bp, closure, 12)
    assert len([w for w in caught if "no site matches" in str(w.message)]) == 1
    assert len(events(bp, "failure")) == 1


# -- when cycles start ------------------------------------------------------------------------
def test_no_cycle_in_a_decayed_learning_rate_tail():
    model, closure, _ = mlp_task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    bp = morphc.Bypass(model, opt, trigger=morphc.Schedule(at=[5]), verbose=False)
    for _ in range(8):
        bp.step(closure)
        scheduler.step()
    assert not events(bp, "extend"), "lr at 1 % of its peak: not stagnation"


@pytest.mark.parametrize("decay", ["held", "annealing"])
def test_a_plateau_at_a_decayed_but_steady_lr_is_stagnation_a_falling_lr_is_not(decay):
    """ReduceLROnPlateau or a step decay leaves the lr below half its peak but still: a flat
    loss there is the model's plateau. A cosine-like tail moves the lr every step: the loss
    flattens because the lr goes to zero, and no cycle starts."""
    model, closure, _ = mlp_task()

    def flat(m):                       # a constant loss: the Plateau fires whenever allowed
        return closure(m) * 0.0 + 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bp = morphc.Bypass(model, opt, trigger=morphc.Plateau(window=3), bypass_steps=2,
                       return_steps=2, verbose=False, eval_closure=flat)
    for step in range(1, 30):
        if step == 2:
            opt.param_groups[0]["lr"] = 0.025          # below half the peak ...
        elif decay == "annealing" and step > 2:
            opt.param_groups[0]["lr"] *= 0.99          # ... and still falling, or held
        bp.step(flat)
    starts = [e["step"] for e in events(bp, "extend")]
    if decay == "held":
        assert starts and starts[0] >= 2 + 2 * 3, "after the trigger's two windows at one lr"
    else:
        assert not starts


def test_no_cycle_that_cannot_end_inside_the_budget():
    model, closure, _ = mlp_task()
    bp = default_bypass(model, trigger=morphc.Schedule(every=2), total_steps=10)
    run(bp, closure, 10)
    for event in events(bp, "extend"):
        assert event["step"] + 8 <= 10


# -- batches whose shape changes --------------------------------------------------------------
class Encoder(torch.nn.Module):
    """nn.TransformerEncoder: symbolic_trace fails, so it goes through torch.export."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.encoder(x)).mean(dim=1)


def test_a_sliced_example_batch_does_not_pin_the_graph_to_views():
    torch.manual_seed(0)
    model, data = Encoder(), torch.randn(4, 12, 16)
    y = torch.randn(4, 1)
    bp = default_bypass(model, accept="always")
    for step in range(11):                 # the first (traced) batch is a view of `data`
        length = 10 if step == 0 else (12 if step % 2 else 7)
        batch = data[:, :length]
        bp.step(lambda m, b=batch: F.mse_loss(m(b), y))
    assert bp.extended is None and events(bp, "contract"), "the cycle ran on both lengths"
    assert not events(bp, "rollback")


def test_a_batch_the_extended_graph_refuses_rolls_the_cycle_back():
    torch.manual_seed(0)
    model, data = Encoder(), torch.randn(6, 12, 16)
    y = torch.randn(6, 1)
    static = ({0: torch.export.Dim.STATIC, 1: torch.export.Dim.STATIC, 2: None},)
    bp = default_bypass(model, dynamic_shapes=static)
    run(bp, lambda m: F.mse_loss(m(data[:4]), y[:4]), 4)
    assert bp.phase == "bypass"
    weights = snapshot(model)
    with pytest.warns(RuntimeWarning, match="refused"):
        loss = bp.step(lambda m: F.mse_loss(m(data), y))     # another batch size
    assert torch.isfinite(loss) and bp.phase == "train"
    assert "refused" in events(bp, "rollback")[0]["reason"]
    assert any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items()), \
        "after the rollback the step was taken on the user's own model"


# -- sites="auto": chosen by what a short joint look-ahead keeps at s = 0 ---------------------
def test_auto_sites_look_ahead_leaves_the_user_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen)
    closure = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2), verbose=False,
                       trigger=morphc.Schedule(at=[3]), sites="auto", top_k=1,
                       lookahead_steps=5)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for _ in range(3):
        bp.step(closure)
        opt.zero_grad()
        closure(twin).backward()
        opt.step()
    extend_event = [e for e in bp.history if e["event"] == "extend"][0]
    scores = extend_event["scores"]
    assert set(scores) == {"0", "2", "4"} and all(math.isfinite(v) for v in scores.values())
    assert extend_event["sites"] == [max(scores, key=scores.get)], "the best look-ahead wins"
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: the trials were restored bit for bit"
        assert torch.equal(bp.optimizer.state[p]["exp_avg"], opt.state[q]["exp_avg"])


def test_auto_sites_escape_the_symmetric_saddle():
    x, y, _, _ = zoo.teacher_student_data(0)
    model = zoo.symmetric_student(0)
    closure = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2), verbose=False,
                       trigger=morphc.Schedule(at=[1]), sites="auto", top_k=1,
                       bypass_steps=100, return_steps=100, max_cycles=1)
    for _ in range(201):
        bp.step(closure)
    bp.finish()
    closed = [e for e in bp.history if e["event"] in ("contract", "rollback")]
    assert closed[0]["event"] == "contract", closed[0].get("reason")
    assert closed[0]["loss_after"] < 0.5 * closed[0]["loss_before"]
    assert not zoo.hidden_units_identical(model)


# -- plain training beside the cycle ------------------------------------------------------------
def _dropout_bn_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen))
               for _ in range(30)]
    return model, batches


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam+onecycle"])
def test_a_run_whose_cycles_never_pay_is_plain_training_bit_for_bit(optimizer):
    """Every cycle is judged against plain training run beside it and handed its state when it
    does not beat it, so a run in which no cycle pays ends exactly where plain training ends:
    weights, BatchNorm statistics, optimizer state and the dropout RNG stream, bit for bit —
    no step of the cycles is lost."""
    make = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if optimizer == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=1e-2))
    def schedule(opt):      # it wraps opt.step: the shadow's copy must not step the user's
        return torch.optim.lr_scheduler.OneCycleLR(opt, 0.02, total_steps=len(batches)) \
            if "onecycle" in optimizer else None

    model, batches = _dropout_bn_task()
    opt = make(model.parameters())
    scheduler, rng = schedule(opt), torch.get_rng_state()
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    expected, expected_rng = snapshot(model), torch.get_rng_state()
    expected_state = {n: {k: v.clone() for k, v in opt.state[p].items()}
                      for n, p in model.named_parameters()}

    model, batches = _dropout_bn_task()
    torch.set_rng_state(rng)
    bp = morphc.Bypass(model, make, trigger=morphc.Schedule(every=3), bypass_steps=4,
                       return_steps=4, verbose=False,
                       eval_closure=lambda m: torch.tensor(1.0))   # no cycle can beat plain
    scheduler = schedule(bp.optimizer)
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        if scheduler is not None:
            scheduler.step()
    bp.finish()
    rollbacks = events(bp, "rollback")
    assert rollbacks and all(e["to"] == "plain" for e in rollbacks)
    assert not events(bp, "contract")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert same_optimizer_state(optimizer_state(bp, model), expected_state)
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_cycle_is_kept_only_when_it_beats_plain_training_beside_it():
    model, closure, _ = mlp_task()
    bp = default_bypass(model, trigger=morphc.Plateau(window=3, threshold=10.0),
                        eval_closure=closure)
    run(bp, closure, 40)
    judged = events(bp, "contract") + events(bp, "rollback")
    assert judged and all(e["loss_plain"] is not None for e in judged if "loss_plain" in e)
    for event in events(bp, "contract"):
        assert event["loss_after"] < event["loss_plain"]
    for event in events(bp, "rollback"):
        assert event["to"] == "plain"


class _Uncopyable(nn.Module):
    """A model holding something deepcopy refuses (as a file handle or a lock would)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.lock = __import__("threading").Lock()

    def forward(self, x):
        return self.net(x)


def test_a_model_that_cannot_be_copied_runs_its_cycles_without_the_plain_copy():
    torch.manual_seed(0)
    model = _Uncopyable()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    bp = default_bypass(model, eval_closure=lambda m: F.mse_loss(m(x), y))
    with pytest.warns(RuntimeWarning, match="could not copy"):
        run(bp, lambda m: F.mse_loss(m(x), y), 12)
    bp.finish()
    judged = events(bp, "contract") + events(bp, "rollback")
    assert judged and all(e.get("to", "before") == "before" for e in events(bp, "rollback"))
