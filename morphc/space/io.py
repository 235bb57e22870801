"""Saving and loading architectures and explored spaces — without executing saved code.

An architecture is stored as three files sharing a prefix:

- ``<prefix>.json``: the fx graph as data — nodes (op, target, args/kwargs with ``{"node": name}``
  references) and a constructor spec per submodule (a class from an allow-list of ``torch.nn``
  modules plus morphc's ``BypassBranch``, and its constructor arguments);
- ``<prefix>.pt``: the ``state_dict``, loaded with ``torch.load(..., weights_only=True)``;
- ``<prefix>.py``: ``gm.code``, for humans only: :func:`load` never reads it.

Loading rebuilds the ``fx.Graph`` node by node. Functions resolve through an allow-list
(``operator`` arithmetic, ``torch`` tensor ops, ``torch.nn.functional``, ``torch.ops.aten``),
method and attribute names must be public ``torch.Tensor`` members, targets must be dotted
identifiers; anything else is a :class:`FormatError`. fx then generates the forward from that
validated graph, as for any traced model — no saved string is ever passed to ``eval``/``exec``.

>>> import torch
>>> from morphc.space.moves import private_copy
>>> gm = private_copy(torch.nn.Sequential(torch.nn.Linear(3, 2)), (torch.randn(1, 3),))
>>> graph_from_json(graph_to_json(gm)).get_submodule("0")
Linear(in_features=3, out_features=2, bias=True)
"""

from __future__ import annotations

import functools
import inspect
import json
import keyword
import math
import operator
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import FormatError
from morphc.ir.branch import BypassBranch
from morphc.ir.dot import dot_string, graphviz_available, render
from morphc.ir.sites import ConvConfig

GRAPH_FORMAT, SPACE_FORMAT, VERSION = "morphc.graph", "morphc.space", 1
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_0-9][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*")
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
ALLOWED_MODULES = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.Embedding, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softmax,
    nn.LogSoftmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_MODULE_CLASSES = {f"torch.nn.{cls.__name__}": cls for cls in ALLOWED_MODULES}
_BRANCH_CLASS = "morphc.BypassBranch"
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos",
              "abs", "getitem", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor",
              "invert", "iadd", "isub", "imul", "itruediv")
_DENIED = {"from_file", "load", "save"}       # file access, even though they are torch ops
TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag",
                     "is_cuda", "layout"}


# -- the function allow-list ------------------------------------------------------------------
@functools.cache
def allowed_functions() -> dict[str, object]:
    """Qualified name → callable, for every function a saved graph may call."""
    table: dict[str, object] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    table["builtins.getattr"] = getattr
    for name in ("sqrt", "floor", "ceil", "exp", "log"):
        table[f"math.{name}"] = getattr(math, name)
    for name in dir(F):
        fn = getattr(F, name)
        if not name.startswith("_") and (inspect.isfunction(fn) or inspect.isbuiltin(fn)):
            table[f"torch.nn.functional.{name}"] = fn
    for name in [*dir(torch._C._VariableFunctions), *torch.functional.__all__]:
        fn = getattr(torch, name, None)
        if not name.startswith("_") and name not in _DENIED and callable(fn) \
                and not isinstance(fn, type):
            table[f"torch.{name}"] = fn
    return table


@functools.cache
def _names_by_id() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, fn in allowed_functions().items():
        names.setdefault(id(fn), name)
    return names


