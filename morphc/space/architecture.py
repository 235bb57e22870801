"""The identity of an architecture: its fx graph as a labelled networkx graph, and a structural
hash of it (Weisfeiler-Lehman) under which renaming or retraining a model changes nothing — the
key of a :class:`~morphc.space.graph.ModelSpace` node."""

from __future__ import annotations

import hashlib
import warnings

import networkx as nx
import torch
from torch import fx, nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import TraceError
from morphc.space.move_base import graph_of

_WL_MAX_ITERATIONS = 64


def _qualname(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(fn)
    return f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__qualname__', repr(fn))}"


def _constant(value) -> str:
    """Arguments that are not nodes, canonically (nodes become ``%``: the edges say which)."""
    if isinstance(value, fx.Node):
        return "%"
    if isinstance(value, list | tuple):
        inner = ",".join(_constant(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_constant(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """Op kind + target type + parameter shapes + constant arguments. No node names, module
    paths or weight values: the label describes what is computed, not what it is called."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        shapes = ",".join(f"{n}:{tuple(p.shape)}" for n, p in
                          [*module.named_parameters(), *module.named_buffers()])
        target = f"{type(module).__name__}({module.extra_repr()})[{shapes}]"
    elif node.op == "get_attr":
        value = _attr(gm, node.target)
        target = f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
    elif node.op == "call_function":
        target = _qualname(node.target)
    elif node.op == "call_method":
        target = node.target
    else:                                  # placeholder, output
        target = ""
    return f"{node.op}:{target}:{_constant(node.args)}:{_constant(node.kwargs)}"


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _argument_positions(node: fx.Node) -> dict[fx.Node, list[str]]:
    """Where each input node sits in ``node``'s arguments (``"0"``, ``"1.2"``, ``"dim"``)."""
    positions: dict[fx.Node, list[str]] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, fx.Node):
            positions.setdefault(value, []).append(path)
        elif isinstance(value, list | tuple):
            for i, inner in enumerate(value):
                walk(inner, f"{path}.{i}")
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{path}.{key}")

    for key, arg in [*enumerate(node.args), *node.kwargs.items()]:
        walk(arg, str(key))
    return positions


def architecture_graph(module: nn.Module) -> nx.DiGraph:
    """The fx graph as a labelled networkx graph: edges ``producer → consumer`` labelled with
    the argument position(s), nodes with :func:`_node_label`."""
    gm = graph_of(module)
    graph = nx.DiGraph()
    ids = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node, i in ids.items():
        graph.add_node(i, label=_node_label(gm, node))
        for source, keys in _argument_positions(node).items():
            graph.add_edge(ids[source], i, position=",".join(keys))
    return graph


def architecture_hash(module: nn.Module) -> str:
    """A structural hash: the same architecture gets the same hash in any run or process.

    Weisfeiler-Lehman over the fx graph (networkx), node labels from op kind, target type,
    hyper-parameters (``extra_repr``), parameter/buffer shapes and constant arguments; edge
    labels from argument positions. *Names do not matter*: renaming a module or an fx node keeps
    the hash; weights and dtype do not enter either. An ``ExtendedModel`` (temporary branches)
    hashes differently from the same graph made permanent by ``Grow``.
    """
    if not isinstance(graph_of(module), fx.GraphModule):
        raise TraceError(f"architecture_hash needs a graph, got {type(module).__name__}: pass "
                         "morphc.trace(model, example_inputs).graph_module or a space's module")
    graph = architecture_graph(module)
    iterations = max(1, min(graph.number_of_nodes(), _WL_MAX_ITERATIONS))
    with warnings.catch_warnings():   # networkx ≥ 3.5 warns that directed hashes changed in 3.5
        warnings.simplefilter("ignore", UserWarning)
        wl = nx.weisfeiler_lehman_graph_hash(graph, edge_attr="position", node_attr="label",
                                             iterations=iterations)
    kind = "extended" if isinstance(module, ExtendedModel) else "graph"
    return hashlib.blake2b(f"{kind}:{wl}".encode(), digest_size=8).hexdigest()
