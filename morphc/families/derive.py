"""The sympy derivation of a family: its constraint set C, the projection α_C, and p, q on C.

Runs once per ``(family, zero_offset)`` (cached); ``torch_code`` turns the results into torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy as sp

from morphc.errors import FamilyError
from morphc.families.family import _VALID_FAMILY, ActivationFamily, CompiledFamily
from morphc.families.torch_code import torch_fn

_TAYLOR_DEGREE = 6  # coefficients of degree 2.._TAYLOR_DEGREE must vanish for ρ to be affine
# Where each smooth piece is expanded: the first candidate inside its region where it is smooth.
_EXPANSION_POINTS = (sp.S.Zero, sp.S.One, -sp.S.One, sp.S.Half, -sp.S.Half, sp.Integer(2),
                     -sp.Integer(2))
_NON_FINITE = (sp.S.ComplexInfinity, sp.S.Infinity, sp.S.NegativeInfinity, sp.S.NaN)


@dataclass(frozen=True)
class _Piece:
    """One smooth piece of ρ: its expression and the t-region where it applies.

    ``region`` is a sympy set of reals, or None when the condition involves parameters.
    """

    expr: sp.Expr
    region: sp.Set | None

    @property
    def is_point(self) -> bool:
        return isinstance(self.region, sp.FiniteSet)


def _pieces(expr: sp.Expr, t: sp.Symbol) -> list[_Piece]:
    """Split ρ into smooth pieces (a smooth ρ is one piece on the whole line).

    Max/Min/Abs/Heaviside/sign are rewritten to Piecewise and folded to a single top-level
    Piecewise; each piece's region excludes those of the pieces before it, empty ones are dropped.
    """
    folded = sp.piecewise_fold(expr.rewrite(sp.Piecewise))
    if not isinstance(folded, sp.Piecewise):
        return [_Piece(folded, sp.S.Reals)]
    pieces, taken = [], sp.S.EmptySet
    for value, cond in folded.args:
        try:
            region = sp.Complement(sp.Intersection(cond.as_set(), sp.S.Reals), taken)
        except (NotImplementedError, ValueError):  # the condition involves parameters
            pieces.append(_Piece(value, None))
            continue
        taken = sp.Union(taken, region)
        if region is not sp.S.EmptySet:
            pieces.append(_Piece(value, region))
    return pieces


def _normalise(expr: sp.Expr) -> sp.Expr:
    """A canonical form of a coefficient: ``cancel`` for rational functions of α (every built-in
    family; 100× cheaper), ``simplify`` only for anything else."""
    expanded = sp.expand(expr)
    if expanded.is_rational_function(*expanded.free_symbols):
        return sp.cancel(expanded)
    return sp.simplify(expanded)


def _taylor(piece: _Piece, t: sp.Symbol) -> tuple[sp.Expr, list[sp.Expr]]:
    """Taylor coefficients c_0..c_n of a piece about a point of its region where it is smooth.

    n is _TAYLOR_DEGREE, or the degree of a polynomial piece if higher (then the list is exact).
    """
    degree = _TAYLOR_DEGREE
    if piece.expr.is_polynomial(t):
        degree = max(degree, int(sp.degree(piece.expr, t)))
    for point in _EXPANSION_POINTS:
        if piece.region is not None and piece.region.contains(point) is not sp.S.true:
            continue
        coeffs, derivative = [], piece.expr
        for k in range(degree + 1):
            coeffs.append(_normalise(derivative.subs(t, point) / math.factorial(k)))
            derivative = sp.diff(derivative, t)
        if not any(c.has(*_NON_FINITE) for c in coeffs):
            return point, coeffs
    raise FamilyError(f"cannot expand the piece {piece.expr} of ρ around any of "
                      f"{list(_EXPANSION_POINTS)} in its region {piece.region}. {_VALID_FAMILY}")


def _affine_equations(expr: sp.Expr, t: sp.Symbol, zero_offset: bool) -> list[sp.Expr]:
    """Necessary conditions for ρ affine: each piece's Taylor coefficients of degree ≥ 2 vanish,
    all pieces share one slope and intercept, isolated points lie on that line (and q = 0)."""
    equations: list[sp.Expr] = []
    line = None  # (slope, intercept) of the first piece that covers an interval
    points = []
    for piece in _pieces(expr, t):
        if piece.is_point:
            points.append(piece)
            continue
        at, coeffs = _taylor(piece, t)
        equations += coeffs[2:]
        slope, intercept = coeffs[1], coeffs[0] - coeffs[1] * at
        if line is None:
            line = (slope, intercept)
        else:
            equations += [slope - line[0], intercept - line[1]]
    if line is None:
        raise FamilyError(f"ρ = {expr} is defined only at isolated points. {_VALID_FAMILY}")
    for piece in points:
        equations += [piece.expr.subs(t, c) - (line[0] * c + line[1]) for c in piece.region]
    if zero_offset:
        equations.append(line[1])
    simplified = (_normalise(e) for e in equations)
    return list(dict.fromkeys(e for e in simplified if e != 0))


def _affine_form(expr: sp.Expr, t: sp.Symbol, zero_offset: bool) -> tuple[sp.Expr, sp.Expr] | None:
    """(p, q) if ρ is exactly ``p·t + q`` on every piece (and q = 0 if asked), else None.

    This is the symbolic verification: the second derivative of every piece simplifies to 0,
    every piece has the same slope and intercept, and isolated points lie on that line.
    """
    line = None
    pieces = _pieces(expr, t)
    for piece in (p for p in pieces if not p.is_point):
        if sp.simplify(sp.diff(piece.expr, t, 2)) != 0:
            return None
        slope = sp.simplify(sp.diff(piece.expr, t))
        intercept = sp.simplify(piece.expr - slope * t)
        if t in slope.free_symbols | intercept.free_symbols:
            return None
        if line is None:
            line = (slope, intercept)
        elif sp.simplify(slope - line[0]) != 0 or sp.simplify(intercept - line[1]) != 0:
            return None
    if line is None:
        return None
    for piece in (p for p in pieces if p.is_point):
        if any(sp.simplify(piece.expr.subs(t, c) - line[0] * c - line[1]) != 0
               for c in piece.region):
            return None
    if zero_offset and sp.simplify(line[1]) != 0:
        return None
    return line


def _solutions(equations: list[sp.Expr], params: tuple[sp.Symbol, ...]) -> list[dict]:
    """Solutions of the constraint equations for a subset of params, simplest first.

    A solution must express solved parameters in the free ones only (no t, no other symbols).
    """
    allowed = set(params)
    found = [{k: sp.simplify(v) for k, v in sol.items()}
             for sol in sp.solve(equations, params, dict=True)]
    valid = [sol for sol in found if set(sol) <= allowed
             and all(v.free_symbols <= allowed - set(sol) for v in sol.values())]
    return sorted(valid, key=lambda sol: (len(sol), str(sol)))


def _derive(family: ActivationFamily, zero_offset: bool) -> tuple[dict, sp.Expr, sp.Expr]:
    """Solve for α_C and the affine form (p, q) of ``family``; FamilyError if C is not derivable.

    Works on real-valued copies of the symbols (so Abs/Max/Min rewrite piecewise and solve skips
    complex roots), and maps the result back to the user's symbols.
    """
    real = {s: sp.Dummy(s.name, real=True) for s in (family.t, *family.params)}
    back = {v: k for k, v in real.items()}
    expr, t = family.expr.xreplace(real), real[family.t]
    params = tuple(real[a] for a in family.params)
    what = "ρ affine in t with q = 0" if zero_offset else "ρ affine in t"
    equations = _affine_equations(expr, t, zero_offset)
    if not equations:
        if _affine_form(expr, t, zero_offset) is not None:
            raise FamilyError(f"family {family.name!r}: ρ = {family.expr} is affine in t for "
                              f"every α, so the branch can never be non-linear. {_VALID_FAMILY}")
        raise FamilyError(f"family {family.name!r}: could not derive the conditions for {what} "
                          f"from ρ = {family.expr}. {_VALID_FAMILY}")
    shown = ", ".join(f"{e.xreplace(back)} = 0" for e in equations)
    solutions = _solutions(equations, params)
    if not solutions:
        raise FamilyError(f"family {family.name!r}: no α makes {what}: sympy finds no solution "
                          f"of {shown}. {_VALID_FAMILY}")
    for sol in solutions:
        form = _affine_form(expr.xreplace(sol), t, zero_offset)
        if form is not None:
            p, q = (sp.simplify(e.xreplace(sol)).xreplace(back) for e in form)
            return {back[k]: v.xreplace(back) for k, v in sol.items()}, p, q
    raise FamilyError(f"family {family.name!r}: the solutions {solutions} of {shown} do not make "
                      f"{what} (verification failed). {_VALID_FAMILY}")


def _check_init_off_c(family: ActivationFamily, solution: dict) -> None:
    """Reject an init on C: the branch would start linear and open no new descent direction."""
    at_init = dict(zip(family.params, family.init, strict=True))
    if all(float(sp.N((k - v).xreplace(at_init))) == 0.0 for k, v in solution.items()):
        raise FamilyError(f"family {family.name!r}: init {family.init} lies on C "
                          f"({', '.join(f'{k} = {v}' for k, v in solution.items())}), so ρ starts "
                          "affine and the branch opens no new descent direction; pick an init "
                          "off C.")




@functools.cache
def compile_family(family: ActivationFamily, zero_offset: bool) -> CompiledFamily:
    """Run the sympy derivation for one (family, zero_offset) and generate the torch functions."""
    solution, p, q = _derive(family, zero_offset)
    _check_init_off_c(family, solution)
    params = family.params
    projection = tuple(torch_fn(solution[a], params) if a in solution else None for a in params)
    # Solved parameters fixed to a constant (all of them, for every built-in family): the
    # projection is then one select. The constant is the projection's own, so the bits agree.
    fixed = None
    if all(not solution[a].free_symbols for a in solution):
        fixed = tuple(None if f is None else f(()) for f in projection)
    return CompiledFamily(
        family=family, zero_offset=zero_offset,
        constraints=tuple(a - solution[a] for a in params if a in solution),
        solution=solution, p_expr=p, q_expr=q,
        _rho=torch_fn(family.expr, (family.t, *params)),
        _p=torch_fn(p, params), _q=torch_fn(q, params),
        _projection=projection, _fixed=fixed,
    )


def derivation_count() -> int:
    """How many sympy derivations have run (tests and benchmarks use it to check caching)."""
    return compile_family.cache_info().misses

