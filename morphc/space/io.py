"""Saving and loading architectures and explored spaces — a saved file is data, never code.

An architecture is stored as three files sharing a prefix:

- ``<prefix>.json``: the fx graph as data (schema ``morphc.graph`` v2) — nodes (op, target,
  args/kwargs with ``{"node": name}`` references), a constructor spec per submodule (a class from
  an allow-list of ``torch.nn`` modules plus morphc's ``BypassBranch``), the graph's own tensors,
  the frozen parameters, and the SHA-256 digests of the architecture and of the weights file;
- ``<prefix>.pt``: the ``state_dict``, loaded with ``torch.load(..., weights_only=True)``;
- ``<prefix>.py``: ``gm.code``, for humans only: :func:`load` never reads it.

Loading validates the whole document before building anything (:func:`validate` is the schema):

- every field is required and strictly typed (``true`` is not ``1``); unknown fields are refused;
  nothing has a default that could change the function (a branch's homotopy, a node's kwargs,
  a module's dtype and mode);
- every identifier (node names, placeholder names, kwargs keys, module and tensor paths, the class
  name) is a plain ASCII Python identifier — not a keyword, no ``__dunder__`` segment, no name of
  an ``nn.Module`` attribute — because torch.fx writes them into the generated ``forward``;
- functions, methods and module classes come from allow-lists; string settings (padding mode,
  ``approximate``, the branch's family and kind) from their allowed values;
- the document must be the canonical encoding of the graph it builds (re-encoding gives the same
  document), so no value is coerced or dropped on the way;
- sizes are checked against the weights file on the meta device before anything is allocated.

Anything else is a :class:`FormatError`. fx then generates the forward from that validated graph,
as for any traced model — no saved string is ever passed to ``eval``/``exec`` or reaches the
generated code except as a validated identifier or a ``repr``'d constant.

>>> import torch
>>> from morphc.space.moves import private_copy
>>> gm = private_copy(torch.nn.Sequential(torch.nn.Linear(3, 2)), (torch.randn(1, 3),))
>>> graph_from_json(graph_to_json(gm)).get_submodule("0")
Linear(in_features=3, out_features=2, bias=True)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import keyword
import math
import operator
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import FormatError, MorphcError
from morphc.families import available_families
from morphc.ir.branch import BypassBranch
from morphc.ir.dot import dot_string, graphviz_available, render
from morphc.ir.kinds import KINDS
from morphc.ir.sites import ConvConfig

GRAPH_FORMAT, SPACE_FORMAT, VERSION = "morphc.graph", "morphc.space", 2
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
# Tensor methods with effects outside the computation (hooks, storage, host memory, callables).
_DENIED_METHODS = {"apply_", "map_", "map2_", "register_hook", "backward", "retain_grad",
                   "register_post_accumulate_grad_hook", "share_memory_", "pin_memory", "numpy",
                   "tolist", "item", "storage", "untyped_storage", "data_ptr", "set_",
                   "resize_", "resize_as_", "record_stream", "to_dlpack"}
TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag",
                     "is_cuda", "layout"}
# The allowed values of every string setting a saved file may carry (module constructor
# arguments, call_function keyword arguments); a module string setting not listed is refused.
STRING_CHOICES = {
    "approximate": {"none", "tanh"},
    "padding_mode": {"zeros", "reflect", "replicate", "circular"},
    "padding": {"same", "valid"},
    "reduction": {"none", "mean", "sum"},
    "mode": {"constant", "reflect", "replicate", "circular", "nearest", "linear", "bilinear",
             "bicubic", "trilinear", "area", "nearest-exact"},
}
# Attribute names an nn.Module/GraphModule already has: a saved path segment may not shadow them.
_RESERVED = set(dir(fx.GraphModule)) | {"training", "graph", "code", "meta", "self"}


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


@functools.cache
def _torch_constants() -> dict[str, object]:
    """``"float32"`` → ``torch.float32``, etc.: the dtypes, memory formats and layouts by their
    canonical names (aliases like ``"float"`` are not canonical and are refused)."""
    table = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
            table.setdefault(str(value).removeprefix("torch."), value)
    return table


def function_name(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        return f"torch.ops.{fn.name().replace('::', '.')}.{fn._overloadname}"
    name = _names_by_id().get(id(fn))
    if name is None:
        raise FormatError(f"function {fn!r} is not in the allow-list of functions a saved graph "
                          "may call (operator arithmetic, torch ops, torch.nn.functional, "
                          "torch.ops.aten); wrap it in an allowed nn.Module or open an issue")
    return name


def resolve_function(name) -> object:
    """Callable for an allow-listed name; ``torch.ops.aten.<op>.<overload>`` by lookup."""
    if not isinstance(name, str):
        raise FormatError(f"call_function target must be a string, got {name!r}")
    parts = name.split(".")
    if parts[:3] == ["torch", "ops", "aten"] and len(parts) == 5 \
            and all(is_identifier(p) and not p.startswith("_") for p in parts[3:]) \
            and parts[3] not in _DENIED:
        try:
            op = getattr(getattr(torch.ops.aten, parts[3]), parts[4])
        except (AttributeError, RuntimeError):
            op = None
        if isinstance(op, torch._ops.OpOverload):
            return op
    fn = allowed_functions().get(name)
    if fn is None:
        raise FormatError(f"function {name!r} is not allowed in a saved graph")
    return fn


# -- identifiers --------------------------------------------------------------------------------
def is_identifier(name) -> bool:
    """A plain ASCII Python identifier: not a keyword, no leading double underscore (so no
    ``__dunder__``, no name mangling)."""
    return isinstance(name, str) and name.isascii() and name.isidentifier() \
        and not keyword.iskeyword(name) and not name.startswith("__")


def check_identifier(name, what: str) -> str:
    if not is_identifier(name):
        raise FormatError(f"{what} {name!r} is not a plain Python identifier (ASCII, not a "
                          "keyword, no leading '__'); saved names reach generated code")
    return name


def check_path(path, what: str) -> str:
    """A module/attribute path: dotted identifiers or child indices (``layers.0.linear1``); no
    segment may shadow an ``nn.Module`` / ``GraphModule`` attribute (``forward``, ``__class__``)."""
    segments = path.split(".") if isinstance(path, str) else [None]
    for segment in segments:
        if not (is_identifier(segment) or (isinstance(segment, str) and segment.isascii()
                                           and segment.isdigit())) or segment in _RESERVED:
            raise FormatError(f"{what} {path!r} is not a dotted path of plain identifiers "
                              f"(segment {segment!r}: no keywords, no '__', no nn.Module "
                              "attribute names)")
    return path


# -- strict field access ------------------------------------------------------------------------
def _fields(obj, keys: set[str], where: str) -> dict:
    """``obj`` must be an object with exactly ``keys``: a missing field is an error, never a
    default; an unknown one too (it would be silently ignored)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected an object, got {type(obj).__name__}")
    missing, unknown = sorted(keys - set(obj)), sorted(set(obj) - keys)
    if missing or unknown:
        raise FormatError(f"{where}: missing fields {missing}, unknown fields {unknown}; every "
                          "field is required (no defaults that could change the function)")
    return obj


