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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy as sp
import torch

from morphc.errors import FamilyError

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

        from morphc.families.derive import compile_family

        return compile_family(self, bool(zero_offset))


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
    # α_C,j as a number per solved parameter (None: free), when every solved parameter is fixed
    # to a constant on C (every built-in family); None when some α_C,j depends on the free ones.
    _fixed: tuple[float | int | None, ...] | None = field(default=None, repr=False)
    # (mask, values) of ``_fixed`` as tensors, per (dtype, device, alpha.dim()): made once.
    _fixed_tensors: dict = field(default_factory=dict, repr=False)

    def rho(self, t: Tensor, alpha: Tensor) -> Tensor:
        """ρ(t; α) per unit; the result has the broadcast shape of ``t`` and ``unit_shape``."""
        value = self._rho((t, *self._units(alpha)))
        if isinstance(value, torch.Tensor) and value.shape == t.shape \
                and not torch.compiler.is_compiling() and _fits(alpha.shape[1:], t.shape):
            return value          # already of the broadcast shape (t's): what _full returns
        return _full(value, torch.broadcast_shapes(t.shape, alpha.shape[1:]), t)

    def project(self, alpha: Tensor) -> Tensor:
        """α_C(α): solved parameters replaced by their value on C, free ones copied bit-exactly."""
        fixed = self._fixed_for(alpha)
        if fixed is not None:     # one select instead of unbind, one full per column, stack
            proj = _select(*fixed, alpha)
            return proj if fixed[0] is not None else proj.expand(alpha.shape).clone()
        units = self._units(alpha)
        columns = [u if f is None else _full(f(units), u.shape, alpha)
                   for u, f in zip(units, self._projection, strict=True)]
        return torch.stack(columns)

    def homotopy(self, alpha: Tensor, s: Tensor) -> Tensor:
        """α(s) = α_C + s·(α − α_C): the free α at s = 1, exactly α_C at s = 0."""
        fixed = self._fixed_for(alpha)
        proj = self.project(alpha) if fixed is None else _select(*fixed, alpha)
        return proj + s * (alpha - proj)     # not lerp/addcmul: those round differently

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

    def _fixed_for(self, alpha: Tensor) -> tuple[Tensor | None, Tensor] | None:
        """``(mask, values)`` broadcasting against ``alpha``: where ``mask``, α_C is the constant
        in ``values``; elsewhere α passes through (``mask`` None: no parameter is free).
        None when the generic path must run: a family whose α_C depends on α, under
        torch.compile / export / a dispatch mode (no tensors made outside the graph), on tensor
        subclasses, or for a malformed ``alpha`` (the generic path raises its error)."""
        fixed = self._fixed
        if fixed is None or type(alpha) not in _PLAIN_TENSORS or alpha.dim() == 0 \
                or alpha.shape[0] != len(fixed) or torch.compiler.is_compiling() \
                or torch._C._len_torch_dispatch_stack():
            return None
        key = (alpha.dtype, alpha.device, alpha.dim())
        made = self._fixed_tensors.get(key)
        if made is None:
            shape = (len(fixed),) + (1,) * (alpha.dim() - 1)
            with torch.inference_mode(False), torch.no_grad():
                mask = torch.tensor([v is not None for v in fixed], device=alpha.device)
                values = torch.stack([torch.zeros((), dtype=alpha.dtype, device=alpha.device)
                                      if v is None else alpha.new_full((), v, requires_grad=False)
                                      for v in fixed])
            made = self._fixed_tensors[key] = (None if None not in fixed else
                                               mask.reshape(shape), values.reshape(shape))
        return made


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _select(mask: Tensor | None, values: Tensor, alpha: Tensor) -> Tensor:
    """α_C from the constants of a fixed projection: α where free, the constant where solved;
    with no free parameter (``mask`` None), ``values`` itself, broadcasting against α — the
    generic path's stack of constants does not depend on α either, so α's gradient gets no
    ``+ 0`` from a select (which would turn a −0.0 into +0.0)."""
    return values if mask is None else torch.where(mask, values, alpha)


def _fits(unit_shape: Sequence[int], shape: Sequence[int]) -> bool:
    """True when ``unit_shape`` broadcasts against ``shape`` without enlarging it (so the
    broadcast shape is ``shape``); False means "ask torch.broadcast_shapes"."""
    if len(unit_shape) > len(shape):
        return False
    for u, n in zip(reversed(unit_shape), reversed(shape), strict=False):  # trailing dims
        if u != 1 and u != n:
            return False
    return True


def _full(value: Tensor | float, shape: Sequence[int], like: Tensor) -> Tensor:
    """A tensor of ``shape``: constants become a full tensor of ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value if value.shape == tuple(shape) else torch.broadcast_to(value, tuple(shape))
    return like.new_full(tuple(shape), value)

