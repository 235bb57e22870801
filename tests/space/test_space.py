"""Model space: every move keeps the function (and really wires in its new parameters), the
architecture hash is structural and stable, save/load never runs saved code, search records."""

import json
import subprocess
import sys

import pytest
import torch
from morphc.passes.widen_layer import widenable_pairs
from torch import nn

import morphc
from morphc import zoo
from morphc.ir.branch import BypassBranch
from morphc.space import HillClimb, ModelSpace, architecture_hash, function_change
from morphc.space.encoding import graph_to_json
from morphc.space.loading import FormatError, graph_from_json, load
from morphc.space.move_base import Move, private_copy
from morphc.space.moves import (
    Contract,
    Deepen,
    Extend,
    Grow,
    MoveError,
    Ungrow,
    Widen,
    deepen_points,
    grown_branches,
    set_homotopy,
)
from morphc.space.saving import save
from tests.cli_factories import Masked
from tests.helpers import max_rel

ARCHS = ["mlp", "cnn_bn", "resnet_small"]
TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and two threads per worker under
    ``pytest -n 2`` on two cores oversubscribe them (measured: resnet_small forward 1.2 ms with
    one thread, 490 ms with two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name):
    torch.manual_seed(0)
    model, inputs = zoo.ZOO[name]()
    if name == "resnet_small":      # BatchNorm batch statistics need more than 2 samples
        inputs = (torch.randn(6, *inputs[0].shape[1:]),)
    return model, inputs


def out(module, inputs):
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def branches(module):
    return [m for m in module.modules() if isinstance(m, BypassBranch)]


def perturb_branches(module, std=0.1):
    with torch.no_grad():
        for branch in branches(module):
            branch.B.normal_(0, std)


def changed(a, b, inputs):
    return max_rel(out(a, inputs), out(b, inputs))


# -- moves preserve the function, and their new parameters are live ---------------------------
def _moves(gm):
    points, pairs = deepen_points(gm), widenable_pairs(gm)
    return {
        "extend": Extend(sites="all", width=3),
        "grow": Grow(sites="all", width=3),
        "deepen_first": Deepen(at=points[0]),
        "deepen_last": Deepen(at=points[-1]),
        "widen_first": Widen(pairs[0][0], factor=1.5),
        "widen_last": Widen(pairs[-1][0], factor=2.0, noise=0.2),
    }


MOVE_NAMES = ["extend", "grow", "deepen_first", "deepen_last", "widen_first", "widen_last"]


@pytest.mark.parametrize("move_name", MOVE_NAMES)
@pytest.mark.parametrize("name", ARCHS)
def test_move_preserves_function_and_new_parameters_are_live(name, move_name):
    model, inputs = build(name)
    space = ModelSpace(model, inputs)
    gm = space.module()
    move = _moves(gm)[move_name]
    child = space.apply(move)
    edge = space.graph.edges[space.root, child]
    assert edge["change"] <= TOL and edge["change_train"] <= 1e-4
    assert space.graph.number_of_nodes() == 2 and child != space.root
    new = space.module(child)
    assert function_change(gm, new, inputs)["eval"] <= TOL
    assert max_rel(out(model, inputs), out(new, inputs)) <= TOL, "the user's model is the seed"
    # non-vacuous: moving the new parameters off their neutral values changes the function
    if move_name.startswith("widen"):
        first = new.get_submodule(move.first)
        old = gm.get_submodule(move.first).weight.shape[0]
        with torch.no_grad():
            first.weight[old:].normal_(0, 1.0)
    else:
        perturb_branches(new)
    assert changed(gm, new, inputs) > 1e-3


@pytest.mark.parametrize("name", ARCHS)
def test_grow_makes_a_standalone_module_with_the_branches_in_its_state_dict(name):
    model, inputs = build(name)
    grown = Grow(sites="all", width=2)(model, inputs)
    assert isinstance(grown, torch.fx.GraphModule)
    assert not isinstance(grown, morphc.ExtendedModel)
    keys = set(grown.state_dict())
    assert set(model.state_dict()) < keys
    assert any(k.startswith("morphc_grown.") and k.endswith(".B") for k in keys)
    assert "morphc_grown" in grown.code
    params = {id(p) for p in grown.parameters()}
    assert params.isdisjoint(id(p) for p in model.parameters()), "a copy, not the user's model"


