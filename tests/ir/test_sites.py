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


# -- issue 10: every linear operator is a site or an explained exclusion -------------------------

def linear_operator_weights(model: nn.Module) -> set[str]:
    """Every parameter that acts as the weight of a linear operator, found from module types (not
    from morphc's graph): what the site table must speak for. A module whose forward uses its
    own parameters functionally (einsum, bmm) lists them in ``LINEAR_WEIGHTS``."""
    names = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        names |= {prefix + n for n in getattr(type(module), "LINEAR_WEIGHTS", ())}
        owned = dict(module.named_parameters(recurse=False))
        parametrized = getattr(module, "parametrizations", None)
        if isinstance(module, nn.RNNBase):
            names |= {prefix + n for n in owned if n.startswith("weight")}
        elif isinstance(module, nn.MultiheadAttention):
            names |= {prefix + n for n in owned if n.endswith("proj_weight")}
        elif isinstance(module, nn.Linear | nn.Bilinear | nn.modules.conv._ConvNd) or \
                type(module).__name__ == "Conv1D":
            if parametrized is not None and "weight" in parametrized:
                names |= {f"{prefix}parametrizations.weight.{n}" for n, _ in
                          parametrized["weight"].named_parameters() if n.startswith("original")}
            else:
                names.add(prefix + "weight")
    return names


class _HFConv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2): ``addmm(b, x, W)`` with W stored (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, dropout=0.0)

    def forward(self, x, memory):
        return self.layer(x, memory)


class _Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.bil = nn.Bilinear(8, 8, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.sn(x)
        o, _ = self.lstm(h.unsqueeze(1))
        g, _ = self.gru(o)
        return self.fc(self.bil(g[:, 0], h))


def _wn(module, dim=0):
    return nn.utils.parametrizations.weight_norm(module, dim=dim)


NEW_KINDS = {
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                            output_padding=1, groups=2),
                                 lambda: (torch.randn(2, 4, 5, 5),), "conv_transpose"),
    "conv_transpose1d_dilated": (lambda: nn.ConvTranspose1d(3, 5, 4, stride=3, dilation=2),
                                 lambda: (torch.randn(2, 3, 7),), "conv_transpose"),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2),
                         lambda: (torch.randn(1, 2, 3, 3, 3),), "conv_transpose"),
    "weight_norm_linear": (lambda: _wn(nn.Linear(6, 5)), lambda: (torch.randn(4, 6),), "linear"),
    "weight_norm_conv_dim2": (lambda: _wn(nn.Conv1d(4, 4, 5, padding=2, groups=2), dim=2),
                              lambda: (torch.randn(2, 4, 9),), "conv"),
    "hf_conv1d_addmm": (lambda: _HFConv1D(6, 5), lambda: (torch.randn(2, 3, 6),),
                        "matmul_right"),
    "mha_cross_attention_slices": (_CrossAttention,
                                   lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16)),
                                   "linear"),
}


@pytest.mark.parametrize("frontend", ["auto", "export"])
@pytest.mark.parametrize("name", list(NEW_KINDS))
def test_new_site_kinds_extend_and_contract_exactly(name, frontend):
    make, inputs, kind = NEW_KINDS[name]
    torch.manual_seed(0)
    model, args = make().double().eval(), tuple(t.double() for t in inputs())
    ext = morphc.extend(model, args, sites="all", width=4, frontend=frontend)
    assert kind in {s.kind for s in ext.sites}
    with torch.no_grad():
        reference = model(*args)
        # E1 (export's graph may differ from eager by rounding, e.g. MHA's fused eval path)
        assert torch.allclose(ext(*args), reference, rtol=1e-12, atol=1e-12)
        for branch in ext.branches.values():
            branch.B.normal_()
        ext.set_homotopy(0.0)
        expected = ext(*args)
    assert not torch.allclose(expected, reference)       # the branches do something
    morphc.contract(ext)
    with torch.no_grad():
        assert torch.allclose(model(*args), expected, rtol=1e-10, atol=1e-12)   # C1


def test_cross_attention_packed_weight_folds_per_slice():
    table = sites_of(_CrossAttention().eval(), (torch.randn(2, 5, 16), torch.randn(2, 7, 16)))
    rows = {s.rows for s in table.values() if s.weight_name.endswith("multihead_attn"
                                                                       ".in_proj_weight")}
    assert rows == {(0, 16), (16, 48)}


def test_fused_and_computed_weights_are_listed_with_reasons():
    model, x = _Fused().eval(), torch.randn(3, 8)
    table = sites_of(model, (x,))
    assert "fused RNN" in table.exclusions["lstm.weight_ih_l0"]
    assert "fused RNN" in table.exclusions["gru.weight_hh_l0"]
    assert "bilinear" in table.exclusions["bil.weight"]
    assert "spectral_norm" in table.exclusions["sn.parametrizations.weight.original"]
    assert [s.name for s in table.extendable()] == ["fc"]
    assert linear_operator_weights(model) <= table.covered()


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resnet_small", "transformer", "conv1d",
                                  "conv3d"])
def test_sites_and_exclusions_cover_every_linear_weight_of_the_zoo(name):
    model, inputs = zoo.ZOO[name]()
    table = sites_of(model, inputs)
    missing = linear_operator_weights(model) - table.covered()
    assert not missing, missing


@pytest.mark.parametrize("name", list(NEW_KINDS))
def test_sites_and_exclusions_cover_every_linear_weight_of_new_kinds(name):
    make, inputs, _ = NEW_KINDS[name]
    model = make().eval()
    missing = linear_operator_weights(model) - sites_of(model, inputs()).covered()
    assert not missing, missing


def test_no_site_error_lists_what_was_found_and_why():
    class OnlyRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(morphc.SiteError, match="rnn.weight_ih_l0: excluded: fused RNN op"):
        morphc.extend(OnlyRNN(), (torch.randn(2, 3, 4),), sites="all")
