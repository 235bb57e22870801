"""Python numbers among a model's inputs: torch.export bakes each into its graph as a constant.

A ``temperature=t`` annealed every step, or a ``training_stage=2`` flag, is a Python ``float`` /
``int`` / ``bool``, not a tensor: the exported graph computes with the value it was traced with
and guards on it (``Guard failed: temperature == 1.0``). That is not a shape the graph refuses,
so the call is checked here first, before the graph runs, and the error names the argument,
its old and new values and what to pass instead. (``torch.fx.symbolic_trace`` keeps such an
input as a graph input, so only exported graphs are checked.)
"""

from __future__ import annotations

import math
import re

import torch

from morphc.errors import ShapeError
from morphc.ir.shapes import input_labels

Number = bool | int | float
_GUARD_VALUE = re.compile(r"Guard failed: (\w[\w\[\]'.]*) == (\S+)")


class BakedNumber(ShapeError):
    """A Python number input differs from the value its exported graph was traced with. A
    ``ShapeError`` (the extended model may trace again for it, a Bypass cycle rolls back on
    it), told apart so that a float that keeps changing is refused at once instead of spending
    every re-trace (:mod:`morphc.compiler.shape_graphs`)."""

    def __init__(self, message: str, label: str, old, new) -> None:
        super().__init__(message)
        self.label, self.old, self.new = label, old, new

    def extended(self, more: str) -> BakedNumber:
        """The same error with ``more`` said after it (still told apart from shapes)."""
        return BakedNumber(f"{self} {more}", self.label, self.old, self.new)


def _is_number(value) -> bool:
    return isinstance(value, Number) and not isinstance(value, torch.Tensor)


def _same(old, new) -> bool:
    both_nan = isinstance(old, float) and isinstance(new, float) and \
        math.isnan(old) and math.isnan(new)
    return both_nan or old == new


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _where(label: str, names: list[str], args: tuple) -> str:
    """``forward's 2nd parameter, given by keyword``: where the argument sits in the call."""
    base = label.split("[")[0]
    plain = [n.lstrip("*") for n in names]
    if base in plain:
        index = plain.index(base)
        how = "given positionally" if index < len(args) else "given by keyword"
        return f"forward's {_ordinal(index + 1)} parameter, {how}"
    match = re.match(r"args\[(\d+)\]", label)
    return f"forward's {_ordinal(int(match.group(1)) + 1)} positional input" if match else \
        "a keyword input"


def remedy(label: str, shown: str = "value") -> str:
    """What to do instead of passing a Python number the graph bakes in."""
    base = label.split("[")[0]
    return (f"Pass it as a tensor instead ({base}=torch.tensor({shown})), or keep it in a "
            f"buffer the forward reads (self.register_buffer('{base}', torch.tensor(...)), "
            f"updated in place with self.{base}.fill_(value)): a tensor is a graph input, so "
            "one graph serves every value. If the forward branches on it in Python (if "
            f"{base} > ...), write that branch with torch.where.")


def baked_message(label: str, where: str, old, new, kind: str | None = None) -> str:
    kind = kind or type(new).__name__
    return (f"input {label!r} ({where}) is a Python {kind}: torch.export fixed it in the traced "
            f"graph at its example value {old!r}, and this call gives {new!r} — a graph "
            "computes with the value it was traced with, so every new value needs another "
            "trace. " + remedy(label, repr(new)))


def baked_numbers(names: list[str], example: tuple[tuple, dict],
                  defaults: dict | None = None) -> dict:
    """Each Python number input the example gave (or, for a parameter it left out, the
    forward's default), by label: the values an exported graph baked in. Computed once per
    trace: it is the same for every call."""
    labelled = input_labels(names, *example)
    given = {label for label, _ in labelled}
    return {**{k: v for k, v in (defaults or {}).items() if k not in given},
            **{label: value for label, value in labelled if _is_number(value)}}


def changed_number(names: list[str], baked: dict, args: tuple,
                   kwargs: dict) -> BakedNumber | None:
    """The first Python number input whose value differs from the one ``baked`` holds
    (:func:`baked_numbers`), as an error."""
    if not baked:
        return None
    for label, value in input_labels(names, args, kwargs):
        if label in baked and _is_number(value) and not _same(baked[label], value):
            message = baked_message(label, _where(label, names, args), baked[label], value)
            return BakedNumber(message, label, baked[label], value)
    return None


def value_guard_error(text: str) -> ShapeError | None:
    """A ``Guard failed: NAME == VALUE`` on a value rather than a size (a Python number the
    graph baked in that the check above did not see, e.g. inside a container), or None."""
    match = _GUARD_VALUE.search(text)
    if match is None or ".size()" in match.group(1):
        return None
    name = match.group(1)
    return ShapeError(f"input {name!r}: the traced graph refuses its value ({text}); it is a "
                      "Python value torch.export fixed at the example's value "
                      f"{match.group(2)}, so every new value needs another trace. "
                      + remedy(name))
