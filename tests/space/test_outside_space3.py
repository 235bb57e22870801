"""Model space probed as a new user would (third round): moves that should cancel, move and search
arguments of the wrong type, score functions that misbehave, saved files named the way users
name them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.errors import MoveError
from morphc.space.moves import Contract, Deepen, Extend, Grow, Widen


class ResidualCNN(nn.Module):
    """Conv + BatchNorm with a skip connection, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(h + self.b2(self.c2(h)))
        return self.head(h.mean((2, 3)))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.cls, self.reg = nn.Linear(5, 12), nn.Linear(12, 3), nn.Linear(12, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), self.reg(h)


def mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2))
    return model, (torch.randn(8, 6),)


def state_of(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- moves that cancel --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: (ResidualCNN(), (torch.randn(4, 3, 8, 8),)),
    lambda: (TwoHeads(), (torch.randn(4, 5),)),
    mlp,
], ids=["residual_cnn", "two_heads", "mlp_layernorm"])
def test_extend_then_contract_cancels_without_a_return_phase(make):
    """Freshly extended branches have B = 0: they add nothing at any homotopy, so Contract folds
    them straight back (as Ungrow drops a zero branch) — same node, same weights bit for bit."""
    model, inputs = make()
    space = morphc.ModelSpace(model, inputs)
    before = state_of(space.module())
    back = space.apply(Contract(), space.apply(Extend(sites="all")))
    assert back == space.root
    after = space.module(back).state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert space.graph.nodes[back]["params"] == sum(p.numel() for p in model.parameters())
    extended = space.apply(Extend(sites="all", seed=1))
    with torch.no_grad():                     # a trained branch off C is still refused
        next(iter(space.module(extended).branches.values())).B.add_(0.1)
    with pytest.raises(morphc.ContractionError, match="off the constraint set"):
        space.apply(Contract(), extended)


# -- arguments of the wrong type ----------------------------------------------------------------
@pytest.mark.parametrize("move", [Grow(seed=1.5), Deepen(seed="a"), Widen("0", to=32, seed=2.0),
                                  Extend(seed=None), Grow(seed=2 ** 64)])
def test_a_seed_that_is_not_an_int_is_a_move_error(move):
    model, inputs = mlp()
    before = state_of(model)
    space = morphc.ModelSpace(model, inputs)
    with pytest.raises(MoveError, match="seed must be an int"):
        space.apply(move)
    assert space.graph.number_of_nodes() == 1 and space.rejected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _train(module, steps):
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(module(x), y).backward()
        opt.step()


def _score(module):
    with torch.no_grad():
        return -float(module(torch.ones(4, 6)).pow(2).mean())


@pytest.mark.parametrize("budget", [-5, 1.5, None, True])
def test_a_budget_that_is_not_a_count_is_a_move_error(budget):
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(MoveError, match="budget must be an int"):
        space.search(_train, _score, budget)
    assert space.steps_spent == 0


@pytest.mark.parametrize("options", [dict(child_steps=0), dict(child_steps=-1),
                                     dict(neighbors=1.5), dict(warmup_steps=-1),
                                     dict(final_steps=None)])
def test_hill_climb_refuses_counts_that_would_loop_or_fail_later(options):
    """``child_steps=0`` made a round cost nothing, so the search never ended."""
    with pytest.raises(MoveError, match="HillClimb"):
        morphc.HillClimb(**options)


@pytest.mark.parametrize("bad", [None, "0.5", [1.0]])
def test_a_score_that_is_not_a_number_is_a_move_error(bad):
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(MoveError, match="must return a real number"):
        space.evaluate(space.root, lambda module: bad)


def test_a_nan_score_never_becomes_the_best():
    """NaN compares false with everything: once it was the best, no real score replaced it."""
    space = morphc.ModelSpace(*mlp())
    child = space.apply(Grow(sites="all", width=2))
    assert math.isnan(space.evaluate(space.root, lambda module: float("nan")))
    space.evaluate(child, lambda module: -1.0)
    assert space.best()[0] == child and space.best()[2] == -1.0
    space.evaluate(space.root, lambda module: torch.tensor(float("nan")))
    assert space.best()[0] == child


def test_hill_climb_does_not_move_to_a_child_scored_nan():
    space = morphc.ModelSpace(*mlp())

    def score(module):             # every child diverged; the current node did not
        return _score(module) if graph_nodes(module) == root_nodes else float("nan")

    root_nodes = graph_nodes(space.module())
    result = space.search(_train, score, 10,
                          strategy=morphc.HillClimb(neighbors=2, child_steps=2, warmup_steps=2))
    assert result.node == space.root and math.isfinite(result.score)
    assert space.graph.number_of_nodes() > 1, "children were tried"
    json.loads(json.dumps(space.to_json()), parse_constant=_not_json)   # what save writes


def graph_nodes(module) -> int:
    return len(module.graph.nodes)


def _not_json(name):
    raise AssertionError(f"space.json contains {name}, which is not JSON")


