"""A free phase goes on while it still leaves the plateau, within its cap and the run's budget."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.errors import BypassError
from morphc.runtime.cycle import Cycle


def stalled_regression(seed=0):
    """A regression whose plain training crawls (lr 1e-4: the trigger fires) while the branch,
    at its own lr, keeps gaining for many steps: (model, closure)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=gen)
    y = torch.sin(3 * x[:, :1]) * x[:, 1:2]
    return model, lambda m: F.mse_loss(m(x), y)


def bypass(model, **kw):
    options = dict(trigger=morphc.Plateau(window=5, threshold=1e-2), bypass_steps=10,
                   return_steps=10, width=4, verbose=False, accept="always",
                   extension_options={"lr": 0.05}, max_cycles=1)
    options.update(kw)
    return morphc.Bypass(model, torch.optim.SGD(model.parameters(), lr=1e-4), **options)


def free_steps(bp):
    """How many free steps each cycle had: from its extension to its return."""
    starts = [e["step"] for e in bp.history if e["event"] == "extend"]
    ends = [e["step"] for e in bp.history if e["event"] == "return"]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def run(bp, closure, steps):
    return [float(bp.step(closure)) for _ in range(steps)]


@pytest.mark.parametrize("accept", ["if_better", "always"])
def test_a_free_phase_that_keeps_gaining_grows_to_its_cap(accept):
    model, closure = stalled_regression()
    bp = bypass(model, max_bypass_steps=30, accept=accept)
    run(bp, closure, 80)
    grown = free_steps(bp)
    if accept == "always":      # no verdict, nothing to measure the free phase against
        assert grown == [10]
    else:
        assert grown == [30]
        assert [e["free_steps"] for e in bp.history if e["event"] == "return"] == [30]


@pytest.mark.parametrize("bypass_steps", [10, 7])
def test_by_default_a_free_phase_that_keeps_gaining_grows_to_four_times_its_length(bypass_steps):
    model, closure = stalled_regression()
    bp = bypass(model, bypass_steps=bypass_steps, accept="if_better")
    run(bp, closure, 120)
    assert free_steps(bp) == [4 * bypass_steps]


def test_a_free_phase_longer_than_the_old_absolute_cap_is_no_error():
    model, _ = stalled_regression()
    assert bypass(model, bypass_steps=500).config.free_steps_cap == 2000


def test_none_keeps_the_free_phase_fixed():
    model, closure = stalled_regression()
    bp = bypass(model, max_bypass_steps=None, accept="if_better")
    run(bp, closure, 80)
    assert free_steps(bp) == [10]


def test_a_fixed_free_phase_when_the_cap_is_its_length():
    model, closure = stalled_regression()
    bp = bypass(model, max_bypass_steps=10, accept="if_better")
    run(bp, closure, 80)
    assert free_steps(bp) == [10]


def test_the_free_phase_never_grows_past_the_runs_budget():
    model, closure = stalled_regression()
    probe = bypass(model, max_bypass_steps=30, accept="if_better")
    run(probe, closure, 80)
    start = next(e["step"] for e in probe.history if e["event"] == "extend")
    model, closure = stalled_regression()
    budget = start + 10 + 5 + 10 + 2     # room for one window of growth, not two
    bp = bypass(model, max_bypass_steps=30, accept="if_better", total_steps=budget)
    run(bp, closure, budget)
    assert free_steps(bp) == [15]
    assert bp.phase == "train"        # the cycle ended inside the budget


def test_a_trigger_without_a_measure_of_escape_keeps_cycles_fixed():
    model, closure = stalled_regression()
    bp = bypass(model, trigger=morphc.Schedule(at=[5]), max_bypass_steps=30,
                accept="if_better")
    run(bp, closure, 60)
    assert free_steps(bp) == [10]


def test_a_checkpoint_inside_a_grown_free_phase_resumes_it():
    model, closure = stalled_regression()
    straight = bypass(model, max_bypass_steps=30, accept="if_better")
    expected = run(straight, closure, 80)
    start = next(e["step"] for e in straight.history if e["event"] == "extend")
    split = start + 22                           # past the planned end, inside the growth

    model, closure = stalled_regression()
    first = bypass(model, max_bypass_steps=30, accept="if_better")
    got = run(first, closure, split)
    assert first.phase == "bypass"
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = stalled_regression(seed=1)
    resumed = bypass(fresh, max_bypass_steps=30, accept="if_better")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += run(resumed, closure, 80 - split)
    assert got == expected
    assert free_steps(resumed) == free_steps(straight) == [30]


@pytest.mark.parametrize("cap", [5, 2.5, True, "4x"])
def test_a_cap_below_the_free_phase_or_not_an_int_is_a_typed_error(cap):
    model, _ = stalled_regression()
    with pytest.raises(BypassError, match="max_bypass_steps"):
        bypass(model, max_bypass_steps=cap)


def test_after_a_miss_free_phases_keep_their_length_and_the_wait_counts_the_grown_one(
        monkeypatch):
    """Growth is a bet on an escape: once a grown cycle missed, the trigger waits 2 × the steps
    that cycle ran (not 2 × a fixed cycle), and the next free phase does not grow."""
    monkeypatch.setattr(Cycle, "pays",
                        lambda self, before, after, plain=None: False)
    model, closure = stalled_regression()
    bp = bypass(model, max_bypass_steps=30, accept="if_better", max_cycles=2)
    run(bp, closure, 200)
    assert free_steps(bp) == [30, 10]
    first, second = [e["step"] for e in bp.history if e["event"] == "extend"]
    missed = next(e["step"] for e in bp.history if e["event"] == "rollback")
    assert missed - first == 40 and second >= missed + 2 * 40