def _typed(value, types, where: str):
    """Strict JSON typing: ``true`` is not an int, ``1`` is not a float."""
    types = types if isinstance(types, tuple) else (types,)
    if type(value) not in types:
        names = "/".join(t.__name__ for t in types)
        raise FormatError(f"{where}: expected {names}, got {value!r}")
    return value


def _same(a, b) -> bool:
    """Equality that also compares types (``1 != True != 1.0``), for the canonical check."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):     # key order too: it is the order of modules and parameters
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _dtype(name, where: str, *, floating: bool = False) -> torch.dtype:
    value = _torch_constants().get(name) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype) or (floating and not value.is_floating_point):
        raise FormatError(f"{where}: unknown {'floating ' if floating else ''}dtype {name!r}")
    return value


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


def _decode_tagged(tag: str, inner, env: dict[str, fx.Node]):
    if tag == "node":
        if not isinstance(inner, str) or inner not in env:
            raise FormatError(f"argument refers to node {inner!r} before it is defined")
        return env[inner]
    if tag in ("tuple", "dict", "slice") and not isinstance(inner, list):
        raise FormatError(f"{tag} argument must be a list, got {inner!r}")
    if tag == "tuple":
        return tuple(decode_arg(v, env) for v in inner)
    if tag == "dict":
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in inner):
            raise FormatError(f"dict argument must be [str, value] pairs, got {inner!r}")
        return {k: decode_arg(v, env) for k, v in inner}
    if tag == "slice" and len(inner) == 3:
        return slice(*(decode_arg(v, env) for v in inner))
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "torch" and isinstance(inner, str) and inner in _torch_constants():
        return _torch_constants()[inner]
    if tag == "device" and isinstance(inner, str):
        try:
            return torch.device(inner)
        except (RuntimeError, ValueError) as exc:
            raise FormatError(f"invalid device {inner!r}") from exc
    if tag == "ellipsis" and inner is True:
        return Ellipsis
    raise FormatError(f"unexpected argument {{{tag!r}: {inner!r}}}")


def decode_arg(value, env: dict[str, fx.Node]):
    if isinstance(value, list):
        return [decode_arg(v, env) for v in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise FormatError(f"unexpected argument {value!r}")
        return _decode_tagged(*next(iter(value.items())), env)
    if value is None or type(value) in (bool, int, str) or \
            (type(value) is float and math.isfinite(value)):
        return value
    raise FormatError(f"unexpected argument {value!r}")


def _check_settings(kwargs: dict, where: str, *, strict: bool) -> None:
    """String settings against their allowed values; ``strict``: unknown string settings are
    refused too (module constructors), otherwise only the known ones are checked (functions)."""
    for key, value in kwargs.items():
        if not isinstance(value, str):
            continue
        choices = STRING_CHOICES.get(key)
        if choices is None and strict:
            raise FormatError(f"{where}: string setting {key}={value!r} is not one morphc "
                              "knows how to validate")
        if choices is not None and value not in choices:
            raise FormatError(f"{where}: {key}={value!r} is not one of {sorted(choices)}")


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


def _describe(module: nn.Module) -> dict:
    """The spec of one submodule, as JSON data (the canonical form :func:`build_module` checks
    against)."""
    if type(module) is BypassBranch:
        spec = {"class": _BRANCH_CLASS, "kwargs": dict(
            kind=module.kind, in_features=module.in_features, out_features=module.out_features,
            width=module.width, family=module.family_name, with_bias=module.a is not None,
            conv=asdict(module.conv) if module.conv else None),
            "homotopy": float(module.homotopy)}
    elif _MODULE_CLASSES.get(f"torch.nn.{type(module).__name__}") is type(module):
        spec = {"class": f"torch.nn.{type(module).__name__}",
                "kwargs": _constructor_kwargs(module)}
    else:
        raise FormatError(f"submodule class {type(module).__module__}.{type(module).__name__} "
                          f"is not in the allow-list ({', '.join(sorted(_MODULE_CLASSES))}, "
                          f"{_BRANCH_CLASS}); only those can be rebuilt from data")
    floating = [t for t in module.state_dict().values() if t.is_floating_point()]
    spec["dtype"] = str(floating[0].dtype).removeprefix("torch.") if floating else None
    spec["training"] = module.training
    return json.loads(json.dumps(spec))


def module_spec(module: nn.Module) -> dict:
    """``{"class", "kwargs", "dtype", "training"}`` (+ ``"homotopy"`` for a branch); verified
    by rebuilding the module."""
    spec = _describe(module)
    rebuilt = build_module(spec)
    if _signature(rebuilt) != _signature(module):
        raise FormatError(f"{type(module).__name__} could not be described by its constructor "
                          f"arguments ({_signature(module)} rebuilt as {_signature(rebuilt)})")
    return spec


def _signature(module: nn.Module) -> tuple:
    return (module.extra_repr(), [(k, tuple(v.shape), v.dtype) for k, v in
                                  module.state_dict().items()])


def _branch_kwargs(kwargs: dict, where: str) -> dict:
    """Validated constructor arguments of a ``BypassBranch``."""
    _fields(kwargs, {"kind", "in_features", "out_features", "width", "family", "with_bias",
                     "conv"}, where)
    if not isinstance(kwargs["kind"], str) or kwargs["kind"] not in KINDS:
        raise FormatError(f"{where}: branch kind {kwargs['kind']!r} is not one of {sorted(KINDS)}")
    if not isinstance(kwargs["family"], str) or kwargs["family"] not in available_families():
        raise FormatError(f"{where}: activation family {kwargs['family']!r} is not registered "
                          f"({', '.join(available_families())}); register it before loading")
    for key in ("in_features", "out_features", "width"):
        if _typed(kwargs[key], int, f"{where}.{key}") < 1:
            raise FormatError(f"{where}.{key} must be positive")
    _typed(kwargs["with_bias"], bool, f"{where}.with_bias")
    conv = kwargs["conv"]
    if conv is not None:
        conv = dict(_fields(conv, {f.name for f in fields(ConvConfig)}, f"{where}.conv"))
        _check_settings({"padding_mode": _typed(conv["padding_mode"], str, where)}, where,
                        strict=True)
        for key in ("kernel_size", "stride", "dilation", "padding"):
            if key == "padding" and isinstance(conv[key], str):
                _check_settings({"padding": conv[key]}, where, strict=True)
                continue
            values = _typed(conv[key], list, f"{where}.conv.{key}")
            conv[key] = tuple(_typed(v, int, f"{where}.conv.{key}") for v in values)
        _typed(conv["dim"], int, f"{where}.conv.dim")
        _typed(conv["groups"], int, f"{where}.conv.groups")
        conv = ConvConfig(**conv)
    return {**kwargs, "conv": conv}


def _construct(spec, where: str) -> nn.Module:
    """Validate a spec's fields and call the allowed constructor (no canonical check)."""
    name = spec.get("class") if isinstance(spec, dict) else None
    name = name if isinstance(name, str) else repr(name)
    branch = name == _BRANCH_CLASS
    _fields(spec, {"class", "kwargs", "dtype", "training"} | ({"homotopy"} if branch else set()),
            where)
    if not branch and name not in _MODULE_CLASSES:
        raise FormatError(f"{where}: submodule class {name!r} is not allowed in a saved graph")
    raw = spec["kwargs"]
    if not isinstance(raw, dict):
        raise FormatError(f"{where}.kwargs: expected an object, got {raw!r}")
    for key in raw:
        check_identifier(key, f"{where}: constructor argument")
    dtype = None if spec["dtype"] is None else _dtype(spec["dtype"], f"{where}.dtype",
                                                      floating=True)
    _typed(spec["training"], bool, f"{where}.training")
    try:
        if branch:
            homotopy = _typed(spec["homotopy"], float, f"{where}.homotopy")
            if not 0.0 <= homotopy <= 1.0:
                raise FormatError(f"{where}.homotopy must be in [0, 1], got {homotopy}")
            module = BypassBranch(homotopy=torch.tensor(homotopy), dtype=dtype,
                                  **_branch_kwargs(raw, f"{where}.kwargs"))
        else:
            kwargs = {k: decode_arg(v, {}) for k, v in raw.items()}
            _check_settings(kwargs, where, strict=True)
            module = _MODULE_CLASSES[name](**kwargs)
            if dtype is not None:
                module = module.to(dtype)
    except MorphcError:
        raise
    except Exception as exc:    # the constructor refused these arguments
        raise FormatError(f"{where}: {name} cannot be built from {raw!r}: {exc}") from exc
    return module.train(spec["training"])


