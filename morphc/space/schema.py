"""The schema of a saved architecture: allow-lists, identifiers, strict field access.

Everything a loader may accept from a file is decided here; ``codec`` and ``loading`` only build
what these checks let through (``morphc.space.saving`` describes the files).
"""

from __future__ import annotations

import functools
import inspect
import json
import keyword
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from morphc.errors import FormatError

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
    # parameter-free activations, padding, resampling and channel shuffles models use
    nn.SELU, nn.CELU, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold, nn.RReLU, nn.GLU, nn.Softmin, nn.Softmax2d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.LocalResponseNorm, nn.LPPool1d, nn.LPPool2d, nn.ZeroPad1d,
    nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
    nn.CircularPad3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
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
    """The bytes a digest covers. Key order is kept, not sorted: it is the order of the modules
    and parameters, so a file whose entries were reordered must not match its digest."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _dtype(name, where: str, *, floating: bool = False) -> torch.dtype:
    value = _torch_constants().get(name) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype) or (floating and not value.is_floating_point):
        raise FormatError(f"{where}: unknown {'floating ' if floating else ''}dtype {name!r}")
    return value