@pytest.mark.parametrize("name", ARCHS)
def test_extend_then_contract_returns_to_the_same_architecture(name):
    model, inputs = build(name)
    space = ModelSpace(model, inputs)
    extended = space.apply(Extend(sites="all", width=2))
    ext = space.module(extended)
    perturb_branches(ext)
    ext.set_homotopy(0.0)               # on C: the branches are affine, the fold is exact
    back = space.apply(Contract(), extended)
    assert back == space.root and space.graph.nodes[back]["visits"] == 2
    assert space.graph.edges[extended, back]["change"] <= TOL
    assert changed(model, space.module(back), inputs) > 1e-3, "the fold wrote real changes"
    assert list(space.module(back).state_dict()) == list(private_copy(model, inputs).state_dict())


@pytest.mark.parametrize("name", ARCHS)
def test_ungrow_folds_grown_branches_on_c_and_refuses_off_c(name):
    model, inputs = build(name)
    space = ModelSpace(model, inputs)
    grown_node = space.apply(Grow(sites="all", width=2))
    grown = space.module(grown_node)
    perturb_branches(grown)
    with pytest.raises(morphc.ContractionError, match="constraint set"):
        space.apply(Ungrow(), grown_node)
    assert space.graph.number_of_nodes() == 2 and space.rejected
    set_homotopy(grown, 0.0)
    back = space.apply(Ungrow(), grown_node)
    assert back == space.root
    assert space.graph.edges[grown_node, back]["change"] <= TOL
    assert changed(model, space.module(back), inputs) > 1e-3
    assert set(space.module(back).state_dict()) == set(space.module(grown_node).state_dict()) - {
        k for k in grown.state_dict() if k.startswith("morphc_grown.")}


def test_ungrow_removes_a_zero_residual_block_but_not_a_trained_one():
    model, inputs = build("mlp")
    deep = Deepen(at="_1")(model, inputs)
    assert [b.site for b in grown_branches(deep)] == [None]
    assert architecture_hash(Ungrow()(deep, inputs)) == \
        architecture_hash(private_copy(model, inputs))
    perturb_branches(deep)
    with pytest.raises(morphc.ContractionError, match="no weight to fold into"):
        Ungrow()(deep, inputs)


def test_widen_goes_through_residual_blocks_and_grown_branches():
    model, inputs = build("cnn_bn")
    gm = Grow(sites="all", width=2)(Deepen(at="relu")(model, inputs), inputs)
    perturb_branches(gm)               # live blocks: their A/B must be widened consistently
    wide = Widen("conv1", to=13, noise=0.1)(gm, inputs)
    assert function_change(gm, wide, inputs)["eval"] <= TOL
    assert wide.get_submodule("bn1").num_features == 13
    block = wide.get_submodule("morphc_deep.block")
    assert block.A.shape[1] == 13 and block.B.shape[0] == 13


def test_widen_refuses_bad_locations_with_site_error():
    model, inputs = build("resnet_small")
    with pytest.raises(morphc.SiteError, match="residual add"):
        Widen("layers.0.conv3")(model, inputs)        # its output meets the shortcut
    with pytest.raises(morphc.SiteError, match="widenable"):
        Widen("nope")(model, inputs)
    model, inputs = build("mlp")
    with pytest.raises(morphc.SiteError):
        Widen("4")(model, inputs)                     # the last layer feeds the output
    with pytest.raises(morphc.SiteError, match="larger"):
        Widen("0", to=8)(model, inputs)


def test_moves_need_the_right_kind_of_architecture():
    model, inputs = build("mlp")
    ext = Extend(sites="all")(model, inputs)
    for move in (Deepen(), Widen("0"), Extend(), Ungrow()):
        with pytest.raises(MoveError, match="Contract .* or Grow"):
            move(ext, inputs)
    with pytest.raises(MoveError, match="Extend"):
        Contract()(model, inputs)
    with pytest.raises(morphc.SiteError, match="activation tensors"):
        Deepen(at="missing")(model, inputs)


def test_apply_refuses_a_move_that_changes_the_function():
    class Nudge(Move):
        def apply_to(self, module, inputs):
            with torch.no_grad():
                module.get_submodule("0").bias.add_(1e-3)
            return module

    model, inputs = build("mlp")
    space = ModelSpace(model, inputs)
    with pytest.raises(MoveError, match="refused"):
        space.apply(Nudge())
    assert space.graph.number_of_nodes() == 1 and space.graph.number_of_edges() == 0
    assert space.rejected[-1]["move"] == "Nudge()"
    assert max_rel(out(model, inputs), out(space.module(), inputs)) == 0.0


