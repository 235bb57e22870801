"""Site discovery, selection and the escape signal."""

import pytest
import torch
import torch.nn.functional as F
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline
from torch import nn

import morphc
from morphc import zoo


def sites_of(model, inputs):
    return Pipeline(morphc.trace(model, inputs).graph_module).run(find_sites).analysis


def test_every_supported_operator_is_found():
    cases = {
        "mlp": {"0": "linear", "2": "linear", "4": "linear"},
        "functional": {"w": "linear", "left": "matmul_left"},
        "conv1d": {"0": "conv", "2": "conv"},
        "conv3d": {"0": "conv", "2": "conv"},
    }
    for name, expected in cases.items():
        table = sites_of(*zoo.ZOO[name]())
        assert {n: s.kind for n, s in table.items()} == expected, name


def test_matmul_right_site_and_its_fold():
    class Right(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return torch.sin(x @ self.p)

    model, x = Right(), torch.randn(4, 5)
    ext = morphc.extend(model, (x,), sites="all", width=2, activation="tanh")
    assert ext.sites[0].kind == "matmul_right"
    with torch.no_grad():
        ext.branches["p"].B.normal_()
    ext.set_homotopy(0.0)
    with torch.no_grad():
        expected = ext(x)
    morphc.contract(ext)
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_weight_used_outside_a_site_is_excluded_with_reason():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.emb = nn.Embedding(10, 4)
            self.emb.weight = nn.Parameter(torch.randn(10, 4))
            self.out = nn.Linear(4, 10)
            self.out.weight = self.emb.weight   # tied embedding / output projection

        def forward(self, ids):
            return self.out(F.relu(self.fc(self.emb(ids))))

    model, ids = Shared(), torch.randint(0, 10, (3, 6))
    table = sites_of(model, (ids,))
    assert table["out"].excluded and "outside linear sites" in table["out"].excluded
    assert table["fc"].excluded is None
    with pytest.raises(morphc.SiteError, match="cannot be extended"):
        morphc.extend(model, (ids,), sites=["out"])
    ext = morphc.extend(model, (ids,), sites="all")
    assert [s.name for s in ext.sites] == ["fc"]


def test_selection_by_name_suffix_regex_predicate_and_exclude():
    model, inputs = zoo.resnet_small()
    pick = lambda **kw: [s.name for s in morphc.extend(model, inputs, **kw).sites]  # noqa: E731
    assert pick(sites=["fc"]) == ["fc"]
    assert pick(sites="conv2") == ["layers.0.conv2", "layers.1.conv2"]      # .suffix match
    assert pick(sites=r"layers\.1\.conv\d") == ["layers.1.conv1", "layers.1.conv2",
                                                "layers.1.conv3"]
    assert pick(sites=lambda s: s.kind == "linear") == ["fc"]
    assert "fc" not in pick(sites="all", exclude=["fc"])
    with pytest.raises(morphc.SiteError, match="sites in this model: stem.0"):
        morphc.extend(model, inputs, sites=["nope"])


def test_overrides_set_width_and_family_per_site():
    model, inputs = zoo.mlp()
    ext = morphc.extend(model, inputs, sites="all", width=4,
                        overrides={"2": {"width": 3, "activation": "prelu"}})
    assert ext.config.widths == {"0": 4, "2": 3, "4": 4}
    assert ext.config.families["2"] == "prelu"


def _stationary_regression(dtype=torch.float64):
    """A linear model fitted by least squares to a non-linear target: ∂L/∂W = ∂L/∂b = 0."""
    torch.manual_seed(1)
    x = torch.randn(64, 3, dtype=dtype)
    y = torch.tanh(2 * x[:, :1]) * x[:, 1:2] + x[:, 2:3] ** 2
    design = torch.cat([x, torch.ones(64, 1, dtype=dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    model = nn.Linear(3, 1).to(dtype)
    with torch.no_grad():
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    return model, x, y


def test_escape_signal_nonzero_only_for_nonlinear_rho():
    model, x, y = _stationary_regression()
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-12, "not a stationary point"
    probe = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    for family in ("tanh", "poly", "prelu", "swish"):
        ext = morphc.extend(model, (x,), sites="all", width=4, activation=family)
        (site,) = ext.config.sites
        nonlinear = morphc.compiler.escape.escape_scores(ext, probe)[site]
        ext.set_homotopy(0.0)   # ρ affine: the branch can only do what W can
        affine = morphc.compiler.escape.escape_scores(ext, probe)[site]
        assert nonlinear > 1e-3, family
        assert affine < 1e-10, family


def test_auto_selection_ranks_by_escape_score():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    probe = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    ext = morphc.extend(model, (x,), sites="auto", probe=probe, top_k=1)
    scores = ext.config.escape_scores
    assert set(scores) == {"0", "2", "4"}
    assert [s.name for s in ext.sites] == [max(scores, key=scores.get)]
    fallback = morphc.extend(model, (x,), sites="auto")   # random-direction fallback
    assert len(fallback.sites) == 2 and fallback.config.selection == "auto"
