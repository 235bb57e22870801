"""E1 (extension preserves the function) and C1 (contraction is exact) across architectures."""

import copy

import pytest
import torch
from torch import nn

import morphc
from morphc import zoo
from morphc.ir.tags import Role, role_of
from tests.helpers import max_rel, train_extension

ARCHS = sorted(zoo.ZOO)
C1_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def build(name, dtype=torch.float32, train=True):
    torch.manual_seed(0)
    model, inputs = zoo.ZOO[name]()
    model = model.to(dtype).train(train)
    return model, tuple(x.to(dtype) for x in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ARCHS)
def test_extension_preserves_function_bit_for_bit(name, dtype):
    model, inputs = build(name, dtype)
    with torch.no_grad():
        expected = model(*inputs)
    ext = morphc.extend(model, inputs, sites="all", width=4)
    with torch.no_grad():
        got = ext(*inputs)
    assert torch.equal(got, expected)
    assert len(ext.sites) >= 2
    assert all(p.dtype == dtype for p in ext.extension_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ARCHS)
def test_contraction_is_exact_after_training(name, dtype):
    model, inputs = build(name, dtype)
    keys = list(model.state_dict())
    ids = {n: id(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        original = model(*inputs)
    ext = morphc.extend(model, inputs, sites="all", width=4)
    train_extension(ext, inputs)
    ext.set_homotopy(0.0)
    assert ext.constraint_residual() == 0.0
    with torch.no_grad():
        extended = ext(*inputs)
    assert max_rel(original, extended) > 1e-3, "training should have changed the function"
    result = morphc.contract(ext)
    assert result is model and type(result) is type(model)
    assert list(model.state_dict()) == keys
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    with torch.no_grad():
        folded = model(*inputs)
    assert max_rel(extended, folded) <= C1_TOL[dtype]
    assert ext.contraction_report.deviation <= C1_TOL[dtype]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_modes(train):
    model, inputs = build("cnn_bn", train=train)
    with torch.no_grad():
        expected = model(*inputs)
    stats = copy.deepcopy(model.bn1.state_dict())
    ext = morphc.extend(model, inputs, sites="all", width=4)
    assert ext.training == train
    assert all(torch.equal(v, stats[k]) for k, v in model.bn1.state_dict().items()), \
        "extend must not touch BatchNorm statistics"
    with torch.no_grad():
        assert torch.equal(ext(*inputs), expected)
    with torch.no_grad():
        for b in ext.branches.values():
            b.B.normal_(0, 0.1)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(*inputs)
    morphc.contract(ext)
    with torch.no_grad():
        assert max_rel(extended, model(*inputs)) <= 1e-6


def test_user_model_is_not_modified_by_extend():
    model, inputs = build("resnet_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    ext = morphc.extend(model, inputs, sites="all", width=2)
    assert [n for n, _ in model.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    user = {id(p) for p in model.parameters()}
    graph = {id(p) for p in ext.graph_module.parameters()}
    assert user <= graph, "the extended graph must share the user's Parameter objects"
    assert {id(p) for p in ext.extension_parameters()}.isdisjoint(user)


def test_same_seed_same_extension_and_other_seed_differs():
    model, inputs = build("mlp")
    a = morphc.extend(model, inputs, sites="all", seed=3)
    b = morphc.extend(model, inputs, sites="all", seed=3)
    c = morphc.extend(model, inputs, sites="all", seed=4)
    pa, pb, pc = (list(e.extension_parameters()) for e in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc, strict=True))


def test_width_int_fraction_and_group_rounding():
    model, inputs = build("grouped")
    ext = morphc.extend(model, inputs, sites="all", width=0.25)
    # site 0: out 12, groups 4 → 3 units → rounded up to 4; site 2: out 6, groups 3 → 2 → 3
    assert ext.config.widths == {"0": 4, "2": 3}
    ext = morphc.extend(model, inputs, sites="all", width=5)
    assert ext.config.widths == {"0": 8, "2": 6}
    with pytest.raises(morphc.SiteError, match="width"):
        morphc.extend(model, inputs, sites="all", width=1.5)


def test_transformer_uses_export_and_exposes_in_proj_weight():
    model, inputs = build("transformer")
    ext = morphc.extend(model, inputs, sites="all", width=2)
    assert ext.traced.frontend == "export"
    assert "symbolic_trace failed" in ext.traced.reason
    weights = {s.weight_name for s in ext.sites}
    assert "layers.0.self_attn.in_proj_weight" in weights
    other_batch = torch.randn(7, *inputs[0].shape[1:])
    with torch.no_grad():
        assert torch.equal(ext(other_batch), model(other_batch)), "batch must stay dynamic"


def test_untraceable_model_raises_trace_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(morphc.TraceError, match="torch.export"):
        morphc.extend(DataDependent(), (torch.randn(2, 3),))


def test_tied_weight_is_one_site_with_one_branch():
    model, inputs = build("tied")
    ext = morphc.extend(model, inputs, sites="all", width=3)
    enc = ext.site_table["enc"]
    assert enc.tied and len(enc.uses) == 2
    extension_nodes = [n for n in ext.graph_module.graph.nodes
                       if role_of(n) == Role.EXTENSION]
    assert len(extension_nodes) == 3   # two uses of enc share a branch, plus proj
    assert sum(1 for _ in ext.graph_module.morphc_ext.children()) == 2


def test_contraction_refuses_off_constraint_set_and_force_reports():
    model, inputs = build("mlp")
    ext = morphc.extend(model, inputs, sites="all")
    train_extension(ext, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.ContractionError, match="set_homotopy"):
        morphc.contract(ext)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    morphc.contract(ext, force=True)
    assert ext.contraction_report.snap_change > 0
    with pytest.raises(morphc.ContractionError, match="contracted"):
        ext(*inputs)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_contract_right_after_extend_is_the_identity(name):
    """Fresh branches (B = 0) add nothing at any homotopy: they reach C unasked, and the fold
    leaves every weight bit for bit; a branch that moved off C is still refused."""
    model, inputs = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert morphc.contract(morphc.extend(model, inputs, sites="all")) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ext = morphc.extend(model, inputs, sites="all")
    with torch.no_grad():
        next(iter(ext.branches.values())).B.add_(0.1)
    with pytest.raises(morphc.ContractionError, match="set_homotopy"):
        morphc.contract(ext)


def test_failed_contraction_leaves_weights_untouched():
    model, inputs = build("mlp")
    ext = morphc.extend(model, inputs, sites="all")
    ext.set_homotopy(0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(iter(ext.branches.values())).B.fill_(float("nan"))
    with pytest.raises(morphc.ContractionError, match="non-finite"):
        morphc.contract(ext)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_low_precision_fold_is_done_in_float64_and_reported():
    model, inputs = build("mlp")
    model = model.to(torch.bfloat16)
    inputs = tuple(x.to(torch.bfloat16) for x in inputs)
    ext = morphc.extend(model, inputs, sites="all", width=4)
    with torch.no_grad():
        for branch in ext.branches.values():
            branch.B.normal_(0, 0.1)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(*inputs)
    morphc.contract(ext)
    deviation = ext.contraction_report.deviation
    # one bf16 rounding of the folded weights (8-bit mantissa) is what remains
    assert 0 < deviation < 2e-2
    with torch.no_grad():
        assert max_rel(extended, model(*inputs)) == pytest.approx(deviation)


def test_moving_the_extended_model_keeps_one_shared_homotopy():
    model, inputs = build("mlp")
    ext = morphc.extend(model, inputs, sites="all", width=2).double()
    ext.set_homotopy(0.25)
    assert all(float(b.homotopy) == 0.25 for b in ext.branches.values())
    assert all(p.dtype == torch.float64 for p in ext.extension_parameters())