# -- the architecture hash ----------------------------------------------------------------------
class Named(nn.Module):
    """zoo.mlp with different module names."""

    def __init__(self):
        super().__init__()
        self.inp, self.act1, self.mid = nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32)
        self.act2, self.out = nn.ReLU(), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.act2(self.mid(self.act1(self.inp(x)))))


HASH_SCRIPT = ("import torch; from morphc import zoo; from morphc.space import ModelSpace; "
               "torch.manual_seed(7); m, x = zoo.mlp(); print(ModelSpace(m, x).root)")


def test_hash_is_structural_and_ignores_names_and_weights():
    h = architecture_hash(private_copy(*build("mlp")))
    torch.manual_seed(123)
    other_weights, inputs = zoo.mlp()
    assert architecture_hash(private_copy(other_weights, inputs)) == h
    assert architecture_hash(private_copy(Named(), inputs)) == h, "names do not matter"
    assert architecture_hash(private_copy(*zoo.mlp(hidden=33))) != h
    tanh_last = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                              nn.Linear(32, 4))
    assert architecture_hash(private_copy(tanh_last, inputs)) != h


@pytest.mark.slow
def test_hash_is_stable_across_processes():
    here = architecture_hash(private_copy(*zoo.mlp()))
    for seed in ("0", "12345"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        result = subprocess.run([sys.executable, "-c", HASH_SCRIPT], capture_output=True,
                                text=True, env=env, timeout=120, check=True)
        assert result.stdout.strip() == here


def test_hash_sees_argument_order_and_where_moves_land():
    class Sub(nn.Module):
        def __init__(self, flip):
            super().__init__()
            self.a, self.b, self.flip = nn.Linear(3, 3), nn.Linear(3, 3), flip

        def forward(self, x):
            a, b = self.a(x), torch.relu(self.b(x))
            return b - a if self.flip else a - b

    inputs = (torch.randn(2, 3),)
    assert architecture_hash(private_copy(Sub(False), inputs)) != \
        architecture_hash(private_copy(Sub(True), inputs))
    model, inputs = build("mlp")
    widened = Widen("0", to=48)(model, inputs)
    direct = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 32), nn.ReLU(),
                           nn.Linear(32, 4))
    assert architecture_hash(widened) == architecture_hash(private_copy(direct, inputs))
    assert architecture_hash(Deepen(at="_1")(model, inputs)) != \
        architecture_hash(Deepen(at="_3")(model, inputs))
    ext = Extend(sites="all")(model, inputs)
    assert architecture_hash(ext) != architecture_hash(Grow()(ext, inputs)), \
        "temporary and permanent branches are different nodes"


# -- save / load --------------------------------------------------------------------------------
def _morphed(name):
    model, inputs = build(name)
    gm = Grow(sites="all", width=2)(Deepen()(model, inputs), inputs)
    gm = Widen(widenable_pairs(gm)[0][0], factor=1.5)(gm, inputs)
    perturb_branches(gm)
    return gm, inputs


@pytest.mark.parametrize("name", ARCHS)
def test_save_load_round_trip_without_running_saved_code(name, tmp_path):
    gm, inputs = _morphed(name)
    paths = save(gm, tmp_path / "arch")
    paths["py"].write_text("raise SystemExit('the saved code must never run')\n")
    state = torch.load(paths["pt"], weights_only=True)
    assert set(state) == set(gm.state_dict())
    loaded = load(tmp_path / "arch")
    for mode in (False, True):
        gm.train(mode)
        loaded.train(mode)
        with torch.no_grad():
            assert torch.equal(gm(*inputs), loaded(*inputs))
    assert loaded.code == gm.code
    assert architecture_hash(loaded) == architecture_hash(gm)


def _tamper(data, select: str, changes: dict) -> dict:
    """A copy of ``data`` with the first node whose op is ``select`` changed."""
    data = json.loads(json.dumps(data))
    next(n for n in data["nodes"] if n["op"] == select).update(changes)
    return data