def build_module(spec: dict, where: str = "module") -> nn.Module:
    """A fresh module from a validated spec (weights come from the state_dict afterwards); the
    spec must be exactly the canonical description of what it builds."""
    module = _construct(spec, where)
    rebuilt = _describe(module)
    if not _same(rebuilt, spec):
        raise FormatError(f"{where}: the spec is not the canonical description of the module it "
                          f"builds (it rebuilds as {rebuilt}); missing, extra or coerced values "
                          "are refused")
    return module


# -- graphs -------------------------------------------------------------------------------------
MAX_ELEMENTS = 2 ** 28      # without a weights file to compare with, no saved graph is larger
_DOC_KEYS = {"format", "version", "class_name", "training", "nodes", "modules", "tensors",
             "frozen"}
_NODE_KEYS = {"name", "op", "target", "args", "kwargs"}
_TENSOR_KEYS = {"parameter", "requires_grad", "shape", "dtype"}
_DIGEST_KEYS = {"architecture", "weights"}


def _owner(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _encode_node(node: fx.Node) -> dict:
    target = node.target if isinstance(node.target, str) else function_name(node.target)
    return {"name": node.name, "op": node.op, "target": target,
            "args": encode_arg(tuple(node.args)), "kwargs": encode_arg(dict(node.kwargs))}


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
        nodes.append(_encode_node(node))
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


def _restore_order(gm: fx.GraphModule, paths: list[str]) -> None:
    """GraphModule registers submodules in node order; put them back in the saved order."""
    rank: dict[str, int] = {}
    for index, path in enumerate(paths):
        segments = path.split(".")
        for depth in range(1, len(segments) + 1):
            rank.setdefault(".".join(segments[:depth]), index)
    for prefix, module in list(gm.named_modules()):
        for table in (module._modules, module._parameters, module._buffers):
            items = sorted(table.items(), key=lambda item: rank.get(
                f"{prefix}.{item[0]}" if prefix else item[0], len(paths)))
            table.clear()
            table.update(items)


def _check_target(op: str, target) -> None:
    if op == "placeholder":
        check_identifier(target, "placeholder name")
    elif op in ("get_attr", "call_module"):
        check_path(target, f"{op} target")
    elif op == "call_method":
        check_identifier(target, "method")
        if target.startswith("_") or target in _DENIED_METHODS or \
                not callable(getattr(torch.Tensor, target, None)):
            raise FormatError(f"method {target!r} is not a public torch.Tensor method a saved "
                              "graph may call")
    elif op == "output" and target != "output":
        raise FormatError(f"output target must be 'output', got {target!r}")


def _node_from_json(graph: fx.Graph, spec, env: dict[str, fx.Node], known: set[str]):
    where = f"node {spec.get('name')!r}" if isinstance(spec, dict) else "node"
    _fields(spec, _NODE_KEYS, where)
    op, target, name = spec["op"], spec["target"], spec["name"]
    if op not in _OPS:
        raise FormatError(f"{where}: op {op!r} is not one of {_OPS}")
    check_identifier(name, "node name")
    if name in env:
        raise FormatError(f"{where}: duplicate node name")
    args, kwargs = decode_arg(spec["args"], env), decode_arg(spec["kwargs"], env)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise FormatError(f"{where}: args must be a tuple and kwargs a dict")
    for key in kwargs:
        check_identifier(key, f"{where}: keyword argument")   # fx writes `key = value`
    arity = {"output": (1, 1), "placeholder": (0, 1), "get_attr": (0, 0)}.get(op)
    if arity and not (arity[0] <= len(args) <= arity[1] and not kwargs):
        raise FormatError(f"{where}: a {op} node takes {arity[0]}..{arity[1]} arguments and "
                          f"no keywords, got {args!r}, {kwargs!r}")
    if op == "call_function":
        target = resolve_function(target)
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str)
                                      and args[1] in TENSOR_ATTRIBUTES):
            raise FormatError(f"{where}: getattr may only read {sorted(TENSOR_ATTRIBUTES)}")
        _check_settings(kwargs, where, strict=False)
    else:
        _check_target(op, target)
        if op in ("get_attr", "call_module") and target not in known:
            raise FormatError(f"{where} refers to {target!r}, which the file does not define")
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:
        raise FormatError(f"{where}: torch.fx renames it to {node.name!r} (a reserved or taken "
                          "name); saved names must be the ones fx generated")
    env[name] = node
    return node


