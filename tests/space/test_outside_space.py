"""Model space probed from outside: moves, save/load and search on models the repository does
not ship (tuple/dict outputs, tied weights, mixed dtypes, parameter-free graphs, odd arguments)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from morphc.passes.widen_layer import widenable_pairs
from torch import nn
from torch.utils._pytree import tree_leaves

import morphc
from morphc.errors import FormatError, MorphcError, MoveError, SiteError
from morphc.space.loading import graph_from_json
from morphc.space.move_base import private_copy
from morphc.space.moves import Contract, Deepen, Extend, Widen, deepen_points

TOLERANCE = 1e-6     # the space's own eval-mode tolerance (ModelSpace.tolerance)


def outputs(module: nn.Module, inputs: tuple) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return torch.cat([t.flatten() for t in tree_leaves(module(*inputs))])


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- models a user might bring ------------------------------------------------------------------
class TupleAndDict(nn.Module):
    """Returns a tuple holding a dict: the last sites feed the output node directly."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(5, 3)
        self.d, self.e = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        logits = torch.softmax(self.e(F.silu(self.d(x))), -1)      # a site read with a constant
        return self.b(h), {"aux": self.c(h), "p": logits}


class Flattened(nn.Module):
    """A site whose only user is ``flatten(1)`` (two arguments, one a constant)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.gelu(self.a(x))).flatten(1)


class Tied(nn.Module):
    """An embedding front whose weight is also the output projection."""

    def __init__(self):
        super().__init__()
        self.emb, self.h = nn.Embedding(10, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.h(self.emb(tokens))))


class TiedHidden(nn.Module):
    """Two hidden layers sharing one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class MixedPrecision(nn.Module):
    """A float64 front and a float32 back: activations of both dtypes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5).double()
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.double())).float())


class ParameterFree(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


class SplitCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        p, q = torch.tanh(self.a(x)).split(4, dim=-1)
        return self.b(torch.cat([q, p], -1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)), (torch.randn(8, 5),)


# -- Widen ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [TupleAndDict, Flattened])
def test_widen_and_search_handle_sites_read_with_constants_or_containers(model_cls):
    """A site read by the output node (a tuple/dict) or by ``flatten(1)``/``softmax(x, -1)``
    must not crash the widening analysis: those pairs are listed, others refused typed."""
    model, inputs = model_cls().double(), (torch.randn(8, 4, dtype=torch.float64),)
    gm = private_copy(model, inputs)
    pairs = widenable_pairs(gm)
    assert pairs, "the hidden layers between two sites are widenable"
    for first, second in pairs:
        wide = Widen(first, second=second)(gm, inputs)
        assert relative_change(outputs(model, inputs), outputs(wide, inputs)) <= TOLERANCE
    last = [n.target for n in gm.graph.nodes if n.op == "call_module"][-1]
    with pytest.raises(SiteError):
        Widen(last)(gm, inputs)
    space = morphc.ModelSpace(model, inputs)
    assert space.neighbors(), "the search has moves to try"


def test_hill_climb_runs_on_a_model_returning_a_tuple_with_a_dict():
    model, inputs = TupleAndDict().double(), (torch.randn(8, 4, dtype=torch.float64),)
    target = torch.randn(8, 2, dtype=torch.float64)

    def loss(module):
        return F.mse_loss(module(*inputs)[0], target)

    def train(module, steps):
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss(module).backward()
            opt.step()

    space = morphc.ModelSpace(model, inputs)
    result = space.search(train, lambda m: -float(loss(m)), budget=12,
                          strategy=morphc.HillClimb(neighbors=2, child_steps=3, warmup_steps=3))
    assert space.graph.number_of_nodes() > 1
    assert result.steps == 12


@pytest.mark.parametrize("model_cls, first", [(Tied, "h"), (TiedHidden, "a")])
def test_widen_refuses_to_untie_a_shared_weight_and_does_not_offer_it(model_cls, first):
    """Widening a module whose weight is shared would replace it by an untied copy: the space
    would silently gain parameters and the tie would be gone after one training step."""
    model = model_cls()
    inputs = (torch.randint(0, 10, (3, 5)),) if model_cls is Tied else (torch.randn(4, 5),)
    gm = private_copy(model, inputs)
    before = copy.deepcopy(gm.state_dict())
    with pytest.raises(SiteError, match="tied|shared"):
        Widen(first)(gm, inputs)
    assert first not in [f for f, _ in widenable_pairs(gm)]
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("arguments", [dict(to=7.5), dict(factor=float("nan")),
                                       dict(factor=float("inf")), dict(factor=-2.0),
                                       dict(to=10, noise=float("nan")),
                                       dict(to=10, noise=float("inf")), dict(to=10, noise=-0.1)])
def test_widen_refuses_bad_sizes_and_noise_typed(arguments):
    """A NaN noise used to return a model that outputs NaN; a NaN/inf factor or a fractional
    ``to`` raised a bare ValueError/OverflowError/TypeError."""
    model, inputs = _mlp()
    with pytest.raises(MoveError, match="Widen"):
        Widen("0", **arguments)(model, inputs)


# -- Deepen -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model, inputs, at", [
    (MixedPrecision(), (torch.randn(3, 4),), "float_1"),
    (MixedPrecision(), (torch.randn(3, 4),), "relu"),
    (ParameterFree(), (torch.randn(3, 4, dtype=torch.float64),), "relu"),
])
def test_deepen_builds_its_block_in_the_dtype_of_the_tensor_it_reads(model, inputs, at):
    deep = Deepen(at=at)(model, inputs)
    block = next(m for m in deep.modules() if isinstance(m, morphc.ir.branch.BypassBranch))
    node = next(n for n in deep.graph.nodes if n.name == at)
    assert block.A.dtype == node.meta["tensor_meta"].dtype
    assert torch.equal(outputs(deep, inputs), outputs(model, inputs))


@pytest.mark.parametrize("model, inputs, at", [
    (Tied(), (torch.randint(0, 10, (3, 5)),), "tokens"),       # integer token ids
    (SplitCat(), (torch.randn(3, 4),), "split"),                # a tuple of tensors
])
def test_deepen_refuses_a_node_that_is_not_one_floating_tensor(model, inputs, at):
    with pytest.raises(SiteError, match="floating|tensor"):
        Deepen(at=at)(model, inputs)


@pytest.mark.parametrize("arguments", [dict(width=-3), dict(width=2.5), dict(width=0),
                                       dict(width=True), dict(kind="bogus")])
def test_deepen_refuses_bad_width_and_kind_typed(arguments):
    model, inputs = _mlp()
    with pytest.raises(MoveError, match="Deepen"):
        Deepen(at=deepen_points(private_copy(model, inputs))[-1], **arguments)(model, inputs)


# -- compositions -------------------------------------------------------------------------------
def test_widen_deepen_extend_contract_compose_on_a_user_cnn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv1d(3, 5, 3, padding=2, dilation=2), nn.BatchNorm1d(5)
            self.b, self.fc = nn.Conv1d(5, 4, 3, stride=2), nn.Linear(4, 2)

        def forward(self, x):
            h = F.leaky_relu(self.bn(self.a(x)), 0.2)
            return self.fc(F.silu(self.b(h)).mean(-1))

    model, inputs = Net().double().eval(), (torch.randn(4, 3, 11, dtype=torch.float64),)
    reference = outputs(model, inputs)
    step = Widen("a", to=9)(model, inputs)
    step = Deepen(at=deepen_points(step)[0])(step, inputs)
    extended = Extend(sites="all", width=3)(step, inputs)
    extended.set_homotopy(0.0)
    back = Contract()(extended, inputs)
    assert relative_change(reference, outputs(back, inputs)) <= TOLERANCE


# -- save / load --------------------------------------------------------------------------------
def _ties(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


@pytest.mark.parametrize("model_cls", [Tied, TiedHidden])
def test_save_load_keeps_tied_weights_tied(model_cls, tmp_path):
    """A loaded tied model must be the same parameterisation: same parameter names, and a step
    on the shared tensor moves every module that uses it."""
    model = model_cls()
    inputs = (torch.randint(0, 10, (3, 5)),) if model_cls is Tied else (torch.randn(4, 5),)
    gm = private_copy(model, inputs)
    morphc.save(gm, tmp_path / "m")
    back = morphc.load(tmp_path / "m")
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in gm.named_parameters()]
    assert _ties(back) == _ties(gm) != []
    assert torch.equal(outputs(back, inputs), outputs(gm, inputs))


@pytest.mark.parametrize("shape", [[2 ** 62, 2 ** 62], [10 ** 30], [0, 10 ** 30]])
def test_load_refuses_absurd_tensor_sizes_typed(shape, tmp_path):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, self.w)

    gm = private_copy(Functional(), (torch.randn(2, 4),))
    paths = morphc.save(gm, tmp_path / "m")
    doc = json.loads(paths["json"].read_text())
    doc["tensors"]["w"]["shape"] = shape
    paths["json"].write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="elements|dimension"):      # against the weights file
        morphc.load(tmp_path / "m", check_digest=False)
    del doc["digest"]
    with pytest.raises(FormatError, match="elements|dimension"):      # no file: the size cap
        graph_from_json(doc)


def test_refused_moves_are_typed_and_leave_the_users_model_bit_for_bit():
    """Every refusal above is a MorphcError; the user's own module never changes."""
    model, inputs = TupleAndDict(), (torch.randn(8, 4),)
    before = copy.deepcopy(model)
    for move in (Widen("b"), Widen("a", noise=float("nan")), Deepen(at="softmax", width=-1),
                 Contract()):
        with pytest.raises(MorphcError):
            move(model, inputs)
    assert same_state(model, before)


