"""An architecture as data: the one encoding of an fx graph as a JSON document (schema
``morphc.graph`` v2: nodes, a constructor spec per submodule, the graph's own tensors, the frozen
parameters; no weights).

Its own module because both sides of a saved file need it and neither may import the other:
``morphc.space.saving`` writes it, and ``morphc.space.loading`` accepts a document only if it is
exactly what this encoding gives back for the graph it builds.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import FormatError
from morphc.ir.traced_model import TracedModel
from morphc.space.codec import encode_arg, module_spec
from morphc.space.schema import function_name

GRAPH_FORMAT, SPACE_FORMAT, VERSION = "morphc.graph", "morphc.space", 2


def check_version(data: dict, expected: str) -> None:
    """``data`` is a ``expected`` file of this ``VERSION``; else a ``FormatError`` that says
    what to do: a newer file needs a newer morphc, an older one re-saving (the format
    changed)."""
    found, version = data["format"], data["version"]
    if found == expected and version == VERSION:
        return
    if found == expected and type(version) is int and version > VERSION:
        advice = (f"it was written by a newer morphc (v{version}); upgrade morphc to load it, "
                  "or save it again with this one")
    elif found == expected and type(version) is int:
        advice = f"it was written by an older morphc (v{version}); save it again with this one"
    else:
        advice = "it is not a file morphc wrote, or was edited"
    raise FormatError(f"not a {expected} v{VERSION} file (format {found!r:.80}, version "
                      f"{version!r:.80}): {advice}")


def _owner(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _encode_node(node: fx.Node, constants: dict | None = None) -> dict:
    target = node.target if isinstance(node.target, str) else function_name(node.target)
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if constants:
        args, kwargs = fx.node.map_arg((args, kwargs), lambda n: constants.get(n, n))
    return {"name": node.name, "op": node.op, "target": target,
            "args": encode_arg(args), "kwargs": encode_arg(kwargs)}


def _mode_reads(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Nodes that read a module's ``training`` flag (``morphc.trace`` makes them for
    ``F.dropout(x, p, self.training)``), and ``not`` of them, with their value now: a saved
    graph is data, so it stores the mode it was saved in, as a plain symbolic_trace would."""
    constants: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.rpartition(".")[2] == "training" and \
                isinstance(_owner(gm, node.target), bool):
            constants[node] = _owner(gm, node.target)
        elif node.op == "call_function" and node.target is operator.not_ and \
                len(node.args) == 1 and node.args[0] in constants:
            constants[node] = not constants[node.args[0]]
    return constants


def graph_to_json(module: nn.Module) -> dict:
    """The architecture as data (no weights). An ``ExtendedModel`` is stored as its graph, which
    loads as a standalone architecture with the branches as submodules (as ``Grow`` makes it)."""
    # what morphc.trace returns holds the graph too (the error below advises tracing)
    gm = module.graph_module if isinstance(module, ExtendedModel | TracedModel) else module
    if not isinstance(gm, fx.GraphModule):
        raise FormatError(f"save needs a graph, got {type(gm).__name__}; trace it first: "
                          "morphc.save(morphc.trace(model, example_inputs), prefix), or save a "
                          "ModelSpace's module (space.module(node))")
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise FormatError("this graph uses a custom code generator (torch.export's pytree "
                          "calling convention); only symbolic_trace-style graphs can be stored "
                          "as data — save its state_dict and rebuild the model instead")
    nodes, modules, tensors = [], {}, {}
    constants = _mode_reads(gm)
    for node in gm.graph.nodes:
        if node in constants:
            continue
        nodes.append(_encode_node(node, constants))
        if node.op == "call_module":
            modules[node.target] = module_spec(gm.get_submodule(node.target))
        elif node.op == "get_attr":
            value = _owner(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise FormatError(f"get_attr {node.target} is a {type(value).__name__}, "
                                  "not a tensor")
            tensors[node.target] = {"parameter": isinstance(value, nn.Parameter),
                                    "requires_grad": value.requires_grad,
                                    "shape": list(value.shape),
                                    "dtype": str(value.dtype).removeprefix("torch.")}
    frozen = sorted(name for name, p in gm.named_parameters() if not p.requires_grad)
    modules = _in_order(modules, [name for name, _ in gm.named_modules()])
    tensors = _in_order(tensors, [name for name, _ in [
        *gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]])
    return {"format": GRAPH_FORMAT, "version": VERSION, "class_name": type(gm).__name__,
            "training": gm.training, "nodes": nodes, "modules": modules, "tensors": tensors,
            "frozen": frozen}


def _in_order(table: dict, order: list[str]) -> dict:
    """``table`` in the model's registration order (so parameters, state_dict keys and optimizer
    indices come back in the same order)."""
    rank = {name: index for index, name in reversed(list(enumerate(order)))}
    return dict(sorted(table.items(), key=lambda item: rank.get(item[0], len(rank))))

