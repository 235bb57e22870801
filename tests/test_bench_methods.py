"""The morphc methods of the benchmark suite, and the `morphc bench` entry point."""

import json

import pytest
import torch

import morphc.bench.methods  # noqa: F401  (registers the morphc methods)
from morphc.bench import cli
from morphc.bench.baselines import METHODS
from morphc.bench.problems import PROBLEMS, hidden_units_identical
from morphc.bench.step_cost import flop_ratio


def _run(method, steps=1000, seed=0):
    return METHODS[method].run(PROBLEMS["teacher_student"], seed, steps, None)


@pytest.fixture(scope="module")
def teacher_student_runs():
    torch.set_num_threads(1)
    return {m: _run(m) for m in ("adam", "bypass", "growth", "linear_bypass")}


def test_bypass_keeps_the_architecture_and_escapes(teacher_student_runs):
    plain, bypass = teacher_student_runs["adam"], teacher_student_runs["bypass"]
    assert bypass.params == plain.params
    assert bypass.final_loss < 0.5 * plain.final_loss


def test_growth_keeps_the_extension_so_has_more_parameters(teacher_student_runs):
    growth, plain = teacher_student_runs["growth"], teacher_student_runs["adam"]
    assert growth.extra["extended_at"] is not None and growth.extra["contracted_at"] is None
    assert growth.params > plain.params


def test_linear_bypass_contracts_back_to_the_same_architecture(teacher_student_runs):
    linear = teacher_student_runs["linear_bypass"]
    assert linear.extra["contracted_at"] > linear.extra["extended_at"]
    assert linear.params == teacher_student_runs["adam"].params
    assert all(torch.isfinite(torch.tensor(linear.losses)))


def test_plain_adam_student_stays_symmetric():
    problem = PROBLEMS["teacher_student"]
    stepper_model = problem.make_model(0)
    opt = torch.optim.Adam(stepper_model.parameters(), lr=problem.lr)
    data = problem.make_data(0)
    for _ in range(200):
        opt.zero_grad()
        problem.loss_fn(stepper_model(data.x_train), data.y_train).backward()
        opt.step()
    assert hidden_units_identical(stepper_model)


def test_flop_ratio_matches_the_arithmetic_bound_for_a_square_linear():
    import morphc

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    ext = morphc.extend(model, (torch.randn(4, 64),), sites="all", width=8)
    # a width-k branch on an n→n linear adds 2kn multiply-adds to n²: 1 + 2·8/64
    assert flop_ratio(ext) == pytest.approx(1.25)


def test_bench_cli_writes_markdown_json_and_plots(tmp_path, capsys):
    code = cli.main(["--quick", "--only", "training", "--problems", "teacher_student",
                     "--methods", "adam", "bypass", "--seeds", "1", "--steps", "200",
                     "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data  # every number of the run
    assert (tmp_path / "results.md").read_text().count("bypass") >= 1
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())
    assert "took" in capsys.readouterr().out


def test_bench_cli_rejects_unknown_parts():
    with pytest.raises(SystemExit) as exc:
        cli.main(["--only", "nonsense"])
    assert exc.value.code == 2
