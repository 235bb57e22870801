"""``morphc demo`` runs, writes its outputs, and Bypass beats plain Adam on the saddle."""

import json

import torch

from morphc.tools import demo


def test_quick_demo_bypass_escapes_the_symmetric_saddle(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads, "the demo restores the thread count"
    captured = capsys.readouterr()
    printed = captured.out
    assert "geometric-mean ratio" in printed
    for term, meaning in demo.GLOSSARY:   # every term of the report is explained, once
        assert printed.count(meaning) == 1 and term in printed.split("what the terms mean:")[0]
    assert "seed 1 bypass" in captured.err and f"{4 * demo.QUICK_STEPS}/{4 * demo.QUICK_STEPS}" \
        in captured.err, "a progress bar on stderr, ending at the total number of steps"
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "results.json").read_text())
    runs = summary["results"]
    assert len(runs) == 4 and summary["steps"] == demo.QUICK_STEPS
    for seed in (0, 1):
        plain, bypass = (next(r for r in runs if r["seed"] == seed and r["method"] == m)
                         for m in ("plain", "bypass"))
        assert plain["symmetric"], "plain Adam never leaves the symmetric saddle"
        assert not bypass["symmetric"], "Bypass broke the symmetry"
        assert bypass["cycles"] >= 1
        assert bypass["final_loss"] < 0.5 * plain["final_loss"]
    assert summary["ratio_geometric_mean"] < 0.3


def test_demo_table_and_geometric_mean():
    results = [{"seed": 0, "method": "plain", "final_loss": 0.2, "cycles": 0, "symmetric": True},
               {"seed": 0, "method": "bypass", "final_loss": 0.02, "cycles": 1,
                "symmetric": False}]
    text = demo.table(results)
    assert "0.1" in text.splitlines()[1] and "geometric-mean ratio" in text
    assert abs(demo.geometric_mean([0.1, 10.0]) - 1.0) < 1e-12


def test_only_a_branch_after_the_identical_units_breaks_the_symmetry():
    """The reasoning behind the default sites: the first layer's branch keeps the units equal."""
    import torch.nn.functional as F

    import morphc
    from morphc.bench.problems import PROBLEMS
    from morphc.zoo import hidden_units_identical

    problem = PROBLEMS["teacher_student"]
    data = problem.make_data(0)
    outcome = {}
    for sites in ("0", "2"):
        model = problem.make_model(0)
        bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
                           trigger=morphc.Schedule(at=[100]), bypass_steps=50,
                           return_steps=50, sites=sites, verbose=False)
        for _ in range(250):
            bp.step(lambda m: F.mse_loss(m(data.x_train), data.y_train))
        assert bp.cycle == 1
        outcome[sites] = hidden_units_identical(bp.finish())
    assert outcome == {"0": True, "2": False}
