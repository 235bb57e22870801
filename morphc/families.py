"""Activation families ρ(t; α) as sympy expressions, compiled once into constraints and torch code.

A bypass branch ``B · ρ_α(A x + a)`` can only be folded back into its site when ρ is affine in t.
For each family, sympy derives — once, cached per ``(family, zero_offset)`` — everything the
extension, return and contraction passes need, so no pass is hand-written per family:

1. the constraint set ``C = {α : ρ(·; α) affine in t}``, solved for some parameters as a map
   ``α_C(α)`` (solved params → expressions in the free ones) and verified symbolically;
2. the affine form on C, ``ρ(t; α_C) = p(α)·t + q(α)``;
3. the homotopy ``α(s) = α_C + s·(α − α_C)``, which equals ``α_C`` bit-for-bit at ``s = 0``;
4. torch functions for ρ, p, q, the projection and the constraint residual, translated from the
   sympy expressions (Piecewise → ``torch.where``, Max/Min → ``torch.maximum/minimum``).

Example::

    >>> import sympy, torch
    >>> t, a1, a2 = sympy.symbols("t a1 a2")
    >>> fam = register_activation("sine", a1 * t + a2 * sympy.sin(t), (a1, a2), (1.0, 0.5))
    >>> cf = fam.compile()
    >>> cf.solution, cf.p_expr, cf.q_expr
    ({a2: 0}, a1, 0)
    >>> alpha = torch.tensor([[1.0, 2.0], [0.5, 0.5]])          # (n_params, k units)
    >>> cf.residual(cf.homotopy(alpha, torch.tensor(0.0))).item()
    0.0
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy as sp
import torch
from sympy.logic.boolalg import BooleanAtom

from morphc.errors import FamilyError

_TAYLOR_DEGREE = 6  # coefficients of degree 2.._TAYLOR_DEGREE must vanish for ρ to be affine
# Where each smooth piece is expanded: the first candidate inside its region where it is smooth.
_EXPANSION_POINTS = (sp.S.Zero, sp.S.One, -sp.S.One, sp.S.Half, -sp.S.Half, sp.Integer(2),
                     -sp.Integer(2))
_NON_FINITE = (sp.S.ComplexInfinity, sp.S.Infinity, sp.S.NegativeInfinity, sp.S.NaN)
_VALID_FAMILY = (
    "A valid family is a sympy expression in one input symbol t and parameter symbols α that is "
    "non-linear in t for some α and exactly affine in t for others, e.g. "
    "`t, a1, a2 = sympy.symbols('t a1 a2'); register_activation('mine', a1*t + a2*(sympy.tanh(t)"
    " - t), (a1, a2), init=(1.0, 1.0))` (affine when a2 = 0), or the PReLU-like "
    "`sympy.Max(t, 0) + a*sympy.Min(t, 0)` (affine when a = 1)."
)

Tensor = torch.Tensor
TorchFn = Callable[[Sequence[Tensor]], "Tensor | float"]


class FamilyTypeError(FamilyError, TypeError):
    """A family was given as something other than sympy objects (e.g. a string)."""


# -- the family description -----------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationFamily:
    """ρ(t; α): a sympy expression in the input symbol ``t`` and the parameters ``params``.

    ``init`` is the per-unit starting α; it lies off C, so the branch starts non-linear and opens
    descent directions the original model lacks. Build one with :func:`register_activation`.
    """

    name: str
    expr: sp.Expr
    t: sp.Symbol
    params: tuple[sp.Symbol, ...]
    init: tuple[float, ...]

    @property
    def n_params(self) -> int:
        return len(self.params)

    def compile(self, zero_offset: bool = False) -> CompiledFamily:
        """Derive C, α_C, p, q and the torch functions; cached per ``(family, zero_offset)``.

        ``zero_offset=True`` is for sites without a bias: it also requires ``q(α) = 0`` on C, so
        the contracted branch has no constant term to put anywhere.
        """
        return _compile(self, bool(zero_offset))


# -- the compiled family --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CompiledFamily:
    """What sympy derived for one family, plus torch functions generated from it.

    Tensor arguments: ``alpha`` is stacked per parameter, shape ``(n_params, *unit_shape)``, with
    ``unit_shape`` broadcasting against ``t`` (``(k,)`` for linear outputs ``[..., k]``,
    ``(k, 1, 1)`` for NCHW conv outputs).
    """

    family: ActivationFamily
    zero_offset: bool
    constraints: tuple[sp.Expr, ...]  # g_j(α) = α_j − α_C,j(α) = 0, one per solved parameter
    solution: dict[sp.Symbol, sp.Expr]  # α_C: solved params → expressions in the free ones
    p_expr: sp.Expr
    q_expr: sp.Expr
    _rho: TorchFn = field(repr=False)
    _p: TorchFn = field(repr=False)
    _q: TorchFn = field(repr=False)
    _projection: tuple[TorchFn | None, ...] = field(repr=False)  # None: free, passes through

    def rho(self, t: Tensor, alpha: Tensor) -> Tensor:
        """ρ(t; α) per unit; the result has the broadcast shape of ``t`` and ``unit_shape``."""
        units = self._units(alpha)
        shape = torch.broadcast_shapes(t.shape, alpha.shape[1:])
        return _full(self._rho((t, *units)), shape, t)

    def project(self, alpha: Tensor) -> Tensor:
        """α_C(α): solved parameters replaced by their value on C, free ones copied bit-exactly."""
        units = self._units(alpha)
        columns = [u if f is None else _full(f(units), u.shape, alpha)
                   for u, f in zip(units, self._projection, strict=True)]
        return torch.stack(columns)

    def homotopy(self, alpha: Tensor, s: Tensor) -> Tensor:
        """α(s) = α_C + s·(α − α_C): the free α at s = 1, exactly α_C at s = 0."""
        proj = self.project(alpha)
        return proj + s * (alpha - proj)

    def p(self, alpha: Tensor) -> Tensor:
        """Slope of ρ on C, shape ``unit_shape`` (meaningful for α on C)."""
        return _full(self._p(self._units(alpha)), alpha.shape[1:], alpha)

    def q(self, alpha: Tensor) -> Tensor:
        """Offset of ρ on C, shape ``unit_shape`` (meaningful for α on C)."""
        return _full(self._q(self._units(alpha)), alpha.shape[1:], alpha)

    def residual(self, alpha: Tensor) -> Tensor:
        """``max_j max_units |g_j(α)|`` as a 0-dim tensor; exactly 0.0 for α = α_C(·).

        Computed as ``|α_j − α_C,j(α)|`` with the projection's own code, so a projected α gives
        the same bits on both sides and the difference is exactly zero.
        """
        units = self._units(alpha)
        gaps = [(u - _full(f(units), u.shape, alpha)).abs()
                for u, f in zip(units, self._projection, strict=True) if f is not None]
        return torch.stack(gaps).amax()

    def describe(self) -> str:
        """ρ, the equations of C, the projection and the affine form, for reports and errors."""
        fam = self.family
        params = ", ".join(map(str, fam.params))
        lines = [f"family {fam.name!r}: ρ({fam.t}; {params}) = {fam.expr}",
                 "  C (ρ affine in t" + (", no offset" if self.zero_offset else "") + "): "
                 + ", ".join(f"{g} = 0" for g in self.constraints),
                 "  projection α_C: " + ", ".join(f"{k} ← {v}" for k, v in self.solution.items()),
                 f"  on C: ρ = p·{fam.t} + q with p = {self.p_expr}, q = {self.q_expr}",
                 f"  init {dict(zip(map(str, fam.params), fam.init, strict=True))} (off C)"]
        return "\n".join(lines)

    def _units(self, alpha: Tensor) -> tuple[Tensor, ...]:
        """Split the stacked α into one tensor per parameter, checking the leading dimension."""
        if alpha.dim() == 0 or alpha.shape[0] != self.family.n_params:
            raise ValueError(f"family {self.family.name!r} takes alpha of shape (n_params="
                             f"{self.family.n_params}, *unit_shape), got {tuple(alpha.shape)}")
        return alpha.unbind(0)


def _full(value: Tensor | float, shape: Sequence[int], like: Tensor) -> Tensor:
    """A tensor of ``shape``: constants become a full tensor of ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value if value.shape == tuple(shape) else torch.broadcast_to(value, tuple(shape))
    return like.new_full(tuple(shape), value)


