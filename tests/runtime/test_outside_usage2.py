"""Probes from a second outside-in round: habits of users' closures and models that a cycle
must not change the meaning of — a closure that zeroes gradients, a penalty over the user's own
weights, gradient hooks (a pruning mask), DDP's bucket-view gradients. A joint free step trains
what it trains without the habit; plain training beside a cycle is plain training, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import state_differences, training_state


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _weights_after_a_cycle(clears: str, **options):
    """The user's weights and the extension's after 5 plain and 10 joint free steps, with a
    closure that clears gradients first (``clears``: whose) or not ("")."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[5]), bypass_steps=20,
                       return_steps=5, verbose=False, **options)

    def closure(m):
        {"optimizer": optimizer.zero_grad, "model": model.zero_grad, "module": m.zero_grad,
         "": lambda: None}[clears]()
        return F.mse_loss(m(x), y)

    for _ in range(15):
        bp.step(closure)
    assert bp.extended is not None, "the cycle should still be in its free phase"
    weights = [p.detach().clone() for p in [*model.parameters(),
                                            *bp.extended.extension_parameters()]]
    bp.finish()
    return weights


@pytest.mark.parametrize("clears", ["optimizer", "model", "module"])
def test_a_closure_that_zeroes_gradients_trains_the_joint_free_phase_as_one_that_does_not(clears):
    # torch's closure habit (`optimizer.zero_grad(); loss = ...`, minus the backward Bypass
    # refuses) is harmless in plain training; in the joint free phase the closure runs once per
    # homotopy between two backwards, and it threw away the s = 0 gradient of every weight:
    # the free phase trained L(s=1) alone, the foldable model unguarded (weights off by 0.02)
    expected = _weights_after_a_cycle("")
    got = _weights_after_a_cycle(clears)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_a_closure_that_zeroes_gradients_scores_sites_as_one_that_does_not():
    # sites="auto" runs the same joint steps per candidate site (runtime/lookahead.py)
    def scores(clears):
        model = _net()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
        bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[3]), bypass_steps=4,
                           return_steps=2, sites="auto", lookahead_steps=5, verbose=False)

        def closure(m):
            if clears:
                optimizer.zero_grad()
            return F.mse_loss(m(x), y)

        for _ in range(4):
            bp.step(closure)
        bp.finish()
        (extend,) = [e for e in bp.history if e["event"] == "extend"]
        return extend["scores"]

    expected, got = scores(False), scores(True)
    assert set(expected) == set(got) and len(expected) == 2
    assert all(expected[k] == got[k] for k in expected), (expected, got)


def test_the_joint_step_sums_gradients_ddp_keeps_in_bucket_views(tmp_path):
    # DDP(gradient_as_bucket_view=True) gives every weight a gradient that views a bucket the
    # next backward writes into: gradients set aside between the joint step's two backwards
    # (so a closure's zero_grad() cannot drop them) must be copies, or the sum is twice L(s=1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        plain = _weights_after_a_cycle("", ddp=True)
        views = _weights_after_a_cycle("", ddp=True,
                                       ddp_options={"gradient_as_bucket_view": True})
    finally:
        dist.destroy_process_group()
    for p, v in zip(plain, views, strict=True):
        assert torch.equal(p, v)


def _pruned(seed=0):
    """A net whose first layer keeps half its weights at zero through a gradient hook (a
    pruning mask), and its optimizer: plain SGD never moves the masked weights."""
    model = _net(seed)
    mask = (torch.arange(24).reshape(8, 3) % 2).float()
    with torch.no_grad():
        model[0].weight.mul_(mask)
    model[0].weight.register_hook(lambda grad: grad * mask)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mask


def test_gradient_hooks_on_the_users_weights_shape_plain_training_beside_a_cycle():
    # the copy that trains plainly beside each cycle is a deepcopy, and deepcopy drops a
    # Parameter's tensor hooks: a cycle that did not pay handed over a state trained without
    # the user's mask (pruned weights grown back), not the state plain training would be in
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    model, optimizer, mask = _pruned()
    for _ in range(12):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, mask = _pruned()
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(every=3), bypass_steps=3,
                       return_steps=3, verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    for _ in range(12):
        bp.step(lambda m: F.mse_loss(m(x), y))
    assert bp.finish() is model
    assert any(e["event"] == "rollback" and e["to"] == "plain" for e in bp.history)
    assert torch.all(model[0].weight[mask == 0] == 0), "pruned weights grew back"
    for e, p in zip(expected, model.parameters(), strict=True):
        assert torch.equal(e, p)


