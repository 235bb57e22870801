"""``ModelSpace``: architectures as nodes, function-preserving moves as edges, and search over them.

Extension and contraction (and their permanent cousins Grow / Deepen / Widen / Ungrow, see
``morphc.space.moves``) keep the function, so training can walk from one architecture to the next
without starting from scratch — network morphism / NAS. The space is a ``networkx.DiGraph``:

- a node is an architecture, identified by :func:`architecture_hash`, holding its current module
  (weights), its scores and how many training steps those weights have had;
- an edge is a move, holding its description and the function change measured when it was
  applied (``apply`` refuses any move whose change exceeds ``tolerance``).

>>> import morphc, torch
>>> from morphc.space.moves import Widen
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> space = morphc.ModelSpace(model, (torch.randn(16, 4),))
>>> child = space.apply(Widen("0", to=16))
>>> space.graph.number_of_nodes(), space.graph.edges[space.root, child]["move"]
(2, "Widen(first='0', to=16)")
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import fx, nn

from morphc.compiler.deviation import deterministic_forward, relative_deviation
from morphc.compiler.extended import ExtendedModel
from morphc.errors import MorphcError
from morphc.ir.branch import BypassBranch
from morphc.ir.example_inputs import ExampleInputs
from morphc.ir.tags import DEEP_PREFIX, GROWN_PREFIX
from morphc.passes.widen_layer import widenable_pairs
from morphc.space.architecture import architecture_hash
from morphc.space.move_base import Move, graph_of, private_copy
from morphc.space.moves import (
    MoveError,
    Widen,
    dropout_between,
)

if TYPE_CHECKING:
    from morphc.space.search import SearchResult, Strategy

TrainFn = Callable[[nn.Module, int], Any]     # train the module in place for n steps
EvalFn = Callable[[nn.Module], float]         # a score, higher is better (e.g. val accuracy)


def function_change(before: nn.Module, after: nn.Module, inputs: tuple) -> dict[str, float]:
    """Relative output change ``max|a − b| / max|a|`` between two modules, ``{"eval": ...,
    "train": ...}`` (train mode: BatchNorm uses batch statistics), without side effects on
    buffers or the RNG."""
    change = {}
    modes = (before.training, after.training)
    try:
        for mode in ("eval", "train"):
            outputs = []
            for module in (before, after):
                module.train(mode == "train")
                outputs.append(_forward(module, inputs, mode, module is before))
            change[mode] = relative_deviation(*outputs)
    finally:
        before.train(modes[0])
        after.train(modes[1])
    return change


def _forward(module: nn.Module, inputs, mode: str, source: bool):
    """One measured forward. The unchanged architecture failing here is not a move's fault:
    typically BatchNorm in train mode on an example batch of one, or a module converted after
    the space was made; say so instead of passing torch's error on."""
    try:
        return deterministic_forward(module, tuple(inputs), kwargs=getattr(inputs, "kwargs", None))
    except Exception as exc:
        if not source:
            raise
        raise MoveError(
            f"the architecture the move starts from fails on the example inputs in {mode} mode "
            f"({type(exc).__name__}: {str(exc).strip()[:200]}), so no move can be measured; "
            "give ModelSpace example inputs it runs on in both modes (a batch of at least 2 "
            "for BatchNorm), in the dtype and device of the model") from exc


def _refusal_advice(move, source: nn.Module, change: dict[str, float], tolerance: float) -> str:
    """What to do about a refused move — only advice that would work."""
    gm = graph_of(source)
    if isinstance(move, Widen) and isinstance(gm, fx.GraphModule) and change["eval"] <= tolerance:
        second = move.second or next((s for f, s in widenable_pairs(gm) if f == move.first), None)
        if second is not None and dropout_between(gm, move.first, second):
            return (f"A dropout between {move.first} and {second} draws independent masks for "
                    "the copied units, so widening there changes the train-mode function and "
                    "no tolerance makes it exact: widen another layer, or set that dropout's "
                    "p to 0.")
    dtypes = {p.dtype for p in source.parameters()}
    if dtypes & {torch.float16, torch.bfloat16}:
        return ("The model is in low precision: compare in float32 (module.float()) or raise "
                "ModelSpace(tolerance=...) to the rounding of that dtype.")
    return "A function-preserving move should not do this: please report it with the model."


