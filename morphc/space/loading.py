"""Loading a saved architecture — a saved file is data, never code.

Everything read from a file is checked in this module, before anything is built from it; the
files are described in ``morphc.space.saving``, the allow-lists live in ``schema`` and ``codec``
decodes arguments and modules. Loading validates the whole document before building anything
(:func:`graph_from_json` checks it field by field against ``schema``):

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
- sizes are checked against the weights file on the meta device before anything is allocated;
- the weights file is read with ``torch.load(..., weights_only=True)`` and must be a state_dict.

Anything else is a :class:`FormatError`. fx then generates the forward from that validated graph,
as for any traced model — no saved string is ever passed to ``eval``/``exec`` or reaches the
generated code except as a validated identifier or a ``repr``'d constant.

>>> import torch
>>> from morphc.space.encoding import graph_to_json
>>> from morphc.space.move_base import private_copy
>>> gm = private_copy(torch.nn.Sequential(torch.nn.Linear(3, 2)), (torch.randn(1, 3),))
>>> graph_from_json(graph_to_json(gm)).get_submodule("0")
Linear(in_features=3, out_features=2, bias=True)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from os import PathLike
from pathlib import Path

import torch
from torch import fx, nn

from morphc.errors import FormatError
from morphc.space.codec import _check_settings, _construct, build_module, decode_arg
from morphc.space.encoding import GRAPH_FORMAT, check_version, graph_to_json
from morphc.space.schema import (
    _DENIED_METHODS,
    _OPS,
    TENSOR_ATTRIBUTES,
    _canonical,
    _dtype,
    _fields,
    _same,
    _typed,
    check_identifier,
    check_path,
    resolve_function,
)

MAX_ELEMENTS = 2 ** 28      # without a weights file to compare with, no saved graph is larger
_DOC_KEYS = {"format", "version", "class_name", "training", "nodes", "modules", "tensors",
             "frozen"}
_NODE_KEYS = {"name", "op", "target", "args", "kwargs"}
_TENSOR_KEYS = {"parameter", "requires_grad", "shape", "dtype"}
_DIGEST_KEYS = {"architecture", "weights"}


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
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        # before torch sees the shape: it overflows on sizes past int64 (an untyped error)
        raise FormatError(f"{where}: shape {shape} needs more than {MAX_ELEMENTS} elements "
                          "(or has a dimension that large)")
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
    check_version(data, GRAPH_FORMAT)
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



def _reject_constant(name: str):
    raise FormatError(f"{name} is not valid JSON")


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique: ``json`` would keep the last of two, silently."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = [key for key, _ in pairs]
        twice = sorted({key for key in seen if seen.count(key) > 1})
        raise FormatError(f"the keys {twice!r:.200} appear twice in one object (which one "
                          "counts is ambiguous); keep one of each")
    return data


def _read_document(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:   # also an int past Python's digit limit
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
    for key, value in state.items():
        # what torch.save of a state_dict gives; a nested tensor fails on .shape (untyped), a
        # sparse or meta one only when copied into the model
        if value.is_nested or value.layout != torch.strided or value.device.type != "cpu":
            raise FormatError(f"the weights file's {key!r} is not a dense tensor (layout "
                              f"{value.layout}, nested {value.is_nested}, device "
                              f"{value.device.type}); re-save it with morphc.save")
    return state


SUFFIXES = (".json", ".pt", ".py")


class PrefixError(FormatError, TypeError, ValueError):
    """``save`` / ``load`` given no path (``None``, a number, ``""``): a morphc error, and the
    TypeError / ValueError ``Path(...)`` raised for it before."""


def saved_files(prefix, *, reading: bool = False) -> tuple[Path, Path]:
    """``(<prefix>.json, <prefix>.pt)``. A prefix given with one of the saved files' suffixes
    (``model.json``, as a user copies it from a listing) names the same pair. Reading, a
    missing document is a ``FileNotFoundError`` that says what exists instead."""
    if not isinstance(prefix, str | PathLike) or not Path(prefix).name:
        swapped = isinstance(prefix, nn.Module) and not reading
        raise PrefixError(
            f"expected a path prefix (a str or pathlib.Path such as 'runs/model', naming "
            f"<prefix>.json and <prefix>.pt), got {prefix!r:.80}"
            + ("; morphc.save(model, prefix) takes the model first" if swapped else ""))
    prefix = Path(prefix)
    if prefix.suffix in SUFFIXES and not prefix.with_name(prefix.name + ".json").exists():
        prefix = prefix.with_suffix("")
    document = prefix.with_name(prefix.name + ".json")
    if reading and not document.is_file():
        hint = "pass the prefix morphc.save was given (it writes <prefix>.json and <prefix>.pt)"
        if (prefix / "best.json").is_file():
            hint = (f"{prefix} is a saved ModelSpace: load its best architecture with "
                    f"morphc.load('{prefix / 'best'}'), or the whole space (saved with "
                    f"weights='all') with morphc.ModelSpace.load('{prefix}', example_inputs)")
        raise FileNotFoundError(f"no saved architecture at {document}; {hint}")
    return document, prefix.with_name(prefix.name + ".pt")


def load(prefix, *, check_digest: bool = True) -> fx.GraphModule:
    """Rebuild a saved architecture from ``<prefix>.json`` and load ``<prefix>.pt`` with
    ``weights_only=True`` (strict: every key, shape and dtype must match).

    ``check_digest``: both files must match the SHA-256 digests ``save`` wrote, so a corrupted
    or edited file is refused before it is read. A hand-edited architecture loads with
    ``check_digest=False``; it is validated all the same.
    """
    document, weights_file = saved_files(prefix, reading=True)
    prefix = document.with_suffix("")
    data = _read_document(document)
    digest = _fields(data.pop("digest", None), _DIGEST_KEYS, "digest")
    if not weights_file.is_file():
        raise FormatError(f"{document} has no weights file next to it ({weights_file.name}): "
                          "morphc.save writes both; copy them together")
    weights = weights_file.read_bytes()
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
    _tie_shared(gm, state)
    return gm


def _tie_shared(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Tie again the parameters that were one tensor when saved (an embedding used as the output
    projection): ``torch.save`` keeps them as one storage, ``load_state_dict`` would copy them
    into separate parameters. Same values either way; tied, training keeps them equal."""
    first: dict[tuple, nn.Parameter] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        saved = state[name]
        key = (saved.untyped_storage().data_ptr(), saved.storage_offset(), tuple(saved.shape),
               saved.stride(), saved.dtype)
        if key not in first:
            first[key] = param
        elif first[key] is not param:
            owner, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(owner), leaf, first[key])
