"""Search over a :class:`~morphc.space.graph.ModelSpace`: strategies and what they return."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import MorphcError, MoveError
from morphc.passes.find_sites import find_sites
from morphc.passes.widen_layer import widenable_pairs
from morphc.space.deepen_points import deepen_points
from morphc.space.graph import check_count
from morphc.space.move_base import Move
from morphc.space.moves import (
    Contract,
    Deepen,
    Grow,
    Widen,
    dropout_between,
)

if TYPE_CHECKING:
    from morphc.space.graph import EvalFn, ModelSpace, TrainFn


@dataclass
class SearchResult:
    """What a search found: the chosen node, its module and score, and what it cost."""

    node: str
    module: nn.Module
    score: float | None
    steps: int
    seconds: float


class Strategy(Protocol):
    """A search strategy: drive ``space`` (``apply`` / ``train`` / ``evaluate``) within ``budget``
    training steps and return the chosen node. Any callable with this signature works."""

    def __call__(self, space: ModelSpace, train: TrainFn, evaluate: EvalFn,
                 budget: int) -> str: ...


@dataclass
class HillClimb:
    """Hill climbing with network morphisms (NASH, Elsken et al. 2017).

    Each round samples ``neighbors`` moves from the current node, trains every child *and* the
    current node ("stay") for ``child_steps``, and moves to the best scored (ties stay). Warm-up
    training precedes the rounds; ``final_steps`` of the budget are reserved to train the chosen
    node at the end. ``moves(module) -> list[Move]`` replaces the default neighbourhood.
    """

    neighbors: int = 4
    child_steps: int = 100
    warmup_steps: int = 100
    final_steps: int = 0
    seed: int = 0
    moves: Callable[[nn.Module], list[Move]] | None = None
    options: dict | None = None
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        """Refuse counts that would loop forever (``child_steps=0`` makes a round free) or fail
        later with an untyped error."""
        check_count(self.neighbors, "HillClimb: neighbors")
        check_count(self.child_steps, "HillClimb: child_steps", minimum=1)
        check_count(self.warmup_steps, "HillClimb: warmup_steps")
        check_count(self.final_steps, "HillClimb: final_steps")
        check_options(self.options or {})

    def __call__(self, space: ModelSpace, train: TrainFn, evaluate: EvalFn, budget: int) -> str:
        check_count(budget, "budget")
        rng = random.Random(self.seed)
        start = space.steps_spent
        current = space.root
        space.train(current, train, min(self.warmup_steps, budget))
        space.evaluate(current, evaluate)
        round_cost = (self.neighbors + 1) * self.child_steps
        while space.steps_spent - start + round_cost <= budget - self.final_steps:
            current = self._round(space, current, train, evaluate, rng)
        rest = budget - (space.steps_spent - start)
        if rest > 0:
            space.train(current, train, rest)
            space.evaluate(current, evaluate)
        return current

    def _candidates(self, space: ModelSpace, node: str, rng: random.Random) -> list[Move]:
        if self.moves is not None:
            moves = self.moves(space.module(node))
            if not isinstance(moves, list | tuple) or \
                    not all(isinstance(m, Move) for m in moves):
                raise MoveError(f"HillClimb(moves=...) must return a list of moves (Widen(...), "
                                f"Grow(...), ...), got {moves!r}")
        else:
            moves = space.neighbors(node, seed=rng.randrange(2**31), **(self.options or {}))
        return rng.sample(moves, min(self.neighbors, len(moves)))

    def _round(self, space: ModelSpace, current: str, train: TrainFn, evaluate: EvalFn,
               rng: random.Random) -> str:
        children: list[str] = []
        for move in self._candidates(space, current, rng):
            try:
                child = space.apply(move, current)
            except MorphcError:
                continue                       # recorded in space.rejected
            if child != current and child not in children:
                children.append(child)
        for node in [current, *children]:
            space.train(node, train, self.child_steps)
            space.evaluate(node, evaluate)
        scores = {n: space.graph.nodes[n]["score"] for n in [current, *children]}
        best = max([current, *children], key=lambda n: _rank(scores[n]))
        if self.log is not None:
            self.log(f"round: {len(children)} children, best {scores[best]:.4f} "
                     f"({space.graph.nodes[best]['summary']})")
        return best


def _rank(score: float) -> float:
    """NaN (a child whose training diverged) ranks below every number; ties keep the first."""
    return -math.inf if math.isnan(score) else score


# -- where a search may go ---------------------------------------------------------------------
NEIGHBORHOOD_OPTIONS = ("widen_factor", "max_width", "grow_width")


def check_options(options: dict, allowed: tuple[str, ...] = NEIGHBORHOOD_OPTIONS) -> dict:
    """Neighbourhood options, checked when they are given rather than as a TypeError at the
    first round (a search draws ``seed`` itself: ``HillClimb(seed=...)``)."""
    if not isinstance(options, dict) or set(options) - set(allowed):
        raise MoveError(f"neighbourhood options are {', '.join(allowed)}; got {options!r}")
    return options


def neighborhood(module: nn.Module, *, widen_factor: float = 2.0, max_width: int = 512,
                 grow_width: int = 8, seed: int = 0) -> list[Move]:
    """Every move a search may try from ``module`` (shapes must be annotated)."""
    if isinstance(module, ExtendedModel):
        return [Contract(), Grow()]
    moves: list[Move] = [Deepen(at=p, seed=seed) for p in deepen_points(module)]
    for first, second in widenable_pairs(module):
        if dropout_between(module, first, second):
            continue        # never exact in train mode: see dropout_between
        width = module.get_submodule(first).weight.shape[0]
        if math.ceil(width * widen_factor) <= max_width:
            moves.append(Widen(first, factor=widen_factor, seed=seed, second=second))
    table = find_sites(module).analysis
    moves += [Grow(sites=[site.name], width=grow_width, seed=seed)
              for site in table.extendable()]
    return moves
