"""Probes of the public API with models an outside user brings (dtypes, layouts, structures,
parametrizations, modules morphc cannot handle, the extended model's own lifecycle): each keeps
the invariants (E1, C1 into the user's own Parameters) or fails at once, typed, leaving the
user's model as it was."""

import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import morphc
from tests.helpers import fold_trained as _fold
from tests.helpers import max_rel, train_extension


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)




class _Remembers(nn.Module):
    """Keeps its last hidden state on itself, as many research models do for logging."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)
        self.last = None

    def forward(self, x):
        self.last = torch.tanh(self.a(x))
        return self.b(self.last)


def _pruned():
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", 0.5)     # a pre-hook sets model[0].weight
    return model


@pytest.mark.parametrize("make, attribute", [(_Remembers, lambda m: m.last),
                                             (_pruned, lambda m: m[0].weight)])
def test_tracing_leaves_no_proxy_on_the_users_modules(make, attribute):
    """symbolic_trace runs the forward on proxies: an attribute the forward (or a pruning hook)
    sets stayed a torch.fx Proxy on the user's module, so ``torch.save(model)`` and any read of
    it failed until the next eager call."""
    model, x = make(), torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
        before = attribute(model).clone()
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert type(attribute(model)) is torch.Tensor and torch.equal(attribute(model), before)
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        assert torch.equal(ext(x), expected)
    extended, folded = _fold(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


@pytest.mark.parametrize("convert", ["ext.double()", "ext.to(float64)"])
def test_contract_after_converting_the_model_to_float64(convert):
    """Contraction verifies on the example inputs, which stayed float32 when the model was
    converted after extend: it raised torch's dtype RuntimeError and could not contract."""
    model, x = _mlp(), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    ext.double() if convert == "ext.double()" else ext.to(torch.float64)
    assert {p.dtype for p in [*ext.parameters(), *model.parameters()]} == {torch.float64}
    extended, folded = _fold(model, (x.double(),), ext)
    assert max_rel(folded, extended) < 1e-12


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_an_extended_model_pickles_or_says_why_not(frontend):
    """``torch.save(ext)`` failed on the branches' compiled family (sympy-made closures) and on
    the trace's WeakKeyDictionary; an exported graph cannot pickle at all (torch's own
    limitation), which is now a typed error naming what works. A deep copy works either way
    and folds into the copy of the user's model, never into the original."""
    model, x = _mlp(), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4, frontend=frontend)
    train_extension(ext, (x,))
    with torch.no_grad():
        expected = ext(x)
    buffer = io.BytesIO()
    if frontend == "export":
        with pytest.raises(morphc.FormatError, match="state_dict"):
            torch.save(ext, buffer)
        loaded = morphc.extend(_mlp(), (x,), sites="all", width=4, frontend=frontend)
        loaded.load_state_dict(ext.state_dict())
    else:
        torch.save(ext, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    twin = __import__("copy").deepcopy(ext)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for other in (loaded, twin):
        with torch.no_grad():
            assert torch.equal(other(x), expected)
        extended, folded = _fold(other.model, (x,), other)
        assert max_rel(folded, extended) < 1e-6
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("padding", "mode", "dim"), [
    ("same", "circular", 1), ("same", "reflect", 2), ("same", "replicate", 2),
    ("valid", "circular", 2)])
def test_a_conv_padded_same_in_a_mode_other_than_zeros(padding, mode, dim):
    """``nn.Conv*d(padding="same", padding_mode="circular")``: the branch passed the string
    "same" to F.pad, so extend failed with a TypeError. An even kernel with a dilation makes
    "same" pad asymmetrically, as nn.ConvNd does."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    torch.manual_seed(0)
    model = nn.Sequential(conv(4, 6, (4,) * dim, padding=padding, padding_mode=mode,
                               dilation=(2,) * dim), nn.Tanh(), conv(6, 2, 1))
    x = torch.randn(2, 4, *(11,) * dim)
    ext = morphc.extend(model, (x,), sites="all", width=3)
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    extended, folded = _fold(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


class _DictToNamedTuple(nn.Module):
    """Inputs as a dict, output as a namedtuple, Linear on (batch, seq, features)."""

    Out = __import__("collections").namedtuple("Out", "y h")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 3)

    def forward(self, inputs):
        h = torch.tanh(self.a(inputs["x"])) * inputs["mask"]
        return self.Out(self.b(h), h)


class _TiedHead(nn.Module):
    """An output projection tied to the embedding, which is not a site (it is also a lookup)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.h = nn.Embedding(10, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.h(self.emb(ids))))


def _channels_last():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 4, 3, groups=4)).to(memory_format=torch.channels_last)


def _weight_norm():
    model = _mlp()
    nn.utils.parametrizations.weight_norm(model[0])
    return model


_CASES = {   # name: (model, example inputs, a call at another shape or None, C1 tolerance)
    "float64": (lambda: _mlp(torch.float64), (torch.randn(4, 8, dtype=torch.float64),), None,
                1e-12),
    "channels_last": (_channels_last,
                      (torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),),
                      (torch.randn(3, 3, 6, 6),), 1e-6),
    "unbatched": (_mlp, (torch.randn(8),), (torch.randn(5, 8),), 1e-6),
    "dict-in-namedtuple-out": (_DictToNamedTuple,
                               ({"x": torch.randn(2, 5, 8), "mask": torch.rand(2, 5, 1)},),
                               None, 1e-6),
    "tied-embedding": (_TiedHead, (torch.randint(0, 10, (3, 4)),), None, 1e-6),
    "weight_norm-parametrization": (_weight_norm, (torch.randn(4, 8),), None, 1e-6),
}


@pytest.mark.parametrize("case", _CASES)
def test_models_an_outside_user_brings_keep_e1_and_c1(case):
    make, args, other, tolerance = _CASES[case]
    model = make()
    with torch.no_grad():
        expected = model(*args)
    ext = morphc.extend(model, args, sites="all", width=4)
    with torch.no_grad():
        got = ext(*args)
        assert type(got) is type(expected)
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(got),
                                                     torch.utils._pytree.tree_leaves(expected),
                                                     strict=True))
        if other is not None:
            assert torch.equal(ext(*other), model(*other))
    extended, folded = _fold(model, args, ext)
    assert max_rel(folded, extended) < tolerance


def test_a_bfloat16_model_folds_within_its_rounding_with_branches_in_bfloat16():
    model, x = _mlp(torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert {p.dtype for p in ext.extension_parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    extended, folded = _fold(model, (x,), ext)
    assert 0 < max_rel(folded, extended) < 2e-2


@pytest.mark.parametrize("make, sites, error", [
    (lambda: torch.jit.script(_mlp()), "all", morphc.TraceError),
    (lambda: nn.Sequential(nn.LSTM(8, 8, batch_first=True)), ["0"], morphc.SiteError),
])
def test_what_morphc_cannot_extend_is_refused_typed_and_leaves_the_model_alone(make, sites,
                                                                              error):
    model, x = make(), torch.randn(4, 3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        morphc.extend(model, (x,), sites=sites)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_converting_the_model_but_not_its_extension_is_a_typed_error_that_says_what_to_do():
    """``model.double()`` after ``extend`` leaves the branches in float32; torch's error named two
    tensors. It names the conversion now, and converting ``ext`` itself works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    ext = morphc.extend(model, (x,), sites="all")
    model.double()
    with pytest.raises(morphc.TraceError, match=r"converted after morphc.extend.*ext\.double"):
        ext(x.double())
    ext.double()
    with torch.no_grad():
        assert torch.equal(ext(x.double()), model(x.double()))
