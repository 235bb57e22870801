"""The cost suite's floor candidate: the extended graph with every branch reduced to ``B (A x)``."""

import torch
from torch import nn

import morphc
from morphc.bench.step_cost import BranchFloor, floor_module
from morphc.bench.step_cost_format import format_step_costs


def test_floor_module_reduces_every_branch_and_leaves_the_extension_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    ext = morphc.extend(model, (x,), sites="all", width=2, seed=0)
    floor = floor_module(ext)
    branches = [m for m in floor.modules() if isinstance(m, BranchFloor)]
    assert len(branches) == len(ext.branches) == 2
    assert not any(isinstance(m, BranchFloor) for m in ext.graph_module.modules())
    assert torch.equal(floor(x), model(x))            # B = 0: the floor changes nothing either
    for b in branches:
        with torch.no_grad():
            b.branch.B.normal_()
    (a0, b0), (a1, b1) = ((b.branch.A, b.branch.B) for b in branches)
    h = torch.relu(model[0](x) + x @ a0.t() @ b0.t())          # B (A x): no ρ, no bias, no α
    torch.testing.assert_close(floor(x), model[2](h) + h @ a1.t() @ b1.t())
    torch.testing.assert_close(ext.graph_module(x), model(x))   # the extension's B untouched


def test_floor_ratio_is_reported_beside_the_extended_ratio():
    row = {"model": "mlp512", "width": "8", "mode": "eager", "step_ms": 13.0,
           "original_ms": 10.0, "fastest_original": "eager/user", "original_user_ms": 10.0,
           "step_ratio": 1.3, "flop_bound": 1.04, "excess_over_bound": 0.25,
           "within_target": False, "compiled_not_slower_than_eager": None,
           "eager_target_met": False, "floor_ratio": 1.2}
    assert "mlp512 8 1.20× (extended 1.30×)" in format_step_costs([row])


def test_a_compiled_floor_is_labelled_compiled():
    row = {"model": "cnn_bn", "width": "1/8", "mode": "compile", "step_ms": 17.0,
           "original_ms": 10.0, "fastest_original": "compile/user", "original_user_ms": 10.0,
           "step_ratio": 1.7, "flop_bound": 1.17, "excess_over_bound": 0.45,
           "within_target": False, "compiled_not_slower_than_eager": True, "eager_step_ms": 25.0,
           "eager_target_met": None, "floor_ratio": 1.6}
    assert "cnn_bn 1/8 compiled 1.60× (extended 1.70×)" in format_step_costs([row])


def test_the_compiled_cnn_and_the_eager_targets_time_their_floor():
    from morphc.bench.step_cost import EAGER_TARGET_MODELS, FLOOR_MODES

    assert FLOOR_MODES["cnn_bn"] == "compile"
    assert all(FLOOR_MODES[name] == "eager" for name in EAGER_TARGET_MODELS)
