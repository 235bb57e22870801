"""After a kept cycle, plain training goes on beside the run for a while (``probation_steps``);
if it is then better, its state is handed over: a kept cycle cannot divert a run that plain
training would have won."""

import io

import pytest
import torch
import torch.nn.functional as F

import morphc
from tests.runtime.test_bypass import events, snapshot
from tests.runtime.test_bypass_pays import _dropout_bn_task, optimizer_state, same_optimizer_state

STEPS = 30


def _plain_run():
    """The reference: the same batches trained without Bypass (weights, Adam state, RNG)."""
    model, batches = _dropout_bn_task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in batches[:STEPS]:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    state = {n: {k: v.clone() for k, v in opt.state[p].items()}
             for n, p in model.named_parameters()}
    return snapshot(model), state, torch.get_rng_state()


def _judge(holder, model, plain_wins_after_the_cycle):
    """An eval closure whose verdicts the test chooses: the real loss on a fixed batch, plus a
    large penalty on plain training's copy until the cycle was kept (so it is kept), then —
    if ``plain_wins_after_the_cycle`` — on the user's model instead (so probation hands over)."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)

    def judge(m):
        kept = bool(events(holder["bp"], "contract"))
        plain = not (m is model or isinstance(m, morphc.ExtendedModel))   # the copy beside
        penalised = m is model if kept and plain_wins_after_the_cycle else plain
        return F.mse_loss(m(x), y) + (10.0 if penalised else 0.0)
    return judge


def _bypass(model, holder, plain_wins, **kw):
    options = dict(trigger=morphc.Schedule(at=[3]), bypass_steps=4, return_steps=4,
                   verbose=False, eval_closure=_judge(holder, model, plain_wins))
    options.update(kw)
    holder["bp"] = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2), **options)
    return holder["bp"]


def _train(bp, batches):
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))


def test_a_kept_cycle_that_plain_training_overtakes_hands_over_plain_training_bit_for_bit():
    rng = torch.get_rng_state()
    expected, expected_state, expected_rng = _plain_run()
    torch.set_rng_state(rng)
    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=True)
    _train(bp, batches[:STEPS])
    bp.finish()
    assert len(events(bp, "contract")) == 1, "the cycle was kept"
    verdicts = events(bp, "probation")
    assert [v["to"] for v in verdicts] == ["plain"]
    assert verdicts[0]["step"] == events(bp, "contract")[0]["step"] + 2 * 8
    assert bp._unpaid == 1, "a kept cycle overturned by its probation is a miss: back off"
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert same_optimizer_state(optimizer_state(bp, model), expected_state)
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_kept_cycle_that_stays_ahead_keeps_its_run_and_no_cycle_starts_meanwhile():
    expected, _, _ = _plain_run()
    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=False, trigger=morphc.Schedule(every=3))
    _train(bp, batches[:STEPS])
    bp.finish()
    kept, verdicts, starts = events(bp, "contract"), events(bp, "probation"), events(bp, "extend")
    assert verdicts and verdicts[0]["to"] == "cycle"
    assert not any(kept[0]["step"] < e["step"] <= verdicts[0]["step"] for e in starts), \
        "no cycle starts while plain training runs beside a kept one"
    assert any(not torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_finish_during_probation_judges_it_and_probation_steps_0_turns_it_off():
    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=True)
    _train(bp, batches[:15])                   # the cycle ended at step 11: on probation
    assert bp._probation is not None
    bp.finish()
    assert [v["to"] for v in events(bp, "probation")] == ["plain"]
    assert bp._probation is None

    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=True, probation_steps=0)
    _train(bp, batches[:STEPS])
    bp.finish()
    assert events(bp, "contract") and not events(bp, "probation")


def test_a_checkpoint_taken_on_probation_resumes_it():
    rng = torch.get_rng_state()
    model, batches = _dropout_bn_task()
    straight = _bypass(model, {}, plain_wins=True)
    _train(straight, batches[:STEPS])
    expected = snapshot(model)

    torch.set_rng_state(rng)
    model, batches = _dropout_bn_task()
    holder = {}
    first = _bypass(model, holder, plain_wins=True)
    _train(first, batches[:18])
    assert first._probation is not None
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    rng_now = torch.get_rng_state()
    fresh, _ = _dropout_bn_task()               # it seeds the global RNG: put the run's back
    torch.set_rng_state(rng_now)
    resumed = _bypass(fresh, holder, plain_wins=True)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed._probation is not None
    _train(resumed, batches[18:STEPS])
    assert [v["to"] for v in events(resumed, "probation")] == ["plain"]
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())


def _closing_judge(holder, model, behind_at_first_verdict):
    """Verdicts the test chooses: plain training's copy behind the run by 10 until the cycle
    is kept, by ``behind_at_first_verdict`` at the probation's first verdict, and ahead from
    then on."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)

    def judge(m):
        bp = holder["bp"]
        plain = not (m is model or isinstance(m, morphc.ExtendedModel))
        loss = F.mse_loss(m(x), y)
        if not events(bp, "contract"):
            return loss + (10.0 if plain else 0.0)
        if not events(bp, "probation"):
            return loss + (behind_at_first_verdict if plain else 0.0)
        return loss + (0.0 if plain else 10.0)
    return judge


