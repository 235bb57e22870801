"""The one contract every pass follows, and a manager that checks each pass and names culprits.

A pass is a callable ``(graph_module, *args) -> PassResult``. After it runs, the manager lints the
graph and recompiles it; on failure it raises ``PassError`` naming the pass and those before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from morphc.errors import MorphcError, PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    info: Any = None


def run_pass(pass_fn: Callable[..., PassResult], gm: fx.GraphModule, *args,
             history: tuple[str, ...] = (), **kwargs) -> PassResult:
    """Run one pass, then ``graph.lint()`` and ``recompile()``; failures name the pass."""
    name = getattr(pass_fn, "__name__", repr(pass_fn))
    try:
        result = pass_fn(gm, *args, **kwargs)
        if result.modified:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
    except MorphcError:
        raise
    except Exception as exc:
        before = ", ".join(history) or "none"
        raise PassError(f"pass {name!r} failed (passes run before it: {before}): {exc}") from exc
    return result


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