# -- derivation (sympy) ---------------------------------------------------------------------------
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
            coeffs.append(sp.simplify(derivative.subs(t, point) / math.factorial(k)))
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
    simplified = (sp.simplify(e) for e in equations)
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
def _compile(family: ActivationFamily, zero_offset: bool) -> CompiledFamily:
    """Run the sympy derivation for one (family, zero_offset) and generate the torch functions."""
    solution, p, q = _derive(family, zero_offset)
    _check_init_off_c(family, solution)
    params = family.params
    return CompiledFamily(
        family=family, zero_offset=zero_offset,
        constraints=tuple(a - solution[a] for a in params if a in solution),
        solution=solution, p_expr=p, q_expr=q,
        _rho=_torch_fn(family.expr, (family.t, *params)),
        _p=_torch_fn(p, params), _q=_torch_fn(q, params),
        _projection=tuple(_torch_fn(solution[a], params) if a in solution else None
                          for a in params),
    )


def derivation_count() -> int:
    """How many sympy derivations have run (tests and benchmarks use it to check caching)."""
    return _compile.cache_info().misses


# -- torch code generation ------------------------------------------------------------------------
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


def _torch_fn(expr: sp.Expr, symbols: Sequence[sp.Symbol]) -> TorchFn:
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


# -- registry -------------------------------------------------------------------------------------
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
