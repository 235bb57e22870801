"""Stagnation triggers: they fire on stagnation, stay quiet on progress, and checkpoint."""

import math
import time

import pytest

import morphc
from morphc.runtime.triggers import AllOf, AnyOf


def feed(trigger, losses, grad_norms=None):
    """Steps (1-based) at which the trigger fires."""
    fired = []
    for i, loss in enumerate(losses, start=1):
        g = None if grad_norms is None else grad_norms[i - 1]
        if trigger.update(loss, step=i, grad_norm=g):
            fired.append(i)
    return fired


def test_plateau_fires_on_flat_loss_once_two_windows_are_full():
    t = morphc.Plateau(window=20, threshold=1e-3)
    fired = feed(t, [0.5] * 60)
    assert fired and fired[0] == 40   # two full windows of the current model to compare


def test_plateau_judges_whether_a_cycle_left_the_plateau_by_its_own_threshold():
    t = morphc.Plateau(window=100, threshold=1e-3)
    assert not t.escaped(1.0, 0.999, steps=200), "0.1 % over 200 steps: still stagnant"
    assert t.escaped(1.0, 0.99, steps=200)
    assert not t.escaped(1.0, 1.01, steps=200)


def test_plateau_quiet_on_decreasing_loss():
    t = morphc.Plateau(window=20, threshold=1e-3)
    assert feed(t, [math.exp(-0.01 * i) for i in range(500)]) == []
    t = morphc.Plateau(window=20, threshold=1e-3)
    noisy = [1.0 / (1 + 0.05 * i) * (1 + 0.05 * (-1) ** i) for i in range(400)]
    assert feed(t, noisy) == [], "smoothing must absorb step-to-step noise"


def test_plateau_fires_when_a_descent_stalls():
    losses = [math.exp(-0.02 * i) for i in range(200)] + [math.exp(-4)] * 200
    fired = feed(morphc.Plateau(window=30, threshold=1e-3), losses)
    assert fired and 200 < fired[0] < 300


def spiked_descent():
    """A slow descent that one bad step throws 30× up, recovering within ~20 steps."""
    trend = [0.01 * math.exp(-0.001 * i) for i in range(600)]
    return [v * (1 + 29 * math.exp(-0.2 * (i - 300))) if i >= 300 else v
            for i, v in enumerate(trend)]


def test_plateau_does_not_fire_on_a_loss_spike():
    assert feed(morphc.Plateau(window=50), spiked_descent()) == [], \
        "a spike is instability that training recovers from, not a plateau"
    without_rule = morphc.Plateau(window=50)
    without_rule.spike_spread = math.inf
    assert feed(without_rule, spiked_descent()), "the spike is what the rule keeps out"
    flat_after_spike = spiked_descent()[:400] + [spiked_descent()[399]] * 300
    fired = feed(morphc.Plateau(window=50), flat_after_spike)
    assert fired and fired[0] > 400, "a plateau after the spike still fires"
    a, b = morphc.Plateau(window=50), morphc.Plateau(window=50)
    feed(a, flat_after_spike[:320])
    b.load_state_dict(a.state_dict())
    assert feed(a, flat_after_spike[320:]) == feed(b, flat_after_spike[320:]) != [], \
        "a checkpoint taken during a spike resumes the same"


def test_plateau_floor_and_nonfinite():
    assert feed(morphc.Plateau(window=5, floor=1e-6), [1e-9] * 50) == []
    t = morphc.Plateau(window=5)
    assert feed(t, [float("nan")] * 20) == []
    assert t.improvement() is None


def test_plateau_is_noise_aware():
    rng = __import__("random").Random(0)
    noisy_progress = [2.0 * 0.999 ** i * (1 + 0.3 * rng.gauss(0, 1)) for i in range(3000)]
    assert feed(morphc.Plateau(window=100), noisy_progress) == [], \
        "minibatch noise on a loss that still improves must not look like a plateau"
    quiet_plateau = [0.5 * (1 + 1e-5 * rng.gauss(0, 1)) for _ in range(400)]
    assert feed(morphc.Plateau(window=100), quiet_plateau)[0] == 200
    t = morphc.Plateau(window=10)
    feed(t, [1.0 - 0.001 * i for i in range(40)])
    assert t.pace() == pytest.approx(0.001 / 0.97, rel=0.05), "relative gain per step"