def _check_sizes(prefix: str, tensors: dict[str, torch.Tensor], state: dict | None,
                 budget: list[int]) -> None:
    """Shapes and dtypes (computed on the meta device) against the weights file, before any
    memory is allocated; without one, a size cap."""
    for name, tensor in tensors.items():
        key = f"{prefix}.{name}" if name else prefix
        if state is not None:
            saved = state.get(key)
            if saved is None or tuple(saved.shape) != tuple(tensor.shape) or \
                    saved.dtype != tensor.dtype:
                found = None if saved is None else (tuple(saved.shape), saved.dtype)
                raise FormatError(f"{key}: the architecture says {tuple(tensor.shape)} "
                                  f"{tensor.dtype}, the weights file has {found}")
        budget[0] -= tensor.numel()
        if budget[0] < 0:
            raise FormatError(f"the architecture needs more than {MAX_ELEMENTS} elements")


def _tensor_from_json(target: str, spec, state: dict | None, budget: list[int]) -> torch.Tensor:
    where = f"tensor {target!r}"
    _fields(spec, _TENSOR_KEYS, where)
    shape = [_typed(d, int, f"{where}.shape") for d in _typed(spec["shape"], list, where)]
    if any(d < 0 for d in shape):
        raise FormatError(f"{where}: negative dimension in {shape}")
    dtype = _dtype(spec["dtype"], f"{where}.dtype")
    parameter = _typed(spec["parameter"], bool, f"{where}.parameter")
    requires_grad = _typed(spec["requires_grad"], bool, f"{where}.requires_grad")
    if (requires_grad and not parameter) or (requires_grad and not dtype.is_floating_point):
        raise FormatError(f"{where}: only a floating-point parameter can require grad")
    _check_sizes(target, {"": torch.empty(shape, dtype=dtype, device="meta")}, state, budget)
    tensor = torch.zeros(shape, dtype=dtype)
    return nn.Parameter(tensor, requires_grad) if parameter else tensor


