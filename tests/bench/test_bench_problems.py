"""Benchmark problems, baselines, harness aggregation and report files."""

import contextlib
import json
import math

import pytest
import torch

from morphc.bench.baselines import BASELINES, METHODS, PLAIN, register
from morphc.bench.harness import SuiteResult, aggregate, run_suite, stats
from morphc.bench.problems import PROBLEMS
from morphc.bench.remedies import RemedyStepper
from morphc.bench.report import load_suite, write_report
from morphc.bench.training import Method, OptimizerStepper, RunResult, stepper_method
from morphc.zoo import hidden_units_identical

# --- the symmetric saddle --------------------------------------------------------------------


def _train_full_batch(model, data, optimizer, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data.x_train), data.y_train)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


OPTIMIZERS = {
    "adam": lambda p, prob: torch.optim.Adam(p, lr=prob.lr),
    "sgd_momentum": lambda p, prob: torch.optim.SGD(p, lr=prob.sgd_lr, momentum=0.9),
}


@contextlib.contextmanager
def _threads(n):
    """Tiny models: one thread is fastest and immune to a busy machine (as in run_suite)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _saddle_run(optimizer, steps, nudge=0.0):
    problem = PROBLEMS["teacher_student"]
    data, model = problem.make_data(0), problem.make_model(0)
    assert hidden_units_identical(model)
    if nudge:
        with torch.no_grad():
            model[0].weight.add_(nudge * torch.randn(model[0].weight.shape,
                                                     generator=torch.Generator().manual_seed(1)))
    opt = OPTIMIZERS[optimizer](model.parameters(), problem)
    return model, _train_full_batch(model, data, opt, steps)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_teacher_student_is_stuck_on_an_exact_saddle(optimizer):
    with _threads(1):
        model, losses = _saddle_run(optimizer, 1000)
    # bit-identical units: the student is a one-unit network, whatever the optimizer does
    assert hidden_units_identical(model), "hidden units drifted apart: the saddle leaks"
    # and it has plateaued well above 0 and well above the target
    target = PROBLEMS["teacher_student"].target_loss
    assert losses[-1] > 0.05 * losses[0] and losses[-1] > 5 * target
    assert abs(losses[-300] - losses[-1]) < 0.01 * losses[-1]


def test_saddle_stays_exact_with_two_threads():
    """Rounding differences between units show up within tens of steps if the kernels split."""
    with _threads(2):
        model, _ = _saddle_run("adam", 150)
    assert hidden_units_identical(model)


def test_breaking_the_symmetry_by_hand_lets_adam_escape():
    """A 1e-3 nudge of the first weight is all it takes: the problem is a saddle, not hard."""
    with _threads(1):
        _, stuck = _saddle_run("adam", 1000)
        nudged_model, nudged = _saddle_run("adam", 1000, nudge=1e-3)
    assert not hidden_units_identical(nudged_model)
    assert nudged[-1] < stuck[-1] / 50
    assert nudged[-1] < PROBLEMS["teacher_student"].target_loss


# --- every problem builds --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problem_builds_with_right_shapes(name):
    problem = PROBLEMS[name]
    data = problem.make_data(0)
    assert all(t.dtype == torch.float32 for t in (data.x_train, data.x_test))
    assert len(data.x_train) == len(data.y_train) and len(data.x_test) == len(data.y_test)
    assert len(data.x_train) >= len(data.x_test) > 0
    model = problem.make_model(0)
    initial = [v.clone() for v in model.state_dict().values()]
    out = model(data.x_train[:5])
    if name.startswith("xor"):   # MSE on sigmoid outputs, accuracy as the test metric
        assert out.shape == data.y_train[:5].shape
    elif problem.higher_is_better:   # classification: int64 labels, one logit per class
        assert data.y_train.dtype == torch.int64
        assert out.shape == (5, int(data.y_train.max()) + 1)
    else:
        assert data.y_train.dtype == torch.float32
        assert out.shape == data.y_train[:5].shape
    assert math.isfinite(problem.loss_fn(out, data.y_train[:5]).item())
    if name.startswith("digits_cnn"):
        assert data.x_train.shape[1:] == (1, 8, 8)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # the same seed gives the same data and the same model
    again = problem.make_data(0)
    assert all(torch.equal(a, b) for a, b in zip(data, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(initial,
                                                  problem.make_model(0).state_dict().values(),
                                                  strict=True))


def test_quick_run_of_every_baseline_on_every_problem_is_finite():
    threads = torch.get_num_threads()
    suite = run_suite(None, [m.name for m in BASELINES], seeds=[0], steps=25, progress=False)
    assert len(suite.runs) == len(PROBLEMS) * len(BASELINES)
    for run in suite.runs:
        assert len(run.losses) == 25
        assert all(math.isfinite(v) for v in run.losses), (run.problem, run.method)
        assert math.isfinite(run.final_loss) and math.isfinite(run.metric_value)
        assert run.params > 0 and run.seconds > 0
    assert torch.get_num_threads() == threads   # run_suite ran single-threaded, then restored


def test_runs_are_deterministic_per_seed():
    problem = PROBLEMS["digits_mlp"]
    with _threads(1):
        first = METHODS["perturb"].run(problem, 3, 30, None)
        second = METHODS["perturb"].run(problem, 3, 30, None)
    assert first.losses == second.losses and first.final_loss == second.final_loss


def test_remedies_use_morphcs_plateau_trigger_and_roll_back_what_does_not_pay():
    """Issue 12/13: every triggered method uses morphc.Plateau and Bypass's acceptance rule."""
    import morphc
    from morphc.bench.cycles import full_train_loss

    problem = PROBLEMS["stationary"]   # noise cannot leave this minimum: every cycle rolls back
    data, model = problem.make_data(0), problem.make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = RemedyStepper(problem, model, 0, 300, remedy="noise",
                            eval_closure=full_train_loss(problem, data))
    assert type(stepper.trigger) is morphc.Plateau
    for _ in range(300):
        stepper.step(lambda m: problem.loss_fn(m(data.x_train), data.y_train))
    events = stepper.events
    assert events["extended_at"] and events["rollbacks"] == len(events["extended_at"])
    assert all(torch.equal(before[k], v) for k, v in stepper.finish().state_dict().items())


