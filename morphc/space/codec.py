"""Encoding and decoding of node arguments and submodule specs, checked against the schema."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, fields

import torch
from torch import fx, nn

from morphc.errors import FormatError, MorphcError
from morphc.families import available_families
from morphc.ir.branch import BypassBranch
from morphc.ir.kinds import KINDS
from morphc.ir.sites import ConvConfig
from morphc.space.schema import (
    _BRANCH_CLASS,
    _MODULE_CLASSES,
    STRING_CHOICES,
    _dtype,
    _fields,
    _same,
    _torch_constants,
    _typed,
    check_identifier,
)


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


