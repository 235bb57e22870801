"""sympy expression → torch function, by rules kept as data (no string is ever evaluated)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import sympy as sp
import torch
from sympy.logic.boolalg import BooleanAtom

from morphc.errors import FamilyError
from morphc.families.family import Tensor, TorchFn

# Rules as data: sympy function → torch function of the translated arguments.
_TORCH_FUNCTIONS: dict[type, Callable] = {
    sp.exp: torch.exp, sp.log: torch.log, sp.sin: torch.sin, sp.cos: torch.cos,
    sp.tan: torch.tan, sp.tanh: torch.tanh, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
    sp.atan: torch.atan, sp.asinh: torch.asinh, sp.erf: torch.erf, sp.Abs: torch.abs,
    sp.sign: torch.sign,
    sp.StrictLessThan: operator.lt, sp.LessThan: operator.le,            # t < c, t <= c
    sp.StrictGreaterThan: operator.gt, sp.GreaterThan: operator.ge,      # t > c, t >= c
    sp.Equality: operator.eq, sp.Unequality: operator.ne,                # Eq(t, c), Ne(t, c)
    sp.And: torch.logical_and, sp.Or: torch.logical_or, sp.Not: torch.logical_not,
}


def torch_fn(expr: sp.Expr, symbols: Sequence[sp.Symbol]) -> TorchFn:
    """Translate ``expr`` into a function of one tensor per symbol (in ``symbols`` order).

    Constant subexpressions become Python floats, folded in by sympy beforehand; the result is a
    tensor or, for a constant expression, a float that callers widen with :func:`_full`. There is
    no branching on tensor values, so the functions trace under ``torch.compile``.
    """
    index = {s: i for i, s in enumerate(symbols)}

    def build(e: sp.Basic) -> TorchFn:
        if e in index:
            i = index[e]
            return lambda xs: xs[i]
        if isinstance(e, BooleanAtom):  # the `True` of a Piecewise fallback
            flag = bool(e)
            return lambda xs: flag
        if not e.free_symbols:
            value = _constant(e, expr)
            return lambda xs: value
        if isinstance(e, sp.Heaviside):
            return build(e.rewrite(sp.Piecewise))
        if isinstance(e, sp.Piecewise):
            return _where_chain([(build(v), build(c)) for v, c in e.args])
        args = [build(a) for a in e.args]
        if e.is_Add or e.is_Mul:
            return _fold(operator.add if e.is_Add else operator.mul, args)
        if e.is_Pow:
            base, exponent = args
            return lambda xs: base(xs) ** exponent(xs)
        if isinstance(e, (sp.Max, sp.Min)):
            return _fold(torch.maximum if isinstance(e, sp.Max) else torch.minimum, args, True)
        fn = _TORCH_FUNCTIONS.get(e.func)
        if fn is None:
            known = sorted(f.__name__ for f in _TORCH_FUNCTIONS)
            raise FamilyError(f"no torch translation for {e.func.__name__} in {expr}; supported: "
                              f"Add, Mul, Pow, Piecewise, Max, Min, Heaviside, {', '.join(known)}")
        return lambda xs: fn(*(f(xs) for f in args))

    return build(expr)


def _constant(e: sp.Basic, expr: sp.Expr) -> float | int:
    """A constant subexpression as a Python number (ints stay ints, so ``t**2`` stays exact)."""
    if e.is_Integer:
        return int(e)
    try:
        value = float(e)
    except TypeError as err:
        raise FamilyError(f"the constant {e} in {expr} is not a real number") from err
    if not math.isfinite(value):
        raise FamilyError(f"the constant {e} in {expr} is not finite")
    return value


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    """Python constants as 0-dim tensors of ``like``'s dtype/device, for ops that need tensors."""
    return value if isinstance(value, torch.Tensor) else like.new_full((), value)


def _fold(op: Callable, args: list[TorchFn], tensors_only: bool = False) -> TorchFn:
    """Apply a binary ``op`` left to right over the translated args (Add, Mul, Max, Min)."""
    if len(args) == 2 and not tensors_only:    # the common case, without the loop
        first, second = args
        return lambda xs: op(first(xs), second(xs))

    def run(xs):
        acc = args[0](xs)
        for f in args[1:]:
            value = f(xs)
            acc = op(_as_tensor(acc, xs[0]), _as_tensor(value, xs[0])) if tensors_only \
                else op(acc, value)
        return acc
    return run


def _where_chain(pieces: list[tuple[TorchFn, TorchFn]]) -> TorchFn:
    """Piecewise as nested ``torch.where``, first matching condition wins, NaN where none does."""
    def run(xs):
        acc: Tensor | float = math.nan
        for value, cond in reversed(pieces):
            c = cond(xs)
            if isinstance(c, bool):  # the `True` fallback of the last piece
                acc = value(xs) if c else acc
            else:
                acc = torch.where(c, _as_tensor(value(xs), xs[0]), _as_tensor(acc, xs[0]))
        return acc
    return run