def _root_from_json(data: dict, state: dict | None) -> dict[str, object]:
    """Submodules and tensors, sizes checked on the meta device before they are built."""
    modules = _typed(data["modules"], dict, "modules")
    tensors = _typed(data["tensors"], dict, "tensors")
    budget = [MAX_ELEMENTS]
    root: dict[str, object] = {}
    for target, spec in modules.items():
        check_path(target, "module name")
        with torch.device("meta"):
            dry = _construct(spec, f"module {target!r}")
        _check_sizes(target, dict(dry.state_dict()), state, budget)
        root[target] = build_module(spec, f"module {target!r}")
    for target, spec in tensors.items():
        check_path(target, "tensor name")
        if target in root:
            raise FormatError(f"{target!r} is both a module and a tensor")
        root[target] = _tensor_from_json(target, spec, state, budget)
    return root


def graph_from_json(data: dict, state: dict | None = None) -> fx.GraphModule:
    """Rebuild the architecture (fresh weights: load the state_dict next). Validates everything
    it reads (see the module docstring); raises ``FormatError`` on anything else. With
    ``state`` (the weights to load), sizes are checked against it before allocating."""
    _fields(data, _DOC_KEYS, "architecture")
    if data["format"] != GRAPH_FORMAT or data["version"] != VERSION:
        raise FormatError(f"not a {GRAPH_FORMAT} v{VERSION} file (format {data['format']!r}, "
                          f"version {data['version']!r}); re-save it with this morphc version")
    check_identifier(data["class_name"], "class name")
    training = _typed(data["training"], bool, "training")
    root = _root_from_json(data, state)
    graph, env = fx.Graph(), {}
    for spec in _typed(data["nodes"], list, "nodes"):
        _node_from_json(graph, spec, env, set(root))
    try:
        graph.lint()
    except Exception as exc:
        raise FormatError(f"the saved graph is malformed: {exc}") from exc
    try:
        gm = fx.GraphModule(root, graph, data["class_name"])   # identifiers validated above
    except Exception as exc:
        raise FormatError(f"torch.fx cannot generate code for the saved graph: {exc}") from exc
    gm.training = training
    _restore_order(gm, [*data["modules"], *data["tensors"]])
    frozen = _typed(data["frozen"], list, "frozen")
    params = dict(gm.named_parameters())
    for name in frozen:
        if _typed(name, str, "frozen") not in params:
            raise FormatError(f"frozen parameter {name!r} is not a parameter of the graph")
        params[name].requires_grad_(False)
    if not _same(graph_to_json(gm), data):
        raise FormatError("the architecture is not the canonical encoding of the graph it "
                          "builds (an unreferenced module or tensor, an unsorted or duplicate "
                          "entry, or a coerced value); re-save it with morphc.save")
    return gm


