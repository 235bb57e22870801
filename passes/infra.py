"""The one contract every pass follows, and the pipeline that runs passes.

A pass is a function ``(graph_module, *args) -> PassResult``. **Rule: a pass rewrites the graph
module it is given, in place**, and says whether it changed it; a caller that needs the graph as
it was runs the pass on ``Pipeline.fork()``. Analyses (``find_sites``) change nothing but tags and
return a typed result in ``PassResult.analysis``.

A :class:`Pipeline` owns one graph module. After each pass it lints and recompiles the graph,
checks the pass's declared postcondition (``@graph_pass(ensures=...)``), records the pass in
``history``, and on failure raises ``PassError`` naming the pass and those run before it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import fx

from morphc.errors import MorphcError, PassError
from morphc.ir.tags import Role, tag

T = TypeVar("T")


@dataclass
class PassResult(Generic[T]):
    graph_module: fx.GraphModule
    modified: bool
    analysis: T | None = None


Check = Callable[[fx.GraphModule], str | None]   # None: fine; otherwise what is wrong


def graph_pass(ensures: Check | None = None):
    """Mark a function as a pass with an optional postcondition the pipeline checks."""
    def mark(fn):
        fn.ensures = ensures
        return fn
    return mark


class Pipeline:
    """Runs passes on one graph module, with history, lint, recompile and invariant checks.

    >>> pipeline = Pipeline(gm)                                   # doctest: +SKIP
    >>> table = pipeline.run(find_sites).analysis                 # doctest: +SKIP
    """

    def __init__(self, graph_module: fx.GraphModule, history: tuple[str, ...] = ()) -> None:
        self.graph_module = graph_module
        self.history: list[str] = list(history)

    def run(self, pass_fn: Callable[..., PassResult], *args, **kwargs) -> PassResult:
        name = getattr(pass_fn, "__name__", repr(pass_fn))
        try:
            result = pass_fn(self.graph_module, *args, **kwargs)
            if result.graph_module is not self.graph_module:
                raise PassError(f"pass {name!r} returned another graph module; passes rewrite "
                                "the one they are given (use Pipeline.fork to keep a copy)")
            if result.modified:
                self.graph_module.graph.lint()
                self.graph_module.recompile()
            problem = getattr(pass_fn, "ensures", None) and pass_fn.ensures(self.graph_module)
            if problem:
                raise PassError(f"after pass {name!r}: {problem}")
        except MorphcError as exc:
            if isinstance(exc, PassError):
                raise
            raise type(exc)(f"{exc} (in pass {name!r})") from exc
        except Exception as exc:
            before = ", ".join(self.history) or "none"
            raise PassError(f"pass {name!r} failed (passes run before it: {before}): "
                            f"{type(exc).__name__}: {exc}") from exc
        self.history.append(name)
        return result

    def fork(self) -> Pipeline:
        """A pipeline over a copy of the graph (sharing submodules and parameters), same
        history: what runs on the fork leaves this graph as it is."""
        return Pipeline(copy_graph_module(self.graph_module), tuple(self.history))


def copy_graph_module(gm: fx.GraphModule,
                      replace: Callable[[fx.Node], fx.Node | None] = lambda node: None,
                      ) -> fx.GraphModule:
    """A new GraphModule with a copied graph that shares ``gm``'s submodules and parameters.

    ``replace(node)`` may return another (earlier) node that stands in for ``node``: ``node`` is
    then not copied and its users read the stand-in.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        stand_in = replace(node)
        if stand_in is not None:
            env[node] = env[stand_in]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph._codegen = gm.graph._codegen
    copied = fx.GraphModule(gm, graph, gm.__class__.__name__)
    copied.meta = dict(getattr(gm, "meta", {}))
    return copied


def remove_nodes(gm: fx.GraphModule, stand_in: Callable[[fx.Node], fx.Node | None]) -> bool:
    """Remove, in place, every node for which ``stand_in(node)`` names an earlier node; its users
    read the stand-in instead. Returns whether anything was removed."""
    doomed = []
    for node in list(gm.graph.nodes):    # in order, so a stand-in is already final when read
        other = stand_in(node)
        if other is not None:
            node.replace_all_uses_with(other)
            doomed.append(node)
    for node in reversed(doomed):
        gm.graph.erase_node(node)
    return bool(doomed)


def insert_added_call(gm: fx.GraphModule, node: fx.Node, target: str, source: fx.Node,
                      roles: tuple[Role, Role], site: str | None = None) -> tuple[fx.Node, fx.Node]:
    """Rewire every user of ``node`` to read ``node + target(source)``, in place; returns the
    (call, add) nodes, tagged with ``roles`` and carrying ``node``'s shape metadata.

    The one way morphc adds a branch or a residual block next to an existing node: the new add
    is the only new user of ``node``, and the branch reads ``source`` (``node``'s input for a
    site branch, ``node`` itself for a residual block)."""
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(target, (source,))
    with gm.graph.inserting_after(call):
        add = gm.graph.call_function(operator.add, (node, call))
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user not in (call, add))
    for new, role in zip((call, add), roles, strict=True):
        tag(new, role, site)
        for key in ("tensor_meta", "val"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    return call, add


def fresh_name(gm: fx.GraphModule, prefix: str, base: str) -> str:
    """``prefix.base`` (dots in ``base`` become ``_``), numbered if that submodule exists."""
    base = base.replace(".", "_")
    for i in range(len(list(gm.modules())) + 1):
        name = f"{prefix}.{base}" if i == 0 else f"{prefix}.{base}_{i}"
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
    raise AssertionError("unreachable: more candidate names than submodules")


def delete_submodules(gm: fx.GraphModule, targets) -> None:
    """Delete submodules no node calls any more, and the containers they leave empty."""
    for target in dict.fromkeys(targets):
        gm.delete_submodule(target)
        parent = target.rpartition(".")[0]
        while parent and not list(gm.get_submodule(parent).children()):
            gm.delete_submodule(parent)
            parent = parent.rpartition(".")[0]
