"""Input shapes of an exported graph: what torch.export left dynamic, what it fixed and why, and
a typed error when a call does not fit.

By default morphc gives every dimension of every tensor input ``Dim.AUTO``: torch.export keeps a
dimension symbolic unless the model forces it to a constant (a conv's input channels, a position
table that checks the image size). Which dimensions were fixed, and *why*, comes from the
``torch.fx.experimental.symbolic_shapes`` log records emitted while exporting::

    create_symbol s100 = 32 for L['pixel_values'].size()[2]
    eval Eq(s100, 32) [guard added] (transformers/models/vit/modeling_vit.py:152 in forward)
    set_replacement s100 = 32 (range_refined_to_singleton)

A specialised dimension still appears in a placeholder's ``meta['val']`` as a ``SymInt`` — one
whose expression has no free symbol — so ``is_symbolic`` checks the expression, not the type.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.export import Dim
from torch.utils._pytree import keystr, tree_flatten_with_path

from morphc.errors import ShapeError

_LOG = "torch.fx.experimental.symbolic_shapes"
_CREATE = re.compile(r"create_symbol (s\d+) = (\d+) for L\[(.*?)\]\.size\(\)\[(\d+)\]")
_GUARD = re.compile(r"eval Eq\((s\d+), (\d+)\) \[guard added\] \(([^)]*)\)")
_REPLACE = re.compile(r"set_replacement (s\d+) = (\d+) \((\w+)\)")
_GUARD_FAILED = re.compile(r"(\w+)\.size\(\)\[(\d+)\]")


@dataclass
class Specialisation:
    """A dimension torch.export fixed to one value, and why."""

    input: str
    dim: int
    value: int
    reason: str

    def __str__(self) -> str:
        return f"{self.input}.size({self.dim}) fixed to {self.value}: {self.reason}"


@dataclass
class DimRange:
    """What one input dimension of the traced graph accepts (``high`` None: unbounded)."""

    input: str
    dim: int
    low: int
    high: int | None
    reason: str = ""

    @property
    def fixed(self) -> bool:
        return self.high is not None and self.low == self.high

    def allows(self, size: int) -> bool:
        # export reports symbolic ranges from 2, yet a size-1 call passes its guards
        return (size == self.low if self.fixed else
                (self.high is None or size <= self.high))

    def describe(self) -> str:
        if self.fixed:
            return f"exactly {self.low}"
        return f"at most {self.high}" if self.high is not None else "any size"


def is_symbolic(size) -> bool:
    """A placeholder dimension is dynamic only when its expression has free symbols."""
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


def forward_names(model: torch.nn.Module) -> list[str]:
    """The forward's parameter names (``*args`` / ``**kwargs`` marked with their stars)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [stars.get(p.kind, "") + p.name for p in params]