@pytest.mark.parametrize("op, changes, match", [
    ("call_module", {"op": "call_function", "target": "builtins.eval"}, "not allowed"),
    ("call_module", {"op": "call_function", "target": "os.system"}, "not allowed"),
    ("call_module", {"op": "call_function", "target": "torch.load"}, "not allowed"),
    ("call_module", {"op": "call_method", "target": "relu(); import os; os.system('x'); y.relu"},
     "plain Python identifier"),
    ("call_module", {"op": "call_method", "target": "__reduce_ex__"}, "plain Python identifier"),
    ("call_module", {"op": "call_method", "target": "register_hook"}, "public torch.Tensor"),
    ("call_module", {"target": "x; import os"}, "dotted path"),
    ("placeholder", {"target": "x=__import__('os')"}, "identifier"),
    ("placeholder", {"name": "a b"}, "node name 'a b' is not a plain Python identifier"),
])
def test_loader_rejects_anything_outside_the_allow_lists(op, changes, match):
    gm, _ = _morphed("mlp")
    with pytest.raises(FormatError, match=match):
        graph_from_json(_tamper(graph_to_json(gm), op, changes))


def test_loader_rejects_disallowed_classes_and_attributes():
    data = graph_to_json(_morphed("mlp")[0])
    bad_class = json.loads(json.dumps(data))
    bad_class["modules"]["0"]["class"] = "subprocess.Popen"
    with pytest.raises(FormatError, match="not allowed"):
        graph_from_json(bad_class)
    bad_attr = json.loads(json.dumps(data))
    bad_attr["nodes"].insert(2, {"name": "leak", "op": "call_function",
                                 "target": "builtins.getattr",
                                 "args": {"tuple": [{"node": "_0"}, "__class__"]},
                                 "kwargs": {"dict": []}})
    with pytest.raises(FormatError, match="getattr may only read"):
        graph_from_json(bad_attr)

    class Custom(nn.Module):
        def forward(self, x):
            return x

    class KeepCustom(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Custom) or super().is_leaf_module(m, name)

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    custom = torch.fx.GraphModule(model, KeepCustom().trace(model))
    with pytest.raises(FormatError, match="allow-list"):
        graph_to_json(custom)


# -- the space, drawing, search -----------------------------------------------------------------
def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 4, generator=gen))

    def train(module, steps):
        opt = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(module(x), y).backward()
            opt.step()

    def evaluate(module):
        with torch.no_grad():
            return -float(nn.functional.mse_loss(module(x), y))
    return x, train, evaluate


def test_tiny_search_records_nodes_edges_scores_and_saves(tmp_path):
    x, train, evaluate = _regression()
    torch.manual_seed(0)
    space = ModelSpace(zoo.mlp(hidden=8)[0], (x[:16],))
    result = space.search(train, evaluate, budget=60,
                          strategy=HillClimb(neighbors=2, child_steps=10, warmup_steps=10,
                                             final_steps=10))
    assert result.steps == space.steps_spent == 60
    graph = space.graph
    assert graph.number_of_nodes() >= 3 and graph.number_of_edges() >= 2
    assert all(d["change"] <= TOL for _, _, d in graph.edges(data=True))
    scored = [d["score"] for _, d in graph.nodes(data=True) if d["score"] is not None]
    assert len(scored) >= 3
    best_node, best_module, best_score = space.best()
    assert best_score == max(s for _, d in graph.nodes(data=True) for _, s in d["scores"])
    assert evaluate(best_module) == pytest.approx(best_score)
    paths = space.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {n["id"] for n in data["nodes"]} == set(graph.nodes) and data["best"] == best_node
    assert all("architecture" in n and "error" not in n["architecture"] for n in data["nodes"])
    dot = paths["dot"].read_text()
    assert dot.startswith("digraph") and f"score {best_score:.4f}" in dot
    assert dot.count("->") == graph.number_of_edges()
    if "svg" in paths:
        assert paths["svg"].read_text().lstrip().startswith("<")
    reloaded = load(tmp_path / "best")
    assert evaluate(reloaded) == pytest.approx(best_score)


def test_a_custom_strategy_plugs_in():
    x, train, evaluate = _regression()

    def widen_once(space, train, evaluate, budget):
        child = space.apply(Widen("0", to=16))
        space.train(child, train, budget)
        space.evaluate(child, evaluate)
        return child

    space = ModelSpace(zoo.mlp(hidden=8)[0], (x[:16],))
    result = space.search(train, evaluate, budget=20, strategy=widen_once)
    assert result.module.get_submodule("0").out_features == 16 and result.steps == 20
    assert space.graph.nodes[result.node]["scores"][-1][0] == 20