def _anchored_run(bypass: bool, steps: int = 12):
    """An EWC-style penalty toward the starting weights, written over the user's own model
    (``model.parameters()``, not the closure's module): plain SGD, or Bypass with cycles that
    never pay (every one handed over to plain training beside it)."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    anchor = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)

    def closure(m):
        pull = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
        return F.mse_loss(m(x), y) + 0.5 * pull

    if not bypass:
        for _ in range(steps):
            optimizer.zero_grad()
            closure(model).backward()
            optimizer.step()
        return model, None
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(every=3), bypass_steps=3,
                       return_steps=3, verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    for _ in range(steps):
        bp.step(closure)
    assert bp.finish() is model
    return model, bp


def test_a_closure_that_reads_the_users_own_weights_trains_plain_training_beside_a_cycle_too():
    # the copy trained beside a cycle ran the closure on itself, but the penalty read the
    # user's weights: the copy trained without it, and a hand-over gave a state plain training
    # (penalty included) is not in
    expected, _ = _anchored_run(False)
    model, bp = _anchored_run(True)
    assert any(e["event"] == "rollback" and e["to"] == "plain" for e in bp.history)
    for e, p in zip(expected.parameters(), model.parameters(), strict=True):
        assert torch.equal(e, p)


def test_without_eval_closure_a_verdict_averages_the_last_steps_batches():
    # with minibatches and no eval_closure, which of two close runs is kept was decided on the
    # last batch alone — an epoch's remainder may hold a few samples; now on the mean loss of
    # the last 8 steps' closures, each on its own batch
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))
               for n in [32] * 19 + [3]]                 # the last batch: a remainder of 3
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[4]), bypass_steps=8,
                       return_steps=8, verbose=False)
    closures = [lambda m, x=x, y=y: F.mse_loss(m(x), y) for x, y in batches]
    for closure in closures:
        bp.step(closure)
    verdict = next(e for e in bp.history if e["event"] in ("contract", "rollback")
                   and e.get("loss_after") is not None)
    assert verdict["step"] == 20
    with torch.no_grad():
        if verdict["event"] == "contract":    # the user's model is the judged one
            expected = sum(float(c(model)) for c in closures[-8:]) / 8
            assert verdict["loss_after"] == pytest.approx(expected, rel=1e-6)
            assert verdict["loss_after"] != pytest.approx(float(closures[-1](model)), rel=1e-3)
        else:                                 # handed over: the user's model is plain's
            expected = sum(float(c(model)) for c in closures[-8:]) / 8
            assert verdict["loss_plain"] == pytest.approx(expected, rel=1e-6)
            assert verdict["loss_plain"] != pytest.approx(float(closures[-1](model)), rel=1e-3)


def test_full_batch_verdicts_are_the_closures_own_value():
    # the same data on every step: the averaged verdict is the one closure's value, bit for bit
    from morphc.runtime.verdicts import RecentBatches
    model = _net()
    x = torch.randn(16, 3)
    closures = tuple(lambda m: F.mse_loss(m(x), torch.zeros(16, 1)) for _ in range(3))
    with torch.no_grad():
        assert RecentBatches(closures)(model) == float(closures[0](model))


def test_batches_are_held_for_verdicts_only_while_a_cycle_runs_and_judge_batches_is_checked():
    # the closures (and the batches they hold) of plain steps are not kept: a verdict only
    # ever reads the steps of the cycle or probation it ends
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[3]), bypass_steps=4,
                       return_steps=4, probation_steps=0, judge_batches=2, verbose=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    held = []
    for _ in range(14):
        bp.step(lambda m: F.mse_loss(m(x), y))
        held.append(len(bp._recent_closures))
    assert held[:3] == [0, 0, 0] and max(held) == 2 and held[-1] == 0
    with pytest.raises(morphc.BypassError, match="judge_batches"):
        morphc.Bypass(_net(), optimizer, judge_batches=0)


def _clamped_run(clamp: bool, with_bypass: bool = True):
    """A run with a cycle at step 3 that never pays; ``clamp``: the user clamps every weight
    after each step (a projection). Returns the rollbacks and the final state."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(at=[3]), bypass_steps=4,
                       return_steps=4, verbose=False) if with_bypass else None
    for _ in range(14):
        if bp is None:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        else:
            bp.step(lambda m: F.mse_loss(m(x), y))
        if clamp:
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-0.2, 0.2)
    if bp is None:
        return [], training_state(model, optimizer)
    bp.finish()
    return [e for e in bp.history if e["event"] == "rollback"], training_state(model, optimizer)


def test_weights_edited_between_steps_mid_cycle_reach_plain_training(monkeypatch):
    # a clamp after each step reached the cycle's weights but not plain training's copy beside
    # the cycle: handing that copy over gave a state trained without the user's rule (then the
    # copy was dropped with a warning, and a miss lost the cycle's steps). Between a cycle's
    # steps the model now shows plain training's values, so the clamp is done to them, and
    # plain training keeps it: a miss hands over exactly the clamped plain run
    from morphc.runtime.cycle import Cycle
    monkeypatch.setattr(Cycle, "pays", lambda self, *args: False)
    import warnings
    _, expected = _clamped_run(True, with_bypass=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edited, got = _clamped_run(True)
    assert [e["to"] for e in edited] == ["plain"]
    assert state_differences(expected, got) == []