def summarize(module: nn.Module, limit: int = 72) -> str:
    """A one-line sketch of the layers, e.g. ``L64-8 relu L8-10 +res8`` (for tables, DOT)."""
    gm = graph_of(module)
    parts = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            parts.append(f"L{m.in_features}-{m.out_features}")
        elif isinstance(m, nn.modules.conv._ConvNd):
            parts.append(f"C{m.in_channels}-{m.out_channels}k{m.kernel_size[0]}")
        elif isinstance(m, BypassBranch):
            tag = {DEEP_PREFIX: "res", GROWN_PREFIX: "br"}.get(node.target.split(".")[0], "ext")
            parts.append(f"+{tag}{m.width}")
        else:
            parts.append(type(m).__name__.lower()[:6])
    text = " ".join(parts) or f"{len(gm.graph.nodes)} nodes"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_count(value, what: str, minimum: int = 0) -> int:
    """A step count or budget: an int ≥ ``minimum`` (a float, None or a negative count would
    fail later with an untyped error, or loop, or be reported as negative steps)."""
    if type(value) is not int or value < minimum:
        raise MoveError(f"{what} must be an int ≥ {minimum}, got {value!r}")
    return value


def score_value(value, node: str) -> float:
    """What ``evaluate`` returned, as a float: a real number or a one-element tensor. A string
    or None is refused rather than converted, so a wrong return value is not taken as a score."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise MoveError(f"evaluate returned {value!r} ({type(value).__name__}) for node {node}; it "
                    "must return a real number, higher is better (e.g. -validation_loss)")


def _better(score: float, than: float) -> bool:
    """``score > than`` where NaN is worse than any number: a child whose training diverged
    must not become the best (NaN compares false with everything, so it would stick)."""
    return not math.isnan(score) and (math.isnan(than) or score > than)


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in graph_of(module).parameters())


class ModelSpace:
    """Architectures reachable from ``model`` by function-preserving moves (see module doc).

    The space works on a private copy: the user's model is never trained or modified. Node
    attributes: ``module``, ``steps`` (training steps its weights have had), ``score`` (latest),
    ``scores`` (``[steps, score]`` history), ``params``, ``summary``, ``kind``, ``visits``. Edge
    attributes: ``move`` (text), ``spec`` (JSON-able), ``change`` / ``change_train`` (measured
    relative output change in eval / train mode), ``count``.
    Reaching an architecture again (e.g. Extend then Contract) updates that node's module.

    Inputs as for ``morphc.extend``: positional ``example_inputs``, keyword ``kwargs``
    (``attention_mask=``, ``use_cache=False``), torch.export's ``dynamic_shapes``; every move and
    every measurement uses all of them (``space.example_inputs`` carries them, see
    :class:`~morphc.ir.example_inputs.ExampleInputs`).
    """

    @torch.inference_mode(False)   # the space trains its copies: no inference tensors
    def __init__(self, model: nn.Module, example_inputs, *, kwargs=None, dynamic_shapes=None,
                 tolerance: float = 1e-6, train_tolerance: float = 1e-4) -> None:
        for name, value in (("tolerance", tolerance), ("train_tolerance", train_tolerance)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or \
                    not value >= 0:   # a NaN or negative tolerance refuses every move
                raise MoveError(f"ModelSpace: {name} must be a number ≥ 0 (a relative output "
                                f"change), got {value!r}")
        self.example_inputs = ExampleInputs.of(example_inputs, kwargs, dynamic_shapes)
        self.tolerance, self.train_tolerance = float(tolerance), float(train_tolerance)
        self.graph = nx.DiGraph()
        self.steps_spent = 0
        self.rejected: list[dict] = []
        self._best: tuple[float, str, nn.Module] | None = None
        self.root = self._record(private_copy(model, self.example_inputs), steps=0)

    def module(self, node: str | None = None) -> nn.Module:
        """The module (current weights) of ``node`` (default: the root)."""
        return self._attrs(node)["module"]

    def _attrs(self, node: str | None) -> dict:
        node = self.root if node is None else node
        if not isinstance(node, str) or node not in self.graph:
            nodes = ", ".join(list(self.graph)[:10])
            raise MoveError(f"no node {node!r} in this space; nodes are architecture hashes "
                            f"as apply returns them ({nodes})")
        return self.graph.nodes[node]

    def _record(self, module: nn.Module, steps: int) -> str:
        node = architecture_hash(module)
        attrs = dict(module=module, steps=steps, score=None, params=_parameter_count(module),
                     summary=summarize(module),
                     kind="extended" if isinstance(module, ExtendedModel) else "graph")
        if node in self.graph:
            self.graph.nodes[node].update(attrs)
            self.graph.nodes[node]["visits"] += 1
        else:
            self.graph.add_node(node, scores=[], visits=1, order=len(self.graph), **attrs)
        return node

    def _reject(self, parent: str, move: Move, reason: str) -> None:
        self.rejected.append({"from": parent, "move": str(move), "reason": reason})

    def apply(self, move: Move, node: str | None = None) -> str:
        """Apply ``move`` to ``node`` (default root); return the new node.

        The function change is measured on the example inputs. In eval mode — the function the
        model computes — it must be ≤ ``tolerance`` (1e-6: float32 rounding). In train mode it
        must be ≤ ``train_tolerance`` (1e-4): BatchNorm's batch statistics over a small example
        batch amplify the same rounding (measured 1.3e-6 for Contract on ``zoo.resnet_small``
        with batch 2), while a real bug changes the output by orders of magnitude more. Above
        either, the move is refused with ``MoveError`` and the space is left as it was (every
        move works on a copy: nothing to roll back). Refusals are listed in ``space.rejected``.
        """
        if not isinstance(move, Move):
            raise MoveError(f"apply needs a move instance such as Widen('fc1', to=64) or "
                            f"Grow(sites='all'), got {move!r}")
        parent = node or self.root
        source = self.module(parent)
        start = time.perf_counter()
        try:
            child = move(source, self.example_inputs)
            change = function_change(source, child, self.example_inputs)
        except MorphcError as exc:
            self._reject(parent, move, str(exc))
            raise
        if not (change["eval"] <= self.tolerance and change["train"] <= self.train_tolerance):
            reason = (f"{move} changed the function by {change['eval']:.3g} in eval mode and "
                      f"{change['train']:.3g} in train mode (tolerances {self.tolerance:g}, "
                      f"{self.train_tolerance:g}); refused, the space is unchanged. "
                      + _refusal_advice(move, source, change, self.tolerance))
            self._reject(parent, move, reason)
            raise MoveError(reason)
        child_node = self._record(child, self.graph.nodes[parent]["steps"])
        previous = self.graph.get_edge_data(parent, child_node) or {}
        self.graph.add_edge(parent, child_node, move=str(move), spec=move.describe(),
                            change=change["eval"], change_train=change["train"],
                            seconds=time.perf_counter() - start,
                            count=previous.get("count", 0) + 1,
                            order=previous.get("order", self.graph.number_of_edges()))
        return child_node

    def train(self, node: str, train: TrainFn, steps: int) -> None:
        """Train ``node``'s module in place for ``steps`` steps (counted in ``steps_spent``)."""
        check_count(steps, "steps")
        module = self.module(node)
        module.train()
        train(module, steps)
        self.graph.nodes[node]["steps"] += steps
        self.steps_spent += steps

    def evaluate(self, node: str, evaluate: EvalFn) -> float:
        """Score ``node``'s current weights; the best scored weights are kept (``best()``). A NaN
        score is recorded but ranks below every number."""
        module = self.module(node)
        module.eval()
        score = score_value(evaluate(module), node)
        attrs = self.graph.nodes[node]
        attrs["score"] = score
        attrs["scores"].append([attrs["steps"], score])
        if self._best is None or _better(score, self._best[0]):
            self._best = (score, node, copy.deepcopy(module))
        return score

    def best(self) -> tuple[str, nn.Module, float]:
        """``(node, module, score)`` of the best weights ever evaluated (a snapshot)."""
        if self._best is None:
            raise MoveError("nothing was evaluated yet: call space.evaluate or space.search")
        score, node, module = self._best
        return node, module, score

    def neighbors(self, node: str | None = None, **options) -> list[Move]:
        """Candidate moves from ``node`` (``morphc.space.search.neighborhood`` options)."""
        from morphc.space.search import NEIGHBORHOOD_OPTIONS, check_options, neighborhood

        return neighborhood(self.module(node), **check_options(
            options, (*NEIGHBORHOOD_OPTIONS, "seed")))

    def search(self, train: TrainFn, evaluate: EvalFn, budget: int,
               strategy: Strategy | None = None) -> SearchResult:
        """Run ``strategy`` (default :class:`HillClimb`) for ``budget`` training steps."""
        check_count(budget, "budget")
        start, spent = time.perf_counter(), self.steps_spent
        from morphc.space.search import HillClimb, SearchResult

        node = (strategy or HillClimb())(self, train, evaluate, budget)
        return SearchResult(node, self.module(node), self.graph.nodes[node]["score"],
                            self.steps_spent - spent, time.perf_counter() - start)

    def to_json(self) -> dict:
        from morphc.space.space_files import space_to_json
        return space_to_json(self)

    def to_dot(self) -> str:
        from morphc.space.space_files import space_to_dot
        return space_to_dot(self)

    @classmethod
    def load(cls, directory, example_inputs, *, kwargs=None, dynamic_shapes=None) -> ModelSpace:
        """The space ``space.save(directory, weights="all")`` wrote, every node with its weights;
        the example inputs are not saved (pass them as to ``ModelSpace``). The files are data:
        see :mod:`morphc.space.space_loading`."""
        from morphc.space.space_loading import load_space
        return load_space(directory, example_inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes)

    def save(self, directory, *, weights: str = "best") -> dict:
        """Write ``space.json``, ``space.dot`` (+ ``space.svg`` with Graphviz) and the best
        architecture (``best.json`` / ``best.pt`` / ``best.py``); see ``morphc.space.saving``."""
        from morphc.space.space_files import save_space
        return save_space(self, directory, weights=weights)