def test_passes_follow_the_pass_contract():
    from morphc.passes.infra import Pipeline
    from morphc.passes.insert_residual_block import insert_residual_block
    from morphc.passes.widen_layer import widen_layer

    model, inputs = build("mlp")
    gm = private_copy(model, inputs)
    count = len(gm.graph.nodes)
    block = BypassBranch("linear", 32, 32, 4, "prelu", with_bias=True, homotopy=torch.ones(()))
    pipeline = Pipeline(gm)
    result = pipeline.run(insert_residual_block, "_1", block, "blk")
    assert result.modified and len(result.graph_module.graph.nodes) == count + 2
    assert list(result.analysis.block.users) == [result.analysis.add]
    with pytest.raises(morphc.SiteError, match="already exists"):
        insert_residual_block(gm, "_3", block, "blk")
    result = pipeline.run(widen_layer, "0", 40, generator=torch.Generator().manual_seed(0),
                          noise=0.3)
    assert pipeline.history == ["insert_residual_block", "widen_layer"]
    info = result.analysis
    assert result.modified and len(gm.graph.nodes) == count + 2
    assert info.mapping[:32] == list(range(32)) and info.second == "2"
    totals = torch.zeros(32, dtype=torch.float64).index_add_(
        0, torch.tensor(info.mapping), torch.tensor(info.split, dtype=torch.float64))
    assert torch.allclose(totals, torch.ones(32, dtype=torch.float64), atol=1e-12)
    assert gm.get_submodule("blk").A.shape == (4, 40), "the residual block was widened too"
    assert morphc.space.moves.Shrink is Ungrow


def test_ungrow_handles_two_branches_grown_at_one_site():
    model, inputs = build("cnn_bn")
    twice = Grow(sites="conv2", width=2, seed=1)(Grow(sites="all", width=2)(model, inputs), inputs)
    assert sorted(b.site for b in grown_branches(twice)) == ["conv1", "conv2", "conv2", "head"]
    perturb_branches(twice)
    set_homotopy(twice, 0.0)
    back = Ungrow()(twice, inputs)
    assert not grown_branches(back)
    assert architecture_hash(back) == architecture_hash(private_copy(model, inputs))
    assert function_change(twice, back, inputs)["eval"] <= TOL


# -- keyword inputs and dynamic shapes (issue 10) ------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_space_moves_use_the_keyword_inputs_and_dynamic_shapes(dynamic):
    torch.manual_seed(0)
    model, x, mask = Masked(), torch.randn(2, 5, 6), (torch.rand(2, 5) > 0.3).float()
    auto = torch.export.Dim.AUTO
    spec = {"x": {0: auto, 1: auto}, "mask": {0: auto, 1: auto}, "scale": None} \
        if dynamic else None
    space = ModelSpace(model, (x,), kwargs={"mask": mask, "scale": 2.0}, dynamic_shapes=spec)
    assert space.example_inputs.kwargs["scale"] == 2.0
    assert space.module().meta["morphc_frontend"] == ("export" if dynamic else "symbolic_trace")
    ext = space.apply(Extend(sites="all", width=2))
    set_homotopy(space.module(ext), 0.0)
    back = space.apply(Contract(), ext)
    grown = space.apply(Grow(sites="all", width=2), back)
    perturb_branches(space.module(grown))
    deep = space.apply(Deepen(at="tanh", kind="linear") if dynamic else Deepen(), grown)
    assert max(c for *_, c in space.graph.edges(data="change")) <= TOL
    x2, mask2 = torch.randn(3, 7, 6), torch.ones(3, 7)      # another batch and length
    with torch.no_grad():
        expected = space.module(grown)(x2, mask=mask2, scale=2.0)
        assert torch.allclose(space.module(deep)(x2, mask=mask2, scale=2.0), expected)


def test_move_called_directly_takes_kwargs_and_dynamic_shapes():
    torch.manual_seed(0)
    model, x, mask = Masked(), torch.randn(2, 5, 6), torch.ones(2, 5)
    spec = {"x": {1: torch.export.Dim("seq", max=16)}, "mask": {1: torch.export.Dim("seq",
                                                                                  max=16)},
            "scale": None}
    grown = Grow(sites="all", width=2)(model, (x,), kwargs={"mask": mask, "scale": 0.5},
                                        dynamic_shapes=spec)
    x2, mask2 = torch.randn(2, 9, 6), torch.ones(2, 9)
    with torch.no_grad():
        assert torch.allclose(grown(x2, mask=mask2, scale=0.5), model(x2, mask=mask2, scale=0.5))