def test_the_stationary_problem_has_an_exactly_zero_gradient():
    problem = PROBLEMS["stationary"]
    data, model = problem.make_data(0), problem.make_model(0)
    problem.loss_fn(model(data.x_train), data.y_train).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_the_stationary_problem_gives_a_linear_branch_no_gradient_and_tanh_one():
    """The construction of RESEARCH_13 §5: ∂L/∂B = 0 for ρ affine (s = 0), ≠ 0 for tanh (s = 1)."""
    import morphc

    problem = PROBLEMS["stationary"]
    data, model = problem.make_data(0), problem.make_model(0)
    ext = morphc.extend(model, (data.x_train,), sites="all", width=8, seed=0)
    norms = {}
    for s in (0.0, 1.0):
        ext.set_homotopy(s)
        ext.zero_grad()
        problem.loss_fn(ext(data.x_train), data.y_train).backward()
        norms[s] = sum(float(p.grad.norm()) for p in ext.extension_parameters()
                       if p.grad is not None)
    assert norms[0.0] < 1e-6 < 1e-2 < norms[1.0]


def test_xor_has_its_success_threshold_and_fifty_seeds():
    problem = PROBLEMS["xor"]
    assert problem.seeds >= 50 and problem.success_loss == 0.01
    assert problem.make_optimizer(problem.make_model(0).parameters()).__class__ is torch.optim.SGD


def test_the_narrow_teacher_students_reference_is_cached_per_seed():
    problem = PROBLEMS["teacher_student_narrow"]
    assert 0 < problem.reference(0) < 0.5    # shipped in reference_losses.json: no training here


def test_a_method_is_one_line_to_register_and_runs_through_the_harness():
    seen = []

    class Frozen(OptimizerStepper):   # a stepper that never moves: loss stays put
        def step(self, closure):
            seen.append(1)
            return super().step(closure)

    name = "frozen_test_method"
    register(stepper_method(name, lambda problem, model, seed, steps: Frozen(
        model, torch.optim.SGD(model.parameters(), lr=0.0)), "lr 0"))
    try:
        suite = run_suite(["diabetes"], [PLAIN, name], seeds=[0], steps=20, progress=False)
    finally:
        METHODS.pop(name)
    assert len(seen) == 20
    frozen = suite.aggregate()["diabetes"][name]
    assert frozen["final_loss"]["median"] > suite.aggregate()["diabetes"][PLAIN]["final_loss"][
        "median"]
    assert "final_loss" in frozen["worse_than_plain"]


def test_a_method_that_skips_steps_is_rejected():
    def short(problem, seed, steps, on_step):
        return RunResult(problem.name, "short", seed, [1.0], 1.0, 0.1, 1)

    with pytest.raises(RuntimeError, match="one per step"):
        run_suite(["diabetes"], [Method("short", short)], seeds=[0], steps=5, progress=False)