def input_labels(names: list[str], args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    """``(label, value)`` of every leaf of ``(args, kwargs)`` in torch.export's flat input order;
    a positional input is labelled by its forward parameter name (``names``) when there is
    one."""
    labels = []
    for path, value in tree_flatten_with_path((args, kwargs))[0]:
        text = keystr(path)
        match = re.match(r"^\[0\]\[(\d+)\]", text)
        if match:
            index = int(match.group(1))
            name = names[index] if index < len(names) and not names[index].startswith("*") \
                else f"args[{index}]"
            text = name + text[match.end():]
        else:
            text = re.sub(r"^\[1\]\['([^']+)'\]", r"\1", text)
        labels.append((text, value))
    return labels


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict):
    """torch.export's ``dynamic_shapes`` with every dimension of every tensor input ``Dim.AUTO``,
    keyed by the forward's parameter names (``None`` for non-tensors)."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            return {d: Dim.AUTO for d in range(value.dim())} or None
        if isinstance(value, list | tuple):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return tuple(spec(a) for a in args) if not kwargs else None
    out = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_shape_log() -> Iterator[list[str]]:
    """Collect the symbolic-shapes INFO records of an export without printing them; the logger's
    handlers, level and propagation are restored afterwards."""
    logger = logging.getLogger(_LOG)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    capture = _Capture()
    for handler in saved[0]:
        logger.removeHandler(handler)
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield capture.messages
    finally:
        logger.removeHandler(capture)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def specialisation_reasons(messages: list[str]) -> dict[tuple[str, int], str]:
    """``(input, dim) -> why it was fixed``, from the captured log records."""
    source: dict[str, tuple[str, int]] = {}
    for message in messages:
        if m := _CREATE.search(message):
            name = re.sub(r"^'([^']+)'", r"\1", m.group(3))
            source[m.group(1)] = (name.replace("'", ""), int(m.group(4)))
    reasons: dict[tuple[str, int], str] = {}
    for message in messages:
        if (m := _GUARD.search(message)) and m.group(1) in source:
            where = m.group(3)
            if "fake_impls" in where and "conv" in where:
                where = f"consumed by a convolution with {m.group(2)} input channels"
            else:
                where = f"the model requires it ({where.split('site-packages/')[-1]})"
            reasons.setdefault(source[m.group(1)], where)
        elif (m := _REPLACE.search(message)) and m.group(1) in source:
            reasons.setdefault(source[m.group(1)], m.group(3).replace("_", " "))
    return reasons


def exported_dims(gm, program, labels, reasons, user_spec: bool = False,
                  ) -> tuple[list[DimRange], list[Specialisation]]:
    """What each tensor input dimension of an exported graph accepts, and the fixed ones
    (``user_spec``: the dynamic_shapes came from the user, so an unmarked dim is static)."""
    default = ("static in the dynamic_shapes passed to morphc" if user_spec else
               "the traced code used it as a constant (no guard recorded)")
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    user_inputs = list(program.graph_signature.user_inputs)
    ranges, fixed = [], []
    for (label, value), pname in zip(labels, user_inputs, strict=False):
        node = placeholders.get(pname)
        val = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if is_symbolic(size):
                bound = program.range_constraints.get(size.node.expr)
                try:
                    high = int(bound.upper) if bound is not None else None
                except Exception:  # int_oo: unbounded
                    high = None
                ranges.append(DimRange(label, d, 0, high, "a position table or model limit"))
            else:
                why = reasons.get((label.split("[")[0], d), default)
                if int(size) == 1 and not user_spec and (label.split("[")[0], d) not in reasons:
                    why = "size 1 in the example (torch.export specialises 0/1-sized dims)"
                ranges.append(DimRange(label, d, int(size), int(size), why))
                fixed.append(Specialisation(label, d, int(size), why))
    return ranges, fixed


_HOW = ("To allow it: pass dynamic_shapes=... (torch.export's own spec, e.g. "
        "{'NAME': {DIM: torch.export.Dim('dDIM', max=...)}}) to morphc.extend, or extend "
        "with example inputs of the shape you will use; if the model itself checks this size, "
        "it cannot vary.")


def check_call(ranges: list[DimRange], labels: list[tuple[str, object]]) -> None:
    """Raise ``ShapeError`` when an input dimension is outside what the graph accepts."""
    by_key = {(r.input, r.dim): r for r in ranges}
    for label, value in labels:
        if not isinstance(value, torch.Tensor):
            continue
        for d, size in enumerate(value.shape):
            allowed = by_key.get((label, d))
            if allowed is not None and not allowed.allows(int(size)):
                why = f" ({allowed.reason})" if allowed.reason else ""
                raise ShapeError(
                    f"input {label!r}, dimension {d}: got {int(size)}, the traced graph accepts "
                    f"{allowed.describe()}{why}. "
                    + _HOW.replace("NAME", label).replace("DIM", str(d)))


def guard_error(exc: AssertionError) -> ShapeError:
    """Turn torch.export's bare ``AssertionError('Guard failed: ...')`` into a ``ShapeError``."""
    text = str(exc).strip()
    found = _GUARD_FAILED.findall(text)
    name, dim = found[0] if found else ("?", "?")
    return ShapeError(
        f"input {name!r}, dimension {dim}: the traced graph refuses this shape ({text}). "
        + _HOW.replace("NAME", name).replace("DIM", str(dim)))