# -- handles a user gets wrong ------------------------------------------------------------------
@pytest.mark.parametrize("move", ["Widen", Widen, None])
def test_apply_needs_a_move_instance(move):
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(MoveError, match="move instance"):
        space.apply(move)


def test_an_unknown_node_is_a_move_error_listing_the_nodes():
    space = morphc.ModelSpace(*mlp())
    for call in (lambda: space.module("deadbeef"), lambda: space.apply(Grow(), "deadbeef"),
                 lambda: space.evaluate("deadbeef", _score)):
        with pytest.raises(MoveError, match=f"no node 'deadbeef'.*{space.root}"):
            call()


@pytest.mark.parametrize("moves", [lambda module: None, lambda module: ["Widen"]])
def test_hill_climb_refuses_a_neighbourhood_that_is_not_moves(moves):
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(MoveError, match="must return a list of moves"):
        space.search(_train, _score, 10, strategy=morphc.HillClimb(
            neighbors=2, child_steps=2, warmup_steps=2, moves=moves))


def test_a_node_converted_after_the_space_was_made_gets_advice(capsys):
    space = morphc.ModelSpace(*mlp())
    space.module().double()
    with pytest.raises(MoveError, match="Float and Double.*convert the example inputs alike"):
        space.apply(Grow())
    assert "Traceback" not in capsys.readouterr().err, "ShapeProp's printed traceback is held"


def test_an_example_batch_bn_cannot_train_on_is_a_move_error_that_says_so():
    """In eval mode the model runs on a batch of one; train-mode BatchNorm cannot, so no move
    can be measured there — say that, not torch's ValueError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    space = morphc.ModelSpace(model, (torch.randn(1, 4),))
    with pytest.raises(MoveError, match="train mode.*batch of at least 2"):
        space.apply(Widen("0", to=16))


def test_ungrow_with_nothing_grown_says_what_adds_branches():
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(morphc.SiteError, match="no grown branches.*Grow and Deepen"):
        space.apply(morphc.Ungrow())


@pytest.mark.parametrize("options", [dict(tolerance=-1.0), dict(tolerance=float("nan")),
                                     dict(tolerance="1e-6"), dict(train_tolerance=None)])
def test_a_tolerance_that_would_refuse_every_move_is_refused_up_front(options):
    """A negative or NaN tolerance refused every move with 'please report it'; a string failed
    at the first comparison."""
    with pytest.raises(MoveError, match="tolerance must be a number"):
        morphc.ModelSpace(*mlp(), **options)


@pytest.mark.parametrize("make", [
    lambda w: torch.nested.nested_tensor(list(w)),     # .shape raised an untyped RuntimeError
    lambda w: w.to_sparse(),
    lambda w: torch.empty_like(w, device="meta"),
], ids=["nested", "sparse", "meta"])
def test_a_weights_file_with_a_tensor_save_never_writes_is_a_format_error(tmp_path, make):
    model, inputs = mlp()
    morphc.save(morphc.ModelSpace(model, inputs).module(), tmp_path / "m")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["0.weight"] = make(state["0.weight"])
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(morphc.FormatError, match="'0.weight' is not a dense tensor"):
        morphc.load(tmp_path / "m", check_digest=False)


@pytest.mark.parametrize("move, says", [(Widen("0", to=8), "to=8"),
                                        (Widen("0", factor=0.5), "factor=0.5 gives 8 units"),
                                        (Widen("0", factor=1.0), "factor=1.0 gives 16 units")])
def test_a_widen_that_would_not_grow_names_the_argument_the_user_gave(move, says):
    """The pass said 'new_width must be larger', an argument the user never passed."""
    with pytest.raises(morphc.SiteError, match=f"0 has 16 units and {says}.*to > 16"):
        move(*mlp())


@pytest.mark.parametrize("options", [{"bogus": 1}, {"seed": 3}, ["widen_factor"]])
def test_hill_climb_options_are_checked_when_given(options):
    """An unknown option was a TypeError at the first round, after the warm-up training."""
    with pytest.raises(MoveError, match="neighbourhood options are widen_factor"):
        morphc.HillClimb(options=options)


def test_space_neighbors_refuses_an_unknown_option():
    space = morphc.ModelSpace(*mlp())
    with pytest.raises(MoveError, match="neighbourhood options"):
        space.neighbors(widen=2)
    assert space.neighbors(seed=1, grow_width=2)


@pytest.mark.parametrize("s", [-0.5, 2, float("nan"), "0", True])
def test_set_homotopy_of_grown_branches_refuses_what_extended_models_refuse(s):
    """On an ExtendedModel s is checked; on grown branches a NaN silently poisoned the model."""
    from morphc.space.moves import set_homotopy

    space = morphc.ModelSpace(*mlp())
    grown = space.module(space.apply(Grow(sites="all", width=2)))
    before = state_of(grown)
    with pytest.raises(morphc.ContractionError, match=r"homotopy must be a number in \[0, 1\]"):
        set_homotopy(grown, s)
    assert all(torch.equal(before[k], v) for k, v in grown.state_dict().items())