def test_plateau_is_constant_time_per_step():
    losses = [1.0 / (1 + i) for i in range(20_000)]

    def best_time(window):
        timings = []
        for _ in range(3):
            trigger = morphc.Plateau(window=window)
            start = time.perf_counter()
            feed(trigger, losses)
            timings.append(time.perf_counter() - start)
        return min(timings)

    assert best_time(100_000) < 3 * best_time(10) + 0.05, "cost must not grow with the window"


def test_plateau_reset_and_state_roundtrip():
    a = morphc.Plateau(window=10)
    feed(a, [1.0 / (1 + 0.1 * i) for i in range(25)])
    b = morphc.Plateau(window=10)
    b.load_state_dict(a.state_dict())
    rest = [0.3] * 150
    assert feed(a, rest) == feed(b, rest) != []
    a.reset()
    assert a.improvement() is None and a.pace() == 0.0


def test_gradient_norm_fires_after_patience():
    t = morphc.GradientNorm(threshold=1e-2, patience=5, smoothing=0.0)
    norms = [1.0] * 10 + [1e-3] * 10
    fired = feed(t, [0.0] * 20, norms)
    assert fired[0] == 15
    t = morphc.GradientNorm(threshold=1e-2, patience=5, smoothing=0.0)
    assert feed(t, [0.0] * 20, [1.0, 1e-3] * 10) == [], "patience counts consecutive steps"
    assert morphc.GradientNorm.needs_grad_norm


def test_gradient_norm_relative():
    t = morphc.GradientNorm(threshold=0.01, patience=3, smoothing=0.0, relative=True)
    fired = feed(t, [0.0] * 12, [100.0] * 6 + [0.5] * 6)
    assert fired == [9, 10, 11, 12]
    with pytest.raises(ValueError, match="grad_norm"):
        t.update(0.0, step=1)


def test_schedule_every_and_at():
    assert feed(morphc.Schedule(every=4), [0.0] * 13) == [4, 8, 12]
    assert feed(morphc.Schedule(every=4, start=2), [0.0] * 13) == [6, 10]
    assert feed(morphc.Schedule(at=[3, 7]), [0.0] * 20) == [3, 7]


def test_schedule_due_inside_a_cycle_fires_once_afterwards():
    t = morphc.Schedule(every=5)
    assert t.update(0.0, step=5)
    # steps 6..17 were a bypass cycle; 10 and 15 fell inside it: fire once at 18, then at 20
    assert t.update(0.0, step=18)
    assert not t.update(0.0, step=19)
    assert t.update(0.0, step=20)
    state = t.state_dict()
    u = morphc.Schedule(every=5)
    u.load_state_dict(state)
    assert u.update(0.0, step=25) and not u.update(0.0, step=26)


def test_custom_trigger_and_combinators():
    class LossBelow(morphc.Trigger):
        def __init__(self, level):
            self.level = level

        def update(self, loss, *, step, grad_norm=None):
            return loss < self.level

    assert feed(LossBelow(0.5), [1.0, 0.4, 0.6, 0.2]) == [2, 4]
    either = LossBelow(0.5) | morphc.Schedule(every=3)
    assert isinstance(either, AnyOf)
    assert feed(either, [1.0, 0.4, 0.6, 0.9, 0.9, 0.9]) == [2, 3, 6]
    both = LossBelow(0.5) & morphc.GradientNorm(threshold=1.0, patience=1, smoothing=0.0)
    assert isinstance(both, AllOf) and both.needs_grad_norm
    assert feed(both, [0.4, 0.4, 0.9], [5.0, 0.1, 0.1]) == [2]
    with pytest.raises(NotImplementedError, match="update"):
        morphc.Trigger().update(1.0, step=1)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="window"):
        morphc.Plateau(window=0)
    with pytest.raises(ValueError, match="confidence"):
        morphc.Plateau(confidence=-1.0)
    with pytest.raises(ValueError, match="every"):
        morphc.Schedule()