@pytest.mark.parametrize(("behind", "verdicts"), [(1.0, ["longer", "plain"]), (9.0, ["cycle"])])
def test_a_probation_goes_on_while_plain_training_closes_in_fast(behind, verdicts):
    """Plain training that is leaving a plateau the kept run sits on (XOR at lr 0.3: the run at
    the 0.125 minimum, plain 0.25 → 0.18 over the probation, solved soon after) is still behind
    when the probation ends; if it closed the gap fast enough to overtake within another
    probation at that pace, the probation goes on — and hands over when it does overtake."""
    rng = torch.get_rng_state()
    expected, expected_state, _ = _plain_run()
    torch.set_rng_state(rng)
    model, batches = _dropout_bn_task()
    holder = {}
    bp = _bypass(model, holder, plain_wins=False, probation_steps=8,
                 eval_closure=_closing_judge(holder, model, behind))
    _train(bp, batches[:STEPS])
    bp.finish()
    kept = events(bp, "contract")
    assert len(kept) == 1
    assert [v["to"] for v in events(bp, "probation")] == verdicts
    if verdicts[-1] == "plain":
        assert [v["step"] for v in events(bp, "probation")] == [kept[0]["step"] + 8,
                                                                kept[0]["step"] + 16]
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert same_optimizer_state(optimizer_state(bp, model), expected_state)


def test_finish_judges_a_probation_that_went_on_without_extending_it():
    model, batches = _dropout_bn_task()
    holder = {}
    bp = _bypass(model, holder, plain_wins=False, probation_steps=8,
                 eval_closure=_closing_judge(holder, model, 1.0))
    _train(bp, batches[:22])              # kept at 11, went on at 19: on probation until 27
    assert [v["to"] for v in events(bp, "probation")] == ["longer"]
    assert bp._probation is not None
    bp.finish()
    assert [v["to"] for v in events(bp, "probation")] == ["longer", "plain"]
    assert bp._probation is None


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_probation_steps_must_be_a_count(steps):
    model, _ = _dropout_bn_task()
    with pytest.raises(morphc.BypassError, match="probation_steps"):
        _bypass(model, {}, plain_wins=True, probation_steps=steps)


def test_a_closure_that_raises_on_probation_ends_it_with_the_users_run_kept():
    model, batches = _dropout_bn_task()
    bp = _bypass(model, {}, plain_wins=True)
    _train(bp, batches[:15])
    assert bp._probation is not None
    weights = snapshot(model)

    def broken(m):
        raise ZeroDivisionError("a bug in the user's closure")
    with pytest.raises(ZeroDivisionError):
        bp.step(broken)
    assert bp._probation is None, "a copy a step ahead of the run is never handed over"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    _train(bp, batches[15:STEPS])
    assert not events(bp, "probation")