# --- aggregation on hand-made numbers --------------------------------------------------------


def _run(method, seed, final, metric, steps_to_target, seconds=1.0):
    losses = [2.0, 1.5, final]
    return RunResult("p", method, seed, losses, final, seconds, 10,
                     steps_to_target=steps_to_target,
                     seconds_to_target=None if steps_to_target is None else steps_to_target / 10,
                     metric_name="test_mse", metric_value=metric)


def _tiny_suite():
    runs = [
        _run(PLAIN, 0, 1.0, 0.5, 10), _run(PLAIN, 1, 2.0, 0.6, 20), _run(PLAIN, 2, 3.0, 0.7, None),
        _run("x", 0, 0.5, 0.9, 5, 2.0), _run("x", 1, 1.0, 1.0, None, 2.0),
        _run("x", 2, math.nan, 1.1, None, 2.0),
        _run("y", 0, 0.1, 0.1, 2), _run("y", 1, 0.2, 0.2, 4), _run("y", 2, 0.3, 0.3, 6),
    ]
    problems = {"p": {"name": "p", "description": "hand-made", "target_loss": 0.5,
                      "batch_size": None, "higher_is_better": False}}
    return SuiteResult(runs, problems, {PLAIN: "plain", "x": "worse", "y": "better"},
                       {"seeds": [0, 1, 2], "steps": {"p": 3}, "quick": True, "threads": 1,
                        "torch": torch.__version__, "total_seconds": 1.0})


def test_stats_treat_diverged_runs_as_worst():
    assert stats([1.0, 2.0, 3.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "q25": 1.5,
                                      "q75": 2.5, "n": 3}
    assert stats([0.5, 1.0, math.nan])["median"] == 1.0
    assert stats([0.5, 1.0, math.nan])["max"] == math.inf


def test_aggregation_math_on_a_hand_made_result():
    agg = aggregate(_tiny_suite())["p"]
    plain, x, y = agg[PLAIN], agg["x"], agg["y"]
    assert plain["final_loss"]["median"] == 2.0 and plain["metric"]["median"] == 0.6
    assert plain["steps_to_target"] == 20 and plain["reached_target"] == 2
    assert plain["vs_plain"]["final_loss"] == 1.0 and plain["worse_than_plain"] == []
    # x: better median loss (1.0, its NaN run counted as worst), worse metric and never there
    assert x["final_loss"]["median"] == 1.0 and x["final_loss"]["max"] == math.inf
    assert x["vs_plain"]["final_loss"] == pytest.approx(0.5)
    assert x["vs_plain"]["metric"] == pytest.approx(1.0 / 0.6)
    assert x["steps_to_target"] is None and x["vs_plain"]["steps_to_target"] is None
    assert x["vs_plain"]["seconds"] == pytest.approx(2.0)
    assert x["worse_than_plain"] == ["metric", "steps_to_target", "seconds_to_target"]
    # y: better everywhere
    assert y["vs_plain"]["final_loss"] == pytest.approx(0.1)
    assert y["vs_plain"]["steps_to_target"] == pytest.approx(4 / 20)
    assert y["worse_than_plain"] == []


def test_higher_is_better_metric_flips_the_comparison():
    suite = _tiny_suite()
    suite.problems["p"]["higher_is_better"] = True
    agg = aggregate(suite)["p"]
    assert "metric" not in agg["x"]["worse_than_plain"]
    assert "metric" in agg["y"]["worse_than_plain"]


def test_report_writes_markdown_json_and_plots(tmp_path):
    suite = _tiny_suite()
    paths = write_report(suite, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| x |" in md and "✗ WORSE" in md
    assert "**p / x**: worse on metric, steps_to_target, seconds_to_target" in md
    assert "worse than plain on metric" in md and "not worse than plain" in md
    data = json.loads(paths["json"].read_text())        # strict JSON: NaN written as null
    assert data["aggregates"]["p"]["x"]["vs_plain"]["final_loss"] == pytest.approx(0.5)
    assert len(data["runs"]) == 9 and data["runs"][5]["final_loss"] is None
    assert [p.name for p in paths["plots"]] == ["loss_p.png"]
    png = paths["plots"][0].read_bytes()
    assert len(png) > 0 and png[:8] == b"\x89PNG\r\n\x1a\n"
    again = load_suite(paths["json"])
    assert math.isnan(again.runs[5].final_loss)
    assert aggregate(again)["p"]["y"]["vs_plain"] == aggregate(suite)["p"]["y"]["vs_plain"]