def save(module: nn.Module, prefix) -> dict[str, Path]:
    """Write ``<prefix>.json`` (architecture + digests), ``<prefix>.pt`` (state_dict) and
    ``<prefix>.py`` (generated code, for reading). Returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    gm = module.graph_module if isinstance(module, ExtendedModel) else module
    data = graph_to_json(gm)
    graph_from_json(data)              # refuse to write what load would refuse
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    weights = buffer.getvalue()
    digest = {"architecture": hashlib.sha256(_canonical(data)).hexdigest(),
              "weights": hashlib.sha256(weights).hexdigest()}
    paths = {ext: prefix.with_name(prefix.name + f".{ext}") for ext in ("json", "pt", "py")}
    paths["json"].write_text(json.dumps({**data, "digest": digest}, indent=1, allow_nan=False))
    paths["pt"].write_bytes(weights)
    paths["py"].write_text("# Generated by torch.fx, for reading only: morphc.space.io."
                           "load rebuilds the graph from the .json and never runs this "
                           f"file.\n{gm.code}")
    return paths


def _reject_constant(name: str):
    raise FormatError(f"{name} is not valid JSON")


def _read_document(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path} is not a JSON document: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _read_weights(data: bytes) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:     # weights_only refuses anything but tensors and containers
        raise FormatError(f"the weights file cannot be loaded with weights_only=True: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FormatError("the weights file is not a state_dict (str → tensor)")
    return state


def load(prefix, *, check_digest: bool = True) -> fx.GraphModule:
    """Rebuild a saved architecture from ``<prefix>.json`` and load ``<prefix>.pt`` with
    ``weights_only=True`` (strict: every key, shape and dtype must match).

    ``check_digest``: both files must match the SHA-256 digests ``save`` wrote, so a corrupted
    or edited file is refused before it is read. A hand-edited architecture loads with
    ``check_digest=False``; it is validated all the same.
    """
    prefix = Path(prefix)
    data = _read_document(prefix.with_name(prefix.name + ".json"))
    digest = _fields(data.pop("digest", None), _DIGEST_KEYS, "digest")
    weights = prefix.with_name(prefix.name + ".pt").read_bytes()
    if check_digest:
        found = {"architecture": hashlib.sha256(_canonical(data)).hexdigest(),
                 "weights": hashlib.sha256(weights).hexdigest()}
        changed = [key for key in sorted(_DIGEST_KEYS) if digest[key] != found[key]]
        if changed:
            raise FormatError(f"{prefix}: {' and '.join(changed)} "
                              f"{'do' if len(changed) > 1 else 'does'} not match the digest "
                              "morphc.save wrote (the file was corrupted or edited); pass "
                              "check_digest=False to load an edited file (it is still validated)")
    state = _read_weights(weights)
    gm = graph_from_json(data, state)
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"the weights do not fit the architecture: {exc}") from exc
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
