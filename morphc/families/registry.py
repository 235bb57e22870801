"""The registry of activation families: the built-ins and the user's own."""

from __future__ import annotations

import math

import sympy as sp

from morphc.errors import FamilyError
from morphc.families.family import _VALID_FAMILY, ActivationFamily, FamilyTypeError

_REGISTRY: dict[str, ActivationFamily] = {}


def _make_family(name: str, expr: sp.Expr, params, init) -> ActivationFamily:
    """Validate the user's objects (sympy only, never strings) and find the input symbol t."""
    if not isinstance(name, str) or not name:
        raise FamilyTypeError(f"the family name must be a non-empty str, got {name!r}")
    if isinstance(params, sp.Symbol):
        params = (params,)
    if isinstance(expr, str) or any(isinstance(a, str) for a in params):
        raise FamilyTypeError(
            f"family {name!r}: got a string; morphc never evaluates strings. Build the expression "
            "from sympy.Symbol objects, e.g. `t, a = sympy.symbols('t a'); "
            "register_activation(name, sympy.Max(t, 0) + a*sympy.Min(t, 0), (a,), (0.25,))`.")
    if not isinstance(expr, sp.Expr):
        raise FamilyTypeError(f"family {name!r}: expr must be a sympy expression, got "
                              f"{type(expr).__name__}. {_VALID_FAMILY}")
    params = tuple(params)
    if not params:
        raise FamilyError(f"family {name!r} has no parameters, so C cannot be reached from a "
                          f"non-linear start. {_VALID_FAMILY}")
    if not all(isinstance(a, sp.Symbol) for a in params) or len(set(params)) != len(params):
        raise FamilyTypeError(f"family {name!r}: params must be distinct sympy.Symbols, got "
                              f"{params}")
    unused = [a for a in params if a not in expr.free_symbols]
    if unused:
        raise FamilyError(f"family {name!r}: parameters {unused} do not appear in ρ = {expr}")
    inputs = sorted(expr.free_symbols - set(params), key=str)
    if len(inputs) != 1:
        why = "no input symbol" if not inputs else f"several candidate input symbols {inputs}"
        raise FamilyError(f"family {name!r}: ρ = {expr} has {why}; it needs exactly one symbol "
                          f"besides the params {params}. {_VALID_FAMILY}")
    init = tuple(float(v) for v in init)
    if len(init) != len(params) or not all(math.isfinite(v) for v in init):
        raise FamilyError(f"family {name!r}: init {init} must give one finite value per "
                          f"parameter {params}")
    return ActivationFamily(name, expr, inputs[0], params, init)


def register_activation(name: str, expr: sp.Expr, params, init, *,
                        overwrite: bool = False) -> ActivationFamily:
    """Add an activation family ρ(t; α); its constraint set is derived now, so a bad family fails
    here with a FamilyError that says why.

    ``expr`` must be built from ``sympy.Symbol`` objects (strings are refused); ``t`` is the one
    free symbol not in ``params``; ``init`` is the per-unit starting α, off C.

    Example::

        t, a = sympy.symbols("t a")
        register_activation("leaky", sympy.Piecewise((t, t >= 0), (a * t, True)), (a,), (0.1,))
    """
    family = _make_family(name, expr, params, init)
    if name in _REGISTRY and not overwrite:
        raise FamilyError(f"an activation family named {name!r} exists; pass overwrite=True to "
                          "replace it")
    family.compile()
    _REGISTRY[name] = family
    return family


def get_family(name_or_family: str | ActivationFamily) -> ActivationFamily:
    """The registered family of that name (or the family itself)."""
    if isinstance(name_or_family, ActivationFamily):
        return name_or_family
    if name_or_family not in _REGISTRY:
        raise FamilyError(f"unknown activation family {name_or_family!r}; known: "
                          f"{available_families()}. Add one with morphc.register_activation.")
    return _REGISTRY[name_or_family]


def available_families() -> list[str]:
    return sorted(_REGISTRY)


def _builtin_families() -> list[ActivationFamily]:
    """The shipped families; init is off C (each starts genuinely non-linear).

    Not derived at import (``import morphc`` stays cheap): the first ``compile`` derives them.
    """
    t = sp.Symbol("t")
    a0, a1, a2 = sp.symbols("alpha0 alpha1 alpha2")
    a = sp.Symbol("alpha")
    sigmoid = 1 / (1 + sp.exp(-t))
    return [
        _make_family("tanh", a1 * t + a2 * (sp.tanh(t) - t), (a1, a2), (1.0, 1.0)),   # C: α2 = 0
        _make_family("poly", a0 + a1 * t + a2 * t**2, (a0, a1, a2), (0.0, 1.0, 0.5)),  # C: α2 = 0
        _make_family("prelu", sp.Max(t, 0) + a * sp.Min(t, 0), (a,), (0.25,)),       # C: α = 1
        _make_family("swish", a1 * t + a2 * t * sigmoid, (a1, a2), (0.0, 1.0)),       # C: α2 = 0
    ]


_REGISTRY.update({f.name: f for f in _builtin_families()})