class GroupedConvT(nn.Module):
    """Depthwise, dilated, strided and transposed convs with GroupNorm and LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6)
        self.dw = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6)
        self.up, self.ln = nn.ConvTranspose2d(6, 2, 2, stride=2), nn.LayerNorm([2, 8, 8])

    def forward(self, x):
        return self.ln(self.up(F.hardswish(self.dw(F.leaky_relu(self.gn(self.a(x)), 0.1)))))


@pytest.mark.parametrize("model, inputs", [
    (nn.Sequential(nn.Linear(5, 7), nn.Softplus(beta=2.0, threshold=5.0), nn.Linear(7, 3)).double(),
     (torch.randn(4, 5, dtype=torch.float64),)),
    (nn.Sequential(nn.Linear(5, 7), nn.LeakyReLU(0.3), nn.Linear(7, 7), nn.Hardswish(),
                   nn.Linear(7, 3)), (torch.randn(4, 5),)),
    (GroupedConvT(), (torch.randn(2, 3, 4, 4),)),
    (TupleAndDict().double(), (torch.randn(4, 4, dtype=torch.float64),)),
])
def test_user_models_round_trip_through_save_and_load(model, inputs, tmp_path):
    gm = private_copy(model, inputs)
    morphc.save(gm, tmp_path / "m")
    back = morphc.load(tmp_path / "m")
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in gm.named_parameters()]
    assert torch.equal(outputs(back, inputs), outputs(model, inputs))
