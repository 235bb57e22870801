"""The unseen-problem comparison: Bypass with defaults against plain training, same seeds."""

import pytest
import torch

from morphc.bench import unseen


def test_a_loss_spike_does_not_leave_bypass_behind_plain_training():
    # seed 3 spikes 10× at step ~700 under momentum SGD; a cycle started on the spike was kept
    # against the spiked loss and ended 30× worse than plain training (0.0133 vs 0.0004)
    rng = torch.get_rng_state()
    result = unseen.compare("sine_deep", [3])
    (plain, bypass), = result["pairs"]
    assert bypass <= 1.02 * plain and result["worse"] == 0, result
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG is the user's"


def test_every_problem_builds_and_trains_one_step_each_way():
    for name, make in unseen.PROBLEMS.items():
        case = make(0)
        assert case.steps > 0 and case.train[0].shape[0] == case.train[1].shape[0], name
        out = case.model(case.train[0][:2])
        assert torch.isfinite(case.loss_fn(out, case.train[1][:2])), name


def test_unknown_problem_names_are_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        unseen.main(["no_such_problem", "--seeds", "1"])
    assert "sine_deep" in capsys.readouterr().err


def test_worse_and_better_are_relative_to_the_size_of_the_loss_even_below_zero():
    assert unseen.verdicts([1.0, 1.0, 1.0], [1.03, 0.97, 1.01]) == (1, 1)
    # a negative log-likelihood: -1.80 is worse than -1.85, -1.90 better, -1.84 within 2 %
    assert unseen.verdicts([-1.85, -1.85, -1.85], [-1.80, -1.90, -1.84]) == (1, 1)
