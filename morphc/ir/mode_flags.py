"""A symbolically traced graph that follows ``.train()`` / ``.eval()`` where the forward reads
``self.training`` as a plain boolean (``F.dropout(x, p, self.training)``)."""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import fx, nn


def follow_mode(graph: fx.Graph, model: nn.Module, retrace: Callable[[], fx.Graph]
                ) -> list[str]:
    """symbolic_trace reads ``self.training`` as a constant (``F.dropout(x, p, self.training)``),
    so the graph would keep the mode it was traced in after ``ext.eval()``. Trace again with
    every module's mode flipped; where the two graphs differ only in such booleans, read the
    graph module's own ``training`` flag there instead (which ``.train()`` / ``.eval()`` set).
    Otherwise the graph keeps the traced mode, and the returned note says so. ``retrace``
    traces ``model`` again the way ``graph`` was traced."""
    flags = {m: m.training for m in model.modules()}
    mode, other_mode = ("train", "eval") if model.training else ("eval", "train")
    kept = [f"the forward computes another graph in {other_mode} mode (it branches on "
            f"self.training): the graph keeps the {mode} mode's; extend the model in the mode "
            "you will call it in"]
    try:
        for module, flag in flags.items():
            module.training = not flag
        flipped = retrace()
    except Exception:           # the other mode does not trace: keep the graph as it is
        return kept
    finally:
        for module, flag in flags.items():
            module.training = flag
    nodes, others = list(graph.nodes), list(flipped.nodes)
    if len(nodes) != len(others):
        return kept
    found: list[tuple[fx.Node, list]] = []
    for node, other in zip(nodes, others, strict=True):
        if (node.op, node.target, node.name) != (other.op, other.target, other.name):
            return kept
        paths: list = []
        if not _same_but_mode(node.args, other.args, ("args",), paths) or \
                not _same_but_mode(node.kwargs, other.kwargs, ("kwargs",), paths):
            return kept
        if paths:
            found.append((node, paths))
    if not found:
        return []
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        training = graph.get_attr("training")
        not_training = graph.call_function(operator.not_, (training,))
    for node, paths in found:
        for path in paths:
            value = _get_path(node, path)
            _set_path(node, path, training if value == model.training else not_training)
    if not not_training.users:
        graph.erase_node(not_training)
    return []


def _same_but_mode(a, b, path: tuple, paths: list) -> bool:
    """``a`` and ``b`` (a node's arguments in the two traces) are equal but for booleans that
    flipped with the mode, whose paths are appended to ``paths``."""
    if isinstance(a, bool) and isinstance(b, bool):
        if a != b:
            paths.append(path)
        return True
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(
            _same_but_mode(x, y, (*path, i), paths)
            for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_but_mode(a[k], b[k], (*path, k), paths) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _get_path(node: fx.Node, path: tuple):
    value = {"args": node.args, "kwargs": node.kwargs}
    for key in path:
        value = value[key]
    return value


def _set_path(node: fx.Node, path: tuple, new) -> None:
    def put(container, keys):
        if not keys:
            return new
        head, rest = keys[0], keys[1:]
        if isinstance(container, dict):
            return {**container, head: put(container[head], rest)}
        items = list(container)
        items[head] = put(items[head], rest)
        return type(container)(items)

    where, rest = path[0], path[1:]
    if where == "args":
        node.args = put(node.args, rest)
    else:
        node.kwargs = put(node.kwargs, rest)