def function_name(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        return f"torch.ops.{fn.name().replace('::', '.')}.{fn._overloadname}"
    name = _names_by_id().get(id(fn))
    if name is None:
        raise FormatError(f"function {fn!r} is not in the allow-list of functions a saved graph "
                          "may call (operator arithmetic, torch ops, torch.nn.functional, "
                          "torch.ops.aten); wrap it in an allowed nn.Module or open an issue")
    return name


def resolve_function(name: str):
    """Callable for an allow-listed name; ``torch.ops.aten.<op>.<overload>`` by lookup."""
    parts = name.split(".")
    if parts[:3] == ["torch", "ops", "aten"] and len(parts) == 5 \
            and all(_IDENTIFIER.fullmatch(p) for p in parts[3:]) and parts[3] not in _DENIED:
        try:
            return getattr(getattr(torch.ops.aten, parts[3]), parts[4])
        except AttributeError:
            pass
    fn = allowed_functions().get(name)
    if fn is None:
        raise FormatError(f"function {name!r} is not allowed in a saved graph")
    return fn


# -- arguments ----------------------------------------------------------------------------------
def encode_arg(value):
    """A node argument as JSON: nodes by name, tuples/slices/dtypes tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [encode_arg(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode_arg(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[k, encode_arg(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_arg(v) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise FormatError(f"cannot store argument {value!r} ({type(value).__name__}) as data")


def decode_arg(value, env: dict[str, fx.Node]):
    if isinstance(value, list):
        return [decode_arg(v, env) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise FormatError(f"unexpected argument {value!r}")
    if len(value) != 1:
        raise FormatError(f"unexpected argument {value!r}")
    tag, inner = next(iter(value.items()))
    if tag == "node":
        if inner not in env:
            raise FormatError(f"argument refers to node {inner!r} before it is defined")
        return env[inner]
    if tag == "tuple":
        return tuple(decode_arg(v, env) for v in inner)
    if tag == "dict":
        return {str(k): decode_arg(v, env) for k, v in inner}
    if tag == "slice":
        return slice(*(decode_arg(v, env) for v in inner))
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "torch" and isinstance(getattr(torch, str(inner), None),
                                     torch.dtype | torch.memory_format | torch.layout):
        return getattr(torch, inner)
    if tag == "device":
        return torch.device(str(inner))
    if tag == "ellipsis":
        return Ellipsis
    raise FormatError(f"unexpected argument {value!r}")


# -- submodules ---------------------------------------------------------------------------------
def _constructor_kwargs(module: nn.Module) -> dict:
    """Constructor arguments read back from the attributes torch.nn modules keep them in."""
    kwargs = {}
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name in ("self", "device", "dtype") or name.startswith("_") or \
                param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in ("bias", "elementwise_affine") and not isinstance(getattr(module, name, 0),
                                                                    bool):
            kwargs[name] = getattr(module, name, None) is not None
        elif hasattr(module, name):
            kwargs[name] = encode_arg(getattr(module, name))
    return kwargs


def module_spec(module: nn.Module) -> dict:
    """``{"class", "kwargs", "dtype", "training"}``; verified by rebuilding the module."""
    if type(module) is BypassBranch:
        spec = {"class": _BRANCH_CLASS, "kwargs": dict(
            kind=module.kind, in_features=module.in_features, out_features=module.out_features,
            width=module.width, family=module.family_name, with_bias=module.a is not None,
            conv=asdict(module.conv) if module.conv else None),
            "homotopy": float(module.homotopy)}
    elif f"torch.nn.{type(module).__name__}" in _MODULE_CLASSES and \
            _MODULE_CLASSES[f"torch.nn.{type(module).__name__}"] is type(module):
        spec = {"class": f"torch.nn.{type(module).__name__}",
                "kwargs": _constructor_kwargs(module)}
    else:
        raise FormatError(f"submodule class {type(module).__module__}.{type(module).__name__} "
                          f"is not in the allow-list ({', '.join(sorted(_MODULE_CLASSES))}, "
                          f"{_BRANCH_CLASS}); only those can be rebuilt from data")
    floating = [t for t in module.state_dict().values() if t.is_floating_point()]
    spec["dtype"] = str(floating[0].dtype).removeprefix("torch.") if floating else None
    spec["training"] = module.training
    rebuilt = build_module(json.loads(json.dumps(spec)))
    if _signature(rebuilt) != _signature(module):
        raise FormatError(f"{type(module).__name__} could not be described by its constructor "
                          f"arguments ({_signature(module)} rebuilt as {_signature(rebuilt)})")
    return spec


def _signature(module: nn.Module) -> tuple:
    return (module.extra_repr(), [(k, tuple(v.shape), v.dtype) for k, v in
                                  module.state_dict().items()])


def build_module(spec: dict) -> nn.Module:
    """A fresh module from a spec (weights come from the state_dict afterwards)."""
    name = spec.get("class")
    kwargs = dict(spec.get("kwargs", {}))
    conv = kwargs.pop("conv", None) if name == _BRANCH_CLASS else None
    kwargs = {k: decode_arg(v, {}) for k, v in kwargs.items()}
    if name == _BRANCH_CLASS:
        if conv is not None:
            conv = ConvConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in conv.items()})
        homotopy = torch.tensor(float(spec.get("homotopy", 1.0)))
        module = BypassBranch(homotopy=homotopy, conv=conv, **kwargs)
    elif name in _MODULE_CLASSES:
        module = _MODULE_CLASSES[name](**kwargs)
    else:
        raise FormatError(f"submodule class {name!r} is not allowed in a saved graph")
    dtype = spec.get("dtype")
    if dtype is not None:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise FormatError(f"unknown dtype {dtype!r}")
        module = module.to(getattr(torch, dtype))
    return module.train(bool(spec.get("training", False)))


# -- graphs -------------------------------------------------------------------------------------
def _owner(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def graph_to_json(module: nn.Module) -> dict:
    """The architecture as data (no weights). An ``ExtendedModel`` is stored as its graph, which
    loads as a standalone architecture with the branches as submodules (as ``Grow`` makes it)."""
    gm = module.graph_module if isinstance(module, ExtendedModel) else module
    if not isinstance(gm, fx.GraphModule):
        raise FormatError(f"save needs a torch.fx.GraphModule, got {type(gm).__name__}; "
                          "trace it first (morphc.trace or a ModelSpace move)")
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise FormatError("this graph uses a custom code generator (torch.export's pytree "
                          "calling convention); only symbolic_trace-style graphs can be stored "
                          "as data — save its state_dict and rebuild the model instead")
    nodes, modules, tensors = [], {}, {}
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else function_name(node.target)
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": encode_arg(tuple(node.args)),
                      "kwargs": encode_arg(dict(node.kwargs))})
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
    return {"format": GRAPH_FORMAT, "version": VERSION, "class_name": type(gm).__name__,
            "training": gm.training, "nodes": nodes, "modules": modules, "tensors": tensors}


def _check_target(op: str, target) -> None:
    if not isinstance(target, str):
        raise FormatError(f"{op} target must be a string, got {target!r}")
    if op == "placeholder" and (not _IDENTIFIER.fullmatch(target) or keyword.iskeyword(target)
                                or target == "self"):
        raise FormatError(f"placeholder name {target!r} is not an identifier")
    if op in ("get_attr", "call_module") and not _DOTTED.fullmatch(target):
        raise FormatError(f"{op} target {target!r} is not a dotted identifier")
    if op == "call_method" and (target.startswith("_") or not _IDENTIFIER.fullmatch(target)
                                or not hasattr(torch.Tensor, target)):
        raise FormatError(f"method {target!r} is not a public torch.Tensor method")


def _node_from_json(graph: fx.Graph, spec: dict, env: dict[str, fx.Node], known: set[str]):
    op, target, name = spec.get("op"), spec.get("target"), spec.get("name")
    if op not in _OPS or not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise FormatError(f"invalid node {spec!r}")
    args = decode_arg(spec.get("args", {"tuple": []}), env)
    kwargs = decode_arg(spec.get("kwargs", {"dict": []}), env)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise FormatError(f"node {name}: args must be a tuple and kwargs a dict")
    if op == "call_function":
        target = resolve_function(target)
        if target is getattr and not (len(args) == 2 and args[1] in TENSOR_ATTRIBUTES):
            raise FormatError(f"node {name}: getattr may only read {sorted(TENSOR_ATTRIBUTES)}")
    elif op != "output":
        _check_target(op, target)
        if op in ("get_attr", "call_module") and target not in known:
            raise FormatError(f"node {name} refers to {target!r}, which the file does not define")
    node = graph.create_node(op, target, args, kwargs, name=name)
    env[name] = node
    return node


def graph_from_json(data: dict) -> fx.GraphModule:
    """Rebuild the architecture (fresh weights: load the state_dict next). Validates everything
    it reads; raises ``FormatError`` on anything outside the allow-lists."""
    if data.get("format") != GRAPH_FORMAT or data.get("version") != VERSION:
        raise FormatError(f"not a {GRAPH_FORMAT} v{VERSION} file")
    root: dict[str, object] = {}
    for target, spec in data.get("modules", {}).items():
        _check_target("call_module", target)
        root[target] = build_module(spec)
    for target, spec in data.get("tensors", {}).items():
        _check_target("get_attr", target)
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise FormatError(f"unknown dtype {spec['dtype']!r}")
        tensor = torch.zeros([int(d) for d in spec["shape"]], dtype=dtype)
        root[target] = nn.Parameter(tensor, bool(spec.get("requires_grad", True))) \
            if spec.get("parameter") else tensor
    graph, env = fx.Graph(), {}
    for spec in data.get("nodes", []):
        _node_from_json(graph, spec, env, set(root))
    graph.lint()
    name = str(data.get("class_name", "GraphModule"))
    gm = fx.GraphModule(root, graph, name if _IDENTIFIER.fullmatch(name) else "GraphModule")
    gm.training = bool(data.get("training", False))
    return gm


def save(module: nn.Module, prefix) -> dict[str, Path]:
    """Write ``<prefix>.json`` (architecture), ``<prefix>.pt`` (state_dict) and ``<prefix>.py``
    (generated code, for reading). Returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    gm = module.graph_module if isinstance(module, ExtendedModel) else module
    data = graph_to_json(gm)
    paths = {ext: prefix.with_name(prefix.name + f".{ext}") for ext in ("json", "pt", "py")}
    paths["json"].write_text(json.dumps(data, indent=1))
    torch.save(gm.state_dict(), paths["pt"])
    paths["py"].write_text("# Generated by torch.fx, for reading only: morphc.space.io."
                           "load rebuilds the graph from the .json and never runs this "
                           f"file.\n{gm.code}")
    return paths


def load(prefix) -> fx.GraphModule:
    """Rebuild a saved architecture from ``<prefix>.json`` and load ``<prefix>.pt`` with
    ``weights_only=True`` (strict: every key must match)."""
    prefix = Path(prefix)
    data = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    gm = graph_from_json(data)
    state = torch.load(prefix.with_name(prefix.name + ".pt"), weights_only=True)
    gm.load_state_dict(state, strict=True)
    return gm


# -- explored spaces ----------------------------------------------------------------------------
def _architecture(module: nn.Module) -> dict:
    try:
        return graph_to_json(module)
    except FormatError as exc:
        return {"error": str(exc)}


def space_to_json(space) -> dict:
    """Nodes (hash, scores, steps, params, architecture as data) and edges (moves, measured
    change), plus refused moves. Weights are not included (see ``save_space``)."""
    best = space.best()[0] if space._best is not None else None
    nodes = []
    for node, attrs in sorted(space.graph.nodes(data=True), key=lambda item: item[1]["order"]):
        nodes.append({"id": node, **{k: attrs[k] for k in ("order", "kind", "summary", "params",
                                                         "steps", "score", "scores", "visits")},
                      "architecture": _architecture(attrs["module"])})
    edges = [{"source": u, "target": v, **{k: attrs[k] for k in (
        "move", "spec", "change", "change_train", "count", "order")}}
             for u, v, attrs in sorted(space.graph.edges(data=True),
                                       key=lambda item: item[2]["order"])]
    return {"format": SPACE_FORMAT, "version": VERSION, "root": space.root, "best": best,
            "tolerance": space.tolerance, "train_tolerance": space.train_tolerance,
            "steps_spent": space.steps_spent, "nodes": nodes,
            "edges": edges, "rejected": space.rejected}


def space_to_dot(space) -> str:
    """Graphviz DOT: one box per architecture (hash, layers, parameters, steps, score), one
    arrow per move (with the measured function change); root and best are highlighted."""
    best = space.best()[0] if space._best is not None else None
    lines = ["digraph model_space {", "  rankdir=LR;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node, attrs in space.graph.nodes(data=True):
        score = "-" if attrs["score"] is None else f"{attrs['score']:.4f}"
        label = (f"{node[:8]} ({attrs['kind']})\n{attrs['summary']}\n"
                 f"params {attrs['params']}, steps {attrs['steps']}\nscore {score}")
        style = ', style=filled, fillcolor="palegreen"' if node == best else \
            (', style=filled, fillcolor="lightgrey"' if node == space.root else "")
        lines.append(f"  {dot_string(node)} [label={dot_string(label)}{style}];")
    for u, v, attrs in space.graph.edges(data=True):
        label = f"{attrs['move']}\nΔ={attrs['change']:.1e}"
        lines.append(f"  {dot_string(u)} -> {dot_string(v)} [label={dot_string(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_path: Path) -> Path | None:
    """``dot -Tsvg`` when Graphviz is installed; None (nothing written) otherwise."""
    if not graphviz_available():
        return None
    return render(dot_path.read_text(encoding="utf-8"), dot_path.with_suffix(".svg"))


def save_space(space, directory, *, weights: str = "best") -> dict[str, Path]:
    """Write ``space.json``, ``space.dot``, ``space.svg`` (if Graphviz is installed) and the best
    evaluated architecture as ``best.{json,pt,py}``; ``weights="all"`` also writes every node's
    current module as ``nodes/<hash>.{json,pt,py}``."""
    if weights not in ("best", "all", "none"):
        raise ValueError(f"weights must be 'best', 'all' or 'none', got {weights!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "space.json", "dot": directory / "space.dot"}
    paths["json"].write_text(json.dumps(space_to_json(space), indent=1))
    paths["dot"].write_text(space_to_dot(space))
    svg = render_svg(paths["dot"])
    if svg is not None:
        paths["svg"] = svg
    if weights != "none" and space._best is not None:
        for ext, path in save(space.best()[1], directory / "best").items():
            paths[f"best_{ext}"] = path
    if weights == "all":
        for node, attrs in space.graph.nodes(data=True):
            try:
                save(attrs["module"], directory / "nodes" / node)
            except FormatError:
                continue          # listed with its error in space.json
    return paths
